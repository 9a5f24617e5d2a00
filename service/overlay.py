"""Overlay images: the field as a colour composite, cell outlines, label names and IG heatmaps.

:func:`render_overlay` is a pure function over arrays; :func:`save_png` writes the result.
The ``locus overlay`` subcommand (:func:`configure_parser`, :func:`run`) reads a field,
segments it, classifies every cell with ``model.onnx``, optionally computes integrated
gradients through ``grad.onnx`` and writes the overlay as PNG. It needs ONNX Runtime only.

Colours: red channel (microtubules) -> red, green (protein) -> green, blue (nucleus) ->
blue, yellow (ER) -> red + green, as on the HPA website. Attribution heatmaps are
blended over each cell's own pixels: positive attribution in a hot colour map
(dark red -> yellow -> white), negative in blue; opacity grows with magnitude,
normalised per cell by its largest absolute value.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from locus.service.classes import CHANNELS, CLASS_NAMES

__all__ = ["composite", "render_overlay", "save_png", "configure_parser", "run"]

Box = tuple[int, int, int, int]


def composite(image: np.ndarray, percentile: float = 99.5, min_range: float = 40.0) -> np.ndarray:
    """RGB composite of an (H, W, 4) R, G, B, Y field.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W, 4), ``uint8``, ``uint16`` or float 0-255 (:func:`locus.service.imaging.to_unit255`).
    percentile : float
        Each channel is stretched from its 1st percentile (background) to this percentile.
    min_range : float
        Smallest stretch range on the 0-255 scale, so a nearly empty channel (noise only)
        stays dark instead of being amplified to full intensity.

    Returns
    -------
    numpy.ndarray
        (H, W, 3) ``float32`` in 0-1: R = red + yellow, G = green + yellow, B = blue (clipped).
    """
    from locus.service.imaging import to_unit255

    if image.ndim != 3 or image.shape[2] != 4:
        raise ValueError(f"expected an (H, W, 4) field, got {image.shape}")
    img = to_unit255(image)
    step = max(1, int(np.sqrt(img.shape[0] * img.shape[1] / 250_000)))  # percentiles on a subsample
    chans = []
    for c in range(4):
        ch = img[:, :, c]
        sample = ch[::step, ::step]
        lo = float(np.percentile(sample, 1.0))
        hi = max(float(np.percentile(sample, percentile)), lo + min_range)
        chans.append(np.clip((ch - lo) / (hi - lo), 0.0, 1.0))
    r, g, b, y = chans
    return np.clip(np.stack([r + y, g + y, b], axis=-1), 0.0, 1.0)


def _heat_colours(v: np.ndarray) -> np.ndarray:
    """Colours for a map normalised to [-1, 1]: hot for positive, blue for negative. Returns (h, w, 3) 0-1."""
    pos = np.clip(v, 0.0, 1.0)
    neg = np.clip(-v, 0.0, 1.0)
    hot = np.stack([np.clip(3 * pos, 0, 1), np.clip(3 * pos - 1, 0, 1), np.clip(3 * pos - 2, 0, 1)], axis=-1)
    hot[..., 0] = np.where(pos > 0, np.maximum(hot[..., 0], 0.35), 0)
    cold = np.stack([np.zeros_like(neg), 0.4 * neg, 0.4 + 0.6 * neg], axis=-1)
    return np.where((pos > 0)[..., None], hot, np.where((neg > 0)[..., None], cold, 0.0)).astype(np.float32)


def _cell_field(cell: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(cell, Mapping) and name in cell:
            return cell[name]
        if not isinstance(cell, Mapping) and hasattr(cell, name):
            return getattr(cell, name)
    return default


def _outlines(labels: np.ndarray) -> np.ndarray:
    """Boolean (H, W): pixels of a cell that touch another label or the background (4-neighbourhood)."""
    edge = np.zeros(labels.shape, bool)
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge & (labels > 0)


def render_overlay(
    image: np.ndarray,
    cell_labels: np.ndarray,
    cells: Sequence[Mapping[str, Any] | Any],
    attributions: Mapping[int, tuple[Box, np.ndarray]] | None = None,
    max_side: int = 1024,
    *,
    heat_alpha: float = 0.65,
    outline_colour: tuple[int, int, int] = (255, 255, 255),
    font_scale: float | None = None,
) -> np.ndarray:
    """Render a field with cell outlines, label names and attribution heatmaps.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W, 4) R, G, B, Y field (``uint8``, ``uint16`` or float).
    cell_labels : numpy.ndarray
        (H, W) integer cell label image, 0 = background.
    cells : sequence of dict or record
        One entry per cell to annotate, with ``id`` (or ``cell_id``) and ``labels`` (or ``label_names``
        / ``names``): class names (str) or class ids (int); entries without labels get no text.
    attributions : dict, optional
        ``{cell_id: (box, map)}`` with ``box`` (row0, col0, row1, col1) in image coordinates and ``map``
        of shape (row1 - row0, col1 - col0) (see :func:`locus.service.attribution.map_to_box`). Blended over
        the cell's own pixels inside the box.
    max_side : int
        The output is downscaled so its longer side is at most this (never enlarged).
    heat_alpha : float
        Opacity of the heatmap at the largest magnitude.
    outline_colour : tuple of int
        RGB colour of the cell outlines.
    font_scale : float, optional
        OpenCV font scale (default from the output size).

    Returns
    -------
    numpy.ndarray
        (h, w, 3) ``uint8`` RGB, ``h, w`` = (H, W) scaled by ``min(1, max_side / max(H, W))``.
    """
    if cell_labels.shape != image.shape[:2]:
        raise ValueError(f"labels {cell_labels.shape} do not match the image {image.shape[:2]}")
    h, w = cell_labels.shape
    f = min(1.0, float(max_side) / max(h, w))
    oh, ow = max(1, int(round(h * f))), max(1, int(round(w * f)))
    rgb = composite(image)
    if (oh, ow) != (h, w):
        rgb = cv2.resize(rgb, (ow, oh), interpolation=cv2.INTER_AREA)
        labels = cv2.resize(cell_labels.astype(np.int32), (ow, oh), interpolation=cv2.INTER_NEAREST)
    else:
        labels = cell_labels.astype(np.int32, copy=False)

    for cid, (box, amap) in (attributions or {}).items():
        r0, c0, r1, c1 = (int(v) for v in box)
        amap = np.asarray(amap, np.float32)
        if amap.shape != (r1 - r0, c1 - c0):
            raise ValueError(f"cell {cid}: map {amap.shape} does not match its box {box}")
        sr0, sc0 = int(np.floor(r0 * f)), int(np.floor(c0 * f))
        sr1, sc1 = min(oh, max(sr0 + 1, int(np.ceil(r1 * f)))), min(ow, max(sc0 + 1, int(np.ceil(c1 * f))))
        if sr1 <= sr0 or sc1 <= sc0:
            continue
        m = cv2.resize(amap, (sc1 - sc0, sr1 - sr0), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
        m = m.reshape(sr1 - sr0, sc1 - sc0)
        inside2d = labels[sr0:sr1, sc0:sc1] == int(cid)
        # Scale by the 99th percentile of |map| inside the cell, so a few extreme pixels do not wash out the rest.
        peak = float(np.percentile(np.abs(m[inside2d]), 99)) if inside2d.any() else 0.0
        if peak <= 0 or not np.isfinite(peak):
            continue
        v = np.clip(m / peak, -1.0, 1.0)
        inside = inside2d[..., None]
        alpha = heat_alpha * np.abs(v)[..., None] * inside
        patch = rgb[sr0:sr1, sc0:sc1]
        # Dim the attributed cell to grey so the heatmap, not the stain, carries the colour.
        grey = patch.mean(axis=-1, keepdims=True) * 0.5
        patch = np.where(inside, grey, patch)
        rgb[sr0:sr1, sc0:sc1] = patch * (1 - alpha) + _heat_colours(v) * alpha

    out = np.ascontiguousarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8))
    out[_outlines(labels)] = outline_colour

    scale = font_scale if font_scale is not None else max(0.35, min(1.0, max(oh, ow) / 1600))
    thick = 1 if scale < 0.6 else 2
    line_h = int(round(30 * scale)) + 2
    boxes = _scaled_boxes(cell_labels, f)
    for cell in cells:
        cid = int(_cell_field(cell, "id", "cell_id", default=-1))
        names = _cell_field(cell, "labels", "label_names", "names", default=[]) or []
        names = [CLASS_NAMES[int(n)] if isinstance(n, int | np.integer) else str(n) for n in names]
        if cid not in boxes or not names:
            continue
        r0, c0, r1, _ = boxes[cid]
        y = max(line_h, r0 + line_h)
        for k, text in enumerate(names):
            org = (max(0, c0 + 2), min(oh - 2, y + k * line_h))
            (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
            cv2.rectangle(out, (org[0] - 1, org[1] - th - 2), (org[0] + tw + 1, org[1] + base), (0, 0, 0), -1)
            cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 140), thick, cv2.LINE_AA)
    return out


def _scaled_boxes(labels: np.ndarray, f: float) -> dict[int, Box]:
    from locus.service.crop import cell_boxes

    return {
        cid: (int(r0 * f), int(c0 * f), int(np.ceil(r1 * f)), int(np.ceil(c1 * f)))
        for cid, (r0, c0, r1, c1) in cell_boxes(labels).items()
    }


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an RGB ``uint8`` image as PNG.

    Parameters
    ----------
    rgb : numpy.ndarray
        (H, W, 3) ``uint8`` RGB.
    path : str or Path
        Output file (parent folders are created).

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write the PNG")
    return path


# --------------------------------------------------------------------------------------------------------------------
# `locus overlay`
# --------------------------------------------------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``locus overlay`` arguments.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The subcommand's parser.
    """
    src = parser.add_argument_group("input (four channel files, or --field DIR ID)")
    for c in CHANNELS:
        src.add_argument(f"--{c}", metavar="FILE", help=f"{c} channel image")
    src.add_argument(
        "--field", nargs=2, metavar=("DIR", "ID"), help="read DIR/ID_{red,green,blue,yellow}.{png,tif,jpg}"
    )
    from locus.service.config import DEFAULT_MODEL_DIR, add_hpa_compat_argument

    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL_DIR),
        help=f"model folder with model.onnx and manifest.json (default {DEFAULT_MODEL_DIR})",
    )
    parser.add_argument("--out", default="overlay.png", help="output PNG (default overlay.png)")
    parser.add_argument("--attributions", action="store_true", help="blend integrated-gradient heatmaps (grad.onnx)")
    parser.add_argument("--segmenter", default="classical", help="segmentation backend (default classical)")
    add_hpa_compat_argument(parser)
    parser.add_argument("--steps", type=int, default=None, help="IG trapezoid steps (default LOCUS_IG_STEPS, 64)")
    parser.add_argument("--baseline", choices=["black", "blur"], default="black", help="IG baseline")
    parser.add_argument("--max-cells", type=int, default=50, help="attribute at most this many cells (default 50)")
    parser.add_argument("--threshold", type=float, default=None, help="one decision threshold for every class")
    parser.add_argument("--max-side", type=int, default=1024, help="longer side of the PNG (default 1024)")


