"""A model folder as a BioImage.IO model package (``rdf.yaml``, format 0.5, ONNX weights).

``locus export --bioimageio DIR [--model models/NAME]`` writes, from a Locus model folder:

* ``rdf.yaml``: the model description (``format_version`` 0.5.x of the BioImage.IO spec)
  with one input ``image`` (axes batch, y, x, channel: float32 R, G, B, Y in 0-255, one
  cell crop made by the crop rule) and one output ``probabilities`` (batch, 19 classes
  in 0-1), ONNX weights, the crop rule and class thresholds under ``config.locus``;
* ``model.onnx``: the weights (copied; or referenced in place with ``weights="reference"``
  when the package lives inside the model folder, so the shipped model is stored once);
* ``test_input.npy`` / ``test_output.npy``: one real cell crop of an HPA-sim field made by
  :func:`locus.service.crop.crop_cells`, and what ONNX Runtime answers for it (the same as
  ``sample_input.tif`` / ``sample_output.tif`` for viewers);
* ``README.md``: the model card plus how inputs are made (crop rule, channel order, value
  range) and a Validation section; ``cover.png``: the test crop as a colour image.

The package is checked with ``bioimageio.spec`` (offline, with file checks) before the
function returns; the ``bioimageio`` extra installs it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from locus.service.classes import CHANNELS, CLASS_NAMES, NUM_CLASSES
from locus.service.crop import CropRule, crop_cells
from locus.service.manifest import Manifest, load_manifest

__all__ = ["BioimageioExportError", "export_bioimageio", "validate_package", "test_crop", "configure_parser", "run"]

RDF_NAME = "rdf.yaml"
TEST_FIELD_SEED = 20210
"""Seed of the HPA-sim field whose cell gives the test tensors (``generate_field(0, seed)``)."""
CITE_URL = "https://www.kaggle.com/competitions/hpa-single-cell-image-classification"
"""The task the model answers (cited in ``rdf.yaml``); validation treats it as known instead of fetching it."""


class BioimageioExportError(RuntimeError):
    """The package could not be written or does not validate; the message says why."""


def test_crop(rule: CropRule, field_size: int = 384, seed: int = TEST_FIELD_SEED) -> tuple[np.ndarray, dict]:
    """One cell crop made by the crop rule, from a generated HPA-sim field.

    The cell is the one whose truth mask is the largest among cells that do not touch the border.

    Parameters
    ----------
    rule : CropRule
        The model's crop rule.
    field_size : int
        Side of the HPA-sim field.
    seed : int
        HPA-sim seed (field index 0).

    Returns
    -------
    crop : numpy.ndarray
        (1, S, S, 4) float32 in 0-255.
    source : dict
        How to reproduce it (generator, seed, field size, cell id, its truth labels).
    """
    from locus.service.cells import cell_records
    from locus.training.sim.generator import SimConfig, generate_field

    field = generate_field(0, seed, SimConfig(size=field_size))
    labels = field.cells.astype(np.int32)
    records = [r for r in cell_records(labels) if not r.touches_border] or cell_records(labels)
    if not records:
        raise BioimageioExportError(f"the HPA-sim field (seed {seed}, {field_size} px) has no cells")
    cell = max(records, key=lambda r: r.area)
    _, batch = crop_cells(field.image, labels, rule, [cell.id])
    source = {
        "generator": "locus.training.sim.generator.generate_field",
        "index": 0,
        "seed": seed,
        "size": field_size,
        "cell_id": int(cell.id),
        "truth_labels": [CLASS_NAMES[k] for k in field.cell_labels.get(cell.id, [])],
        "crop": "locus.service.crop.crop_cells(field.image, field.cells, rule, [cell_id])",
    }
    return batch.astype(np.float32), source


def _onnx_opset(path: Path) -> int:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is in the bioimageio extra
        raise BioimageioExportError(
            "the bioimageio export needs the onnx package: pip install 'locus[bioimageio]'"
        ) from exc
    model = onnx.load(str(path), load_external_data=False)
    return max(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _run_onnx(path: Path, x: np.ndarray, input_name: str, output_name: str) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run([output_name], {input_name: x})[0].astype(np.float32)


def _cover(crop: np.ndarray, path: Path) -> None:
    """The crop as an RGB picture: red = microtubules, green = protein, blue = nucleus, yellow added to R+G."""
    x = crop[0].astype(np.float32)
    r, g, b, y = (x[:, :, k] for k in range(4))
    rgb = np.stack([np.clip(r + 0.5 * y, 0, 255), np.clip(g + 0.5 * y, 0, 255), b], axis=-1)
    side = max(256, rgb.shape[0])
    img = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_NEAREST).astype(np.uint8)
    cv2.imwrite(str(path), img[:, :, ::-1])  # OpenCV writes BGR


def _documentation(folder: Path, manifest: Manifest, source: dict, parity: float) -> str:
    card_path = folder / "MODEL_CARD.md"
    card = card_path.read_text(encoding="utf-8") if card_path.is_file() else f"# {manifest.name} {manifest.version}\n"
    crop = manifest.crop
    metrics = (manifest.training or {}).get("metrics", {})
    lines = [
        card.rstrip(),
        "",
        "## Input: one cell, made by the crop rule",
        "",
        "The model classifies one segmented cell at a time. Its input is made from a four-channel field of view "
        "and the cell's mask by `locus.service.crop.crop_cells` (the same function in training and serving):",
        "",
        "1. Take the cell's bounding box in the full-resolution label image.",
        f"2. Make it square around its centre, side = max(height, width) x (1 + 2 x {crop.padding}) "
        f"(at least {crop.min_side} px); cut that window from the field, zero outside the image.",
        "3. "
        + (
            "Zero every pixel of another cell (label not 0 and not this cell); background pixels are kept."
            if crop.mask_other_cells
            else "Other cells' pixels are kept."
        ),
        f"4. Resize to {crop.size} x {crop.size} (area interpolation when shrinking, linear when enlarging).",
        "",
        f"- Axes: batch, y, x, channel (NHWC), float32, shape (N, {crop.size}, {crop.size}, 4).",
        "- Channel order: red = microtubules, green = protein of interest, blue = nucleus, yellow = endoplasmic "
        "reticulum (the HPA's four stains).",
        "- Value range: 0-255. 8-bit images as they are; 16-bit images divided by 257. No further normalisation: "
        "the network rescales internally.",
        f"- Output `probabilities`: (N, {NUM_CLASSES}) sigmoid scores, one per class, in the order of "
        "`config.locus.class_names`; a class is called when its score reaches its threshold in "
        "`config.locus.thresholds` (for the mean of 2, 4 or 8 flipped/transposed views of the crop: "
        "`config.locus.view_thresholds`).",
        "",
        "Whole fields of view (segmentation, crops, classification of every cell) are served by Locus "
        "(`locus serve`, `locus predict`); this package holds the per-cell classifier only.",
        "",
        "## Validation",
        "",
        f"- Test tensors: cell {source['cell_id']} of the HPA-sim field `generate_field(0, {source['seed']}, "
        f"SimConfig(size={source['size']}))`, cropped by the rule above; `test_output.npy` is ONNX Runtime's "
        f"answer (re-run at export: max abs difference {parity:.2g}).",
    ]
    if metrics.get("heldout_map") is not None:
        lines.append(
            f"- Held-out fields, competition mAP through Locus's own pipeline: {float(metrics['heldout_map']):.3f} "
            f"on {metrics.get('heldout_fields', 'n/a')} fields."
        )
    if metrics.get("val_cell_map") is not None:
        lines.append(f"- Validation cells, mean of per-class AP: {float(metrics['val_cell_map']):.3f}.")
    lines += [
        "- To validate on your own data: segment your fields, crop every cell with the rule above, and compare "
        "calls with per-cell ground truth (`locus predict` + `locus eval` do this for whole fields).",
        "",
    ]
    return "\n".join(lines)


def _rdf(manifest: Manifest, weights_source: str, opset: int, source: dict) -> dict[str, Any]:
    from bioimageio.spec.model.v0_5 import ModelDescr

    size = int(manifest.input_size)
    sim = bool((manifest.training or {}).get("data", {}).get("synthetic", False))
    description = (
        "Per-cell protein localisation in four-channel immunofluorescence (Human Protein Atlas style): "
        f"{manifest.architecture} over one cell crop, 19 sigmoid scores for the HPA single-cell classes."
        + (" Trained on synthetic HPA-sim data only: not for biological conclusions." if sim else "")
    )
    crop = manifest.crop
    return {
        "format_version": ModelDescr.implemented_format_version,
        "type": "model",
        "name": f"Locus {manifest.name}",
        "description": description,
        "version": manifest.version,
        "authors": [{"name": "Locus contributors"}],
        "cite": [
            {
                "text": "Human Protein Atlas - Single Cell Classification (Kaggle competition, 2021)",
                "url": CITE_URL,
            }
        ],
        "license": "Apache-2.0",
        "tags": [
            "classification",
            "fluorescence-light-microscopy",
            "2d",
            "cells",
            "protein-localization",
            "human-protein-atlas",
            "onnx",
        ],
        "documentation": {"source": "README.md"},
        "covers": [{"source": "cover.png"}],
        "inputs": [
            {
                "id": "image",
                "description": "One cell crop made by the crop rule (see README): R, G, B, Y channels, 0-255",
                "axes": [
                    {"type": "batch"},
                    {"type": "space", "id": "y", "size": size},
                    {"type": "space", "id": "x", "size": size},
                    {"type": "channel", "channel_names": list(CHANNELS)},
                ],
                "test_tensor": {"source": "test_input.npy"},
                "sample_tensor": {"source": "sample_input.tif"},
                "data": {"type": "float32", "range": [0.0, 255.0]},
            }
        ],
        "outputs": [
            {
                "id": "probabilities",
                "description": "Sigmoid score per class, in the order of config.locus.class_names",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": [_channel_id(n) for n in CLASS_NAMES]},
                ],
                "test_tensor": {"source": "test_output.npy"},
                "sample_tensor": {"source": "sample_output.tif"},
                "data": {"type": "float32", "range": [0.0, 1.0]},
            }
        ],
        "weights": {"onnx": {"source": weights_source, "opset_version": opset}},
        "config": {
            "locus": {
                "name": manifest.name,
                "version": manifest.version,
                "architecture": manifest.architecture,
                "input_name": manifest.input_name,
                "output_name": manifest.output_name,
                "channels": list(CHANNELS),
                "value_range": [float(v) for v in manifest.value_range],
                "crop": {
                    "size": crop.size,
                    "padding": crop.padding,
                    "mask_other_cells": crop.mask_other_cells,
                    "min_side": crop.min_side,
                    "function": "locus.service.crop.crop_cells",
                },
                "class_names": list(CLASS_NAMES),
                "thresholds": [float(t) for t in manifest.thresholds],
                "view_thresholds": {str(n): [float(t) for t in v] for n, v in sorted(manifest.view_thresholds.items())},
                "test_tensor_source": source,
            }
        },
    }


def _channel_id(name: str) -> str:
    """A class name as a channel name without spaces (``Nuclear membrane`` -> ``nuclear_membrane``)."""
    return "".join(c if c.isalnum() else "_" for c in name.lower())


def _yaml(data: dict) -> str:
    """YAML through the spec's own writer when present (ruyaml), else JSON (YAML 1.2 is a JSON superset)."""
    try:
        from ruyaml import YAML
    except ImportError:  # pragma: no cover
        return json.dumps(data, indent=2) + "\n"
    import io

    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # type: ignore[attr-defined]
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