def _field_paths(args: argparse.Namespace) -> dict[str, str]:
    if args.field:
        folder, fid = Path(args.field[0]), args.field[1]
        paths = {}
        for c in CHANNELS:
            found = [folder / f"{fid}_{c}{ext}" for ext in (".png", ".tif", ".tiff", ".jpg", ".jpeg")]
            found = [p for p in found if p.is_file()]
            if not found:
                raise FileNotFoundError(f"no {c} channel for {fid} in {folder} (looked for {fid}_{c}.png/.tif/.jpg)")
            paths[c] = str(found[0])
        return paths
    missing = [c for c in CHANNELS if not getattr(args, c)]
    if missing:
        raise ValueError(f"give --field DIR ID or all four channels; missing --{' --'.join(missing)}")
    return {c: getattr(args, c) for c in CHANNELS}


def run(args: argparse.Namespace) -> int:
    """Run ``locus overlay``: read, segment, classify, optionally attribute, render and save.

    The field goes through the same pipeline as the service (:func:`locus.service.factory.build_pipeline`),
    with the same model-folder checks, thresholds and integrated-gradient defaults.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed :func:`configure_parser` arguments.

    Returns
    -------
    int
        0 on success, 2 on bad input or a model folder that cannot serve the request.
    """
    from locus.service.config import PipelineSettings, apply_hpa_compat
    from locus.service.factory import build_pipeline
    from locus.service.imaging import load_field
    from locus.service.manifest import ModelFolderError
    from locus.service.pipeline import ClassifyOptions

    apply_hpa_compat(args)
    settings = PipelineSettings()
    try:
        paths = _field_paths(args)
        pipeline = build_pipeline(settings, model_dir=args.model, segmenter=args.segmenter)
        if args.attributions and not pipeline.classifier.supports_attributions:
            raise ModelFolderError(
                f"{args.model}: no grad.onnx in the manifest; export the gradient model for attributions"
            )
        t0 = time.perf_counter()
        image = load_field(paths, max_pixels=settings.max_image_pixels)
    except (OSError, ValueError, ModelFolderError) as exc:
        sys.stderr.write(f"locus overlay: {exc}\n")
        return 2
    options = ClassifyOptions(
        threshold=args.threshold,
        include_masks=False,
        attributions=args.attributions,
        ig_steps=args.steps or settings.ig_steps,
        ig_baseline=args.baseline,
        ig_tolerance=settings.ig_tolerance,
        ig_max_steps=settings.ig_max_steps,
        ig_budget=settings.ig_budget,
        ig_max_cells=max(0, args.max_cells),
        attribute_top=True,
    )
    result = pipeline.run(image, options)
    cells = [{"id": c.record.id, "labels": [CLASS_NAMES[k] for k in c.labels]} for c in result.cells]
    attributions: dict[int, tuple[Box, np.ndarray]] | None = None
    if args.attributions:
        attributions = {
            c.record.id: (c.attributions[0].box, c.attributions[0].map) for c in result.cells if c.attributions
        }
        results = [c.attributions[0].result for c in result.cells if c.attributions]
        worst = max((r.completeness_rel for r in results), default=0.0)
        steps = sorted({r.steps for r in results}) or [options.ig_steps]
        print(
            f"attributions: {len(attributions)} cells, {'/'.join(map(str, steps))} steps, "
            f"worst completeness error {worst:.2%}"
        )
    rgb = render_overlay(image, result.cell_labels, cells, attributions, max_side=args.max_side)
    out = save_png(rgb, args.out)
    print(f"{out}: {len(result.cells)} cells, {rgb.shape[1]}x{rgb.shape[0]} px, {time.perf_counter() - t0:.1f} s")
    return 0