def validate_package(path: str | Path) -> Any:
    """Validate a package with ``bioimageio.spec``, offline, checking its files and test tensors.

    Parameters
    ----------
    path : str or Path
        The package folder (with ``rdf.yaml``) or the ``rdf.yaml``.

    Returns
    -------
    bioimageio.spec.model.v0_5.ModelDescr
        The loaded description.

    Raises
    ------
    BioimageioExportError
        It does not validate; the message holds the spec's summary.
    """
    from bioimageio.spec import InvalidDescr, load_description

    rdf = Path(path)
    if rdf.is_dir():
        rdf = rdf / RDF_NAME
    # Offline: the cited URL is declared known rather than fetched; every local file is read and hashed.
    descr = load_description(rdf, perform_io_checks=True, known_files={CITE_URL: None})
    if isinstance(descr, InvalidDescr) or descr.validation_summary.status == "failed":
        raise BioimageioExportError(f"{rdf} does not validate:\n{descr.validation_summary.display() or ''}")
    return descr


def export_bioimageio(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    weights: str = "copy",
    field_size: int = 384,
    seed: int = TEST_FIELD_SEED,
    tolerance: float = 1e-5,
    validate: bool = True,
) -> Path:
    """Write a BioImage.IO model package for a Locus model folder.

    Parameters
    ----------
    model_dir : str or Path
        The model folder (``manifest.json``, ``model.onnx``, ``MODEL_CARD.md``).
    out_dir : str or Path
        The package folder (created; its package files are replaced).
    weights : str
        ``"copy"``: copy ``model.onnx`` into the package (self-contained);
        ``"reference"``: point at the model folder's ``model.onnx`` by a relative path
        (for a package kept inside the model folder, e.g. ``models/NAME/bioimageio``).
    field_size, seed : int
        The HPA-sim field the test cell comes from.
    tolerance : float
        Largest accepted difference between ONNX Runtime runs of the test input.
    validate : bool
        Validate with ``bioimageio.spec`` before returning.

    Returns
    -------
    Path
        The written ``rdf.yaml``.

    Raises
    ------
    BioimageioExportError
        Unreadable model folder, non-reproducible test output or an invalid package.
    """
    folder = Path(model_dir)
    out = Path(out_dir)
    try:
        manifest = load_manifest(folder)
    except Exception as exc:
        raise BioimageioExportError(f"{folder}: not a valid model folder: {exc}") from exc
    if weights not in ("copy", "reference"):
        raise BioimageioExportError(f"weights: {weights!r} is not 'copy' or 'reference'")
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / "model.onnx"
    if weights == "copy":
        shutil.copyfile(onnx_path, out / "model.onnx")
        weights_source = "model.onnx"
        weights_path = out / "model.onnx"
    else:
        weights_source = Path(_relpath(onnx_path, out)).as_posix()
        weights_path = onnx_path
    rule = CropRule(
        size=manifest.crop.size,
        padding=manifest.crop.padding,
        mask_other_cells=manifest.crop.mask_other_cells,
        min_side=manifest.crop.min_side,
    )
    x, source = test_crop(rule, field_size=field_size, seed=seed)
    y = _run_onnx(weights_path, x, manifest.input_name, manifest.output_name)
    again = _run_onnx(weights_path, x.copy(), manifest.input_name, manifest.output_name)
    parity = float(np.abs(y - again).max())
    if y.shape != (1, NUM_CLASSES) or not parity <= tolerance:
        raise BioimageioExportError(f"ONNX Runtime output {y.shape}, run-to-run difference {parity:.3g}")
    np.save(out / "test_input.npy", x)
    np.save(out / "test_output.npy", y)
    import tifffile  # a dependency of bioimageio.spec

    tifffile.imwrite(out / "sample_input.tif", x[0])  # (y, x, channel), for people and imageio
    tifffile.imwrite(out / "sample_output.tif", y)
    _cover(x, out / "cover.png")
    (out / "README.md").write_text(_documentation(folder, manifest, source, parity), encoding="utf-8")
    rdf = _rdf(manifest, weights_source, _onnx_opset(weights_path), source)
    path = out / RDF_NAME
    path.write_text(_yaml(rdf), encoding="utf-8")
    if validate:
        validate_package(path)
    return path


def _relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), start.resolve())


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The ``--bioimageio`` options (added to ``locus export``).

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The ``locus export`` parser.
    """
    group = parser.add_argument_group("BioImage.IO (the [bioimageio] extra)")
    group.add_argument(
        "--bioimageio",
        metavar="DIR",
        default=None,
        help="write a BioImage.IO model package (rdf.yaml, ONNX weights, test tensors, documentation) to DIR; "
        "without --checkpoint it packages --model (default the shipped model)",
    )
    group.add_argument("--model", default=None, help="model folder to package (default: --out, else the shipped model)")
    group.add_argument(
        "--bioimageio-weights",
        choices=["copy", "reference"],
        default="copy",
        help="copy model.onnx into the package (default) or reference it by a relative path",
    )


def run(args: argparse.Namespace) -> int:
    """Write the package for ``args.model`` (or ``args.out`` after an export).

    Parameters
    ----------
    args : argparse.Namespace
        ``bioimageio``, ``model``, ``out``, ``bioimageio_weights``.

    Returns
    -------
    int
        0 on success, 1 when the package cannot be written or does not validate, 2 without the extra.
    """
    from locus.service.config import DEFAULT_MODEL_DIR

    model = args.model or getattr(args, "out", None) or DEFAULT_MODEL_DIR
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        sys.stderr.write("locus export --bioimageio: needs bioimageio.spec; pip install -e '.[bioimageio]'\n")
        return 2
    try:
        path = export_bioimageio(model, args.bioimageio, weights=args.bioimageio_weights)
    except BioimageioExportError as exc:
        sys.stderr.write(f"locus export --bioimageio: {exc}\n")
        return 1
    print(f"wrote BioImage.IO package {path} for {model} (validated with bioimageio.spec)")
    return 0
