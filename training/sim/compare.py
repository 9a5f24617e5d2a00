"""``docs/sim_vs_real.png``: real HPA fields next to HPA-sim fields of the same localisations, and cell crops.

Top row: the real validation fields (never trained on); middle row: HPA-sim fields at 2048² whose primary
class matches; bottom row: one cell of each, cut by the model's crop rule (other cells zeroed, as the
classifier sees it), real left and sim right (the biggest whole cell; the mitotic cell for the spindle
field). Colours as on the HPA website: red microtubules, green protein, blue nucleus, yellow ER (red +
green).

``--stats`` prints, for the same fields, how bright each cell's protein (green) and ER marker (yellow) are over
its nucleus against its cytoplasm (:func:`nucleus_to_cytoplasm`): the measurement behind HPA-sim 2.6's
unannotated nuclear pool; and each cell's green level over the background (:func:`level_over_background`), the
measurement behind HPA-sim 2.8's lower even level in every cell. ``--mitosis`` prints how far a mitotic cell's
condensed chromatin spreads across the cell (:func:`chromatin_extent`): the real mitotic cell of the spindle field
against HPA-sim's mitotic cells, the measurement behind HPA-sim 2.7's mitotic chromatin; and how the spindle
protein fills the cell (pool, grain, peak: :func:`spindle_stain`), the measurement behind HPA-sim 2.8's spindle
protein. ``--background`` prints how ER-like the unannotated green of real and HPA-sim cells is
(:func:`er_likeness`): its correlation with the ER marker and how it gathers round the nucleus, the measurement
behind HPA-sim 2.9's background stain.

Usage::

    python -m locus.training.sim.compare --out docs/sim_vs_real.png
    python -m locus.training.sim.compare --stats
    python -m locus.training.sim.compare --mitosis
    python -m locus.training.sim.compare --background
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from locus.service.classes import CLASS_NAMES

if TYPE_CHECKING:
    from locus.service.segmentation.base import Segmenter
    from locus.training.sim.generator import SimField

__all__ = [
    "chromatin_extent",
    "background_table",
    "composite",
    "ellipse_extent",
    "er_at_spindle",
    "er_likeness",
    "level_over_background",
    "mitosis_table",
    "nucleus_to_cytoplasm",
    "sim_vs_real",
    "spindle_stain",
    "stats_table",
]

#: (folder, field id, labels) of the real validation fields, in display order.
_REAL = (
    ("../shared/hpa-samples", "89_B5_1", [6]),
    ("../shared/hpa-real", "000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0", [7, 1, 2, 0]),
    ("../shared/hpa-real", "a34d8680-bb99-11e8-b2b9-ac1f6b6435d0", [18]),
    ("../shared/hpa-real", "b6a469d8-bbad-11e8-b2ba-ac1f6b6435d0", [11]),
    ("../shared/hpa-real", "94e33c64-bb9b-11e8-b2b9-ac1f6b6435d0", [9, 16, 13]),
)
_TILE = 420
_SPINDLE = CLASS_NAMES.index("Mitotic spindle")


def composite(image: np.ndarray) -> np.ndarray:
    """HPA-style colour composite (BGR uint8) of an (H, W, 4) R, G, B, Y field.

    Parameters
    ----------
    image : numpy.ndarray
        uint8 or uint16 field.

    Returns
    -------
    numpy.ndarray
        (H, W, 3) uint8, BGR for OpenCV.
    """
    x = image.astype(np.float32)
    if image.dtype == np.uint16:
        x /= 257.0
    r, g, b, y = (x[..., k] for k in range(4))
    bgr = np.stack([b, g + 0.5 * y, r + 0.5 * y], axis=-1)
    return np.clip(bgr, 0, 255).astype(np.uint8)


def nucleus_to_cytoplasm(
    channel: np.ndarray, cells: np.ndarray, nuclei: np.ndarray, min_pixels: int = 50
) -> dict[int, float]:
    """Per cell: the channel's mean over its nucleus over its mean over the rest of the cell, above background.

    Background is the 10th percentile of the channel outside every cell (0 when no pixel is outside): a low
    percentile, as in a dense field the segmenter leaves cell edges outside. A cytoplasmic stain that stops at
    the nucleus gives about 0, one that continues over it at its own level about 1, a nuclear stain well above 1.

    Parameters
    ----------
    channel : numpy.ndarray
        (H, W) one channel of a field.
    cells, nuclei : numpy.ndarray
        (H, W) label images, nucleus ``k`` inside cell ``k``.
    min_pixels : int
        Cells whose nucleus or cytoplasm has fewer pixels are left out.

    Returns
    -------
    dict of int to float
        Cell id to ratio (each mean minus background, floored at 1e-3 before dividing).
    """
    x = channel.astype(np.float64)
    outside = cells == 0
    bg = float(np.percentile(x[outside], 10)) if outside.any() else 0.0
    out: dict[int, float] = {}
    for k in np.unique(cells):
        if k == 0:
            continue
        cell = cells == k
        nuc = cell & (nuclei == k)
        cyt = cell & ~nuc
        if nuc.sum() < min_pixels or cyt.sum() < min_pixels:
            continue
        out[int(k)] = max(float(x[nuc].mean()) - bg, 1e-3) / max(float(x[cyt].mean()) - bg, 1e-3)
    return out


def level_over_background(channel: np.ndarray, cells: np.ndarray) -> dict[int, float]:
    """Per cell: the channel's median over the cell minus its median outside every cell, in 8-bit units.

    Integer channels are put on the 8-bit scale by their type's range (a 16-bit value over 257), float channels
    are taken as they are. An unannotated cell whose protein channel sits at the background gives about 0.

    Parameters
    ----------
    channel : numpy.ndarray
        (H, W) one channel of a field.
    cells : numpy.ndarray
        (H, W) label image.

    Returns
    -------
    dict of int to float
        Cell id to level (0 background when no pixel is outside).
    """
    scale = 255.0 / np.iinfo(channel.dtype).max if channel.dtype.kind in "ui" else 1.0
    x = channel.astype(np.float64) * scale
    bg = _outside_median(x, cells)
    return {int(k): float(np.median(x[cells == k])) - bg for k in np.unique(cells) if k}


def _outside_median(x: np.ndarray, cells: np.ndarray) -> float:
    """The background of a channel: its median over the pixels outside every cell (0 when there are none)."""
    outside = cells == 0
    return float(np.median(x[outside])) if outside.any() else 0.0


def er_likeness(
    green: np.ndarray, yellow: np.ndarray, cells: np.ndarray, nuclei: np.ndarray, ring: float = 40.0
) -> dict[int, tuple[float, float]]:
    """Per cell: how much a faint protein stain looks like ER, over the cytoplasm.

    Both channels are blurred (Gaussian, 2 px). The first number is the correlation of green with the ER marker
    (yellow) over the cytoplasm; the second the perinuclear enrichment: green's mean within ``ring`` px of the
    nucleus over its mean in the rest of the cytoplasm, both above background (the median outside every cell).

    Parameters
    ----------
    green, yellow : numpy.ndarray
        (H, W) protein and ER-marker channels.
    cells, nuclei : numpy.ndarray
        (H, W) label images, nucleus ``k`` inside cell ``k``.
    ring : float
        Width in px of the perinuclear zone.

    Returns
    -------
    dict of int to (float, float)
        Cell id to (correlation, enrichment); cells with under 500 cytoplasm pixels, without a nucleus, or with
        under 200 pixels beyond the zone are left out.
    """
    g = cv2.GaussianBlur(green.astype(np.float32), (0, 0), 2.0)
    y = cv2.GaussianBlur(yellow.astype(np.float32), (0, 0), 2.0)
    bg = _outside_median(green, cells)
    out: dict[int, tuple[float, float]] = {}
    for k in np.unique(cells):
        if k == 0:
            continue
        cell = cells == k
        nuc = cell & (nuclei == k)
        cyt = cell & ~nuc
        if cyt.sum() < 500 or not nuc.any():
            continue
        near_nucleus = cv2.distanceTransform((~nuc).astype(np.uint8), cv2.DIST_L2, 5) < ring
        near, far = cyt & near_nucleus, cyt & ~near_nucleus
        if far.sum() < 200:
            continue
        gv, yv = g[cyt], y[cyt]
        corr = _pearson(gv, yv)
        out[int(k)] = (corr, max(float(g[near].mean()) - bg, 1e-3) / max(float(g[far].mean()) - bg, 1e-3))
    return out


def ellipse_extent(region: np.ndarray, cell: np.ndarray) -> tuple[float, float]:
    """Length and width of a region, each over its cell's equivalent diameter.

    The length and width are those of the ellipse of the region's second moments (4 times the square root of each
    eigenvalue of its pixel coordinates' covariance), so a stray pixel or a ragged edge moves them little. The
    equivalent diameter is that of the disc of the cell's area.

    Parameters
    ----------
    region : numpy.ndarray
        (H, W) bool mask of the region (inside the cell).
    cell : numpy.ndarray
        (H, W) bool mask of the cell.

    Returns
    -------
    tuple of float
        (length, width) over the cell's diameter; (0, 0) when the region has fewer than 3 pixels.
    """
    ys, xs = np.nonzero(region)
    if len(xs) < 3:
        return 0.0, 0.0
    eig = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(np.float64)))
    diameter = 2.0 * np.sqrt(cell.sum() / np.pi)
    return float(4.0 * np.sqrt(max(eig[1], 0.0)) / diameter), float(4.0 * np.sqrt(max(eig[0], 0.0)) / diameter)


def chromatin_extent(blue: np.ndarray, cell: np.ndarray) -> tuple[float, float]:
    """Length and width of a cell's brightest chromatin, each over the cell's equivalent diameter.

    The chromatin is the cell's pixels above half its 99th percentile of the nucleus channel (condensed mitotic
    chromosomes stand far above the rest); its extent is :func:`ellipse_extent`'s.

    Parameters
    ----------
    blue : numpy.ndarray
        (H, W) nucleus channel.
    cell : numpy.ndarray
        (H, W) bool mask of the cell.

    Returns
    -------
    tuple of float
        (length, width) over the cell's diameter; (0, 0) when fewer than 3 pixels qualify.
    """
    x = blue.astype(np.float64)
    return ellipse_extent(cell & (x > 0.5 * float(np.percentile(x[cell], 99))), cell)


def spindle_stain(green: np.ndarray, cell: np.ndarray) -> tuple[float, float, float]:
    """How a spindle protein's stain fills its mitotic cell: its pool, its grain and how point-like its peak is.

    Above background (the 10th percentile of the channel outside the cell): the pool is the cell's median over its
    99th percentile (an even glow around the spindle gives a high pool); the grain is the standard deviation of the
    channel minus its 3-px Gaussian blur over the cell more than 6 px inside its edge, over the cell's mean (a
    smooth stain gives a low grain); the peak is the 99.9th percentile over the 99th (point-like bright poles give
    over 1, a broad bright zone about 1).

    Parameters
    ----------
    green : numpy.ndarray
        (H, W) protein channel.
    cell : numpy.ndarray
        (H, W) bool mask of the cell.

    Returns
    -------
    tuple of float
        (pool, grain, peak).
    """
    x = green.astype(np.float64)
    bg = float(np.percentile(x[~cell], 10)) if (~cell).any() else 0.0
    v = x[cell] - bg
    p99 = max(float(np.percentile(v, 99)), 1e-6)
    fine = x - cv2.GaussianBlur(x, (0, 0), 3.0)
    inner = cv2.distanceTransform(cell.astype(np.uint8), cv2.DIST_L2, 5) > 6.0  # the cell's edge is no grain
    grain = float(np.std(fine[inner if inner.any() else cell])) / max(float(v.mean()), 1e-6)
    return float(np.median(v)) / p99, grain, float(np.percentile(v, 99.9)) / p99


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation of two pixel samples; 0 where either is even (within float rounding after smoothing)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if min(a64.std() / max(abs(a64.mean()), 1e-6), b64.std() / max(abs(b64.mean()), 1e-6)) < 1e-4:
        return 0.0
    return float(np.corrcoef(a64, b64)[0, 1])


def _smooth_within(x: np.ndarray, cell: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """The cell's pixels of ``x`` smoothed over the cell only (normalised convolution), as float64."""
    m = cell.astype(np.float32)
    num = cv2.GaussianBlur(x.astype(np.float32) * m, (0, 0), sigma)
    den = cv2.GaussianBlur(m, (0, 0), sigma)
    return (num[cell] / np.maximum(den[cell], 1e-6)).astype(np.float64)


def er_at_spindle(yellow: np.ndarray, red: np.ndarray, cell: np.ndarray) -> tuple[float, float]:
    """How a mitotic cell's ER marker follows its spindle: correlation with the tubulin, and brightness there.

    Both channels are smoothed within the cell (Gaussian, 4 px, normalised by the smoothed mask so that the dark
    outside does not dim the cell's edge) so that single fibres and grains do not decide it. The correlation
    is Pearson's over the cell's pixels; the brightness ratio is the ER marker's mean where the tubulin is in its top
    quarter over the cell over its mean where the tubulin is below the cell's median.

    Parameters
    ----------
    yellow : numpy.ndarray
        (H, W) ER-marker channel.
    red : numpy.ndarray
        (H, W) microtubule channel.
    cell : numpy.ndarray
        (H, W) bool mask of the mitotic cell.

    Returns
    -------
    tuple of float
        (correlation, ratio); (0, 1) for a cell of fewer than 3 pixels; correlation 0 where a channel is even.
    """
    if cell.sum() < 3:
        return 0.0, 1.0
    y = _smooth_within(yellow, cell)
    r = _smooth_within(red, cell)
    corr = _pearson(y, r)
    high = y[r > np.percentile(r, 75)]
    low = y[r < np.percentile(r, 50)]
    ratio = float(high.mean()) / max(float(low.mean()), 1e-6) if len(high) and len(low) else 1.0
    return corr, ratio


def mitosis_table(seed: int = 4242, sim_fields: int = 3) -> str:
    """Chromatin extent (:func:`chromatin_extent`) of real and HPA-sim mitotic cells, and their spindle stain.

    The real row is the mitotic cell of the spindle field (its brightest chromatin, on its own segmentation); the
    HPA-sim row pools the mitotic cells (truth masks) of the first ``sim_fields`` fields at 2048² whose primary
    localisation is the mitotic spindle.

    Parameters
    ----------
    seed : int
        HPA-sim seed (not a training seed).
    sim_fields : int
        HPA-sim fields pooled.

    Returns
    -------
    str
        Two text tables: cells, then median (range) of the chromatin's length and width over the cell's diameter;
        then, for cells that carry the spindle label, :func:`spindle_stain`'s pool, grain and peak of the protein;
        then, for every mitotic cell, :func:`er_at_spindle`'s correlation and brightness ratio.
    """
    folder, fid, _ = next(r for r in _REAL if r[2][0] == _SPINDLE)
    lines = [f"{'mitotic cells':<44} {'cells':>5}  {'length: median (range)':<20} width"]
    stain = [f"{'spindle protein (green) in spindle cells':<44} {'cells':>5}  {'pool':<20} {'grain':<20} peak"]
    er = [f"{'ER marker (yellow) in mitotic cells':<44} {'cells':>5}  {'corr with tubulin':<20} at spindle / off it"]
    img = _real_field(folder, fid)
    if img is not None:
        cells, _ = _segmenter().segment(img)
        cell = cells == _brightest_chromatin_cell(img, cells)
        length, width = chromatin_extent(img[..., 2], cell)
        lines.append(_ratio_line(f"REAL {fid[:8]}, its mitotic cell", [length], [width]))
        stain.append(_ratio_line(f"REAL {fid[:8]}, its mitotic cell", *([v] for v in spindle_stain(img[..., 1], cell))))
        real_er = er_at_spindle(img[..., 3], img[..., 0], cell)
        er.append(_ratio_line(f"REAL {fid[:8]}, its mitotic cell", *([v] for v in real_er)))
    else:
        lines.append(_absent(folder, fid))
    lengths: list[float] = []
    widths: list[float] = []
    sim_stain: list[list[float]] = [[], [], []]
    sim_er: list[list[float]] = [[], []]
    for f in _sim_fields(seed, _SPINDLE, sim_fields):
        for k in f.mitotic:
            cell = f.cells == k
            length, width = chromatin_extent(f.image[..., 2], cell)
            if length > 0:
                lengths.append(length)
                widths.append(width)
            for dst, v in zip(sim_er, er_at_spindle(f.image[..., 3], f.image[..., 0], cell), strict=True):
                dst.append(v)
            if _SPINDLE in f.cell_labels[k]:
                for dst, v in zip(sim_stain, spindle_stain(f.image[..., 1], cell), strict=True):
                    dst.append(v)
    lines.append(_ratio_line("HPA-sim, mitotic cells of spindle fields", lengths, widths))
    stain.append(_ratio_line("HPA-sim, spindle cells", *sim_stain))
    er.append(_ratio_line("HPA-sim, their ER marker", *sim_er))
    return "\n".join(lines + [""] + stain + [""] + er)


def background_table(seed: int = 4242, sim_fields: int = 8) -> str:
    """How ER-like the unannotated green of real and HPA-sim cells is (:func:`er_likeness`).

    Real rows: the negative field's cells, and the spindle field's interphase cells (all but its mitotic cell and
    the cell that shares its spindle's glow: the two brightest in green). HPA-sim rows: the negative-only cells of
    the first ``sim_fields`` negative fields at 2048², split by whether the field carries the background stain
    (cells' median green level over 3 on the 8-bit scale).

    Parameters
    ----------
    seed : int
        HPA-sim seed (not a training seed).
    sim_fields : int
        HPA-sim negative fields.

    Returns
    -------
    str
        A text table: cells, then median (range) of the green level, the correlation with the ER marker and the
        perinuclear enrichment.
    """
    seg = _segmenter()
    head = f"{'unannotated green':<44} {'cells':>5}  {'level (8 bit)':<20} {'corr(green, yellow)':<20} perinuclear"
    lines = [head]
    negative = CLASS_NAMES.index("Negative")
    for folder, fid, labels in _REAL:
        if labels[0] not in (negative, _SPINDLE):
            continue
        img = _real_field(folder, fid)
        if img is None:
            lines.append(_absent(folder, fid))
            continue
        cells, nuclei = seg.segment(img)
        level = level_over_background(img[..., 1], cells)
        keep = sorted(level, key=level.__getitem__)[: -2 if labels[0] == _SPINDLE else None]
        er = er_likeness(img[..., 1], img[..., 3], cells, nuclei)
        ks = [k for k in keep if k in er]
        name = f"REAL {fid[:8]} {'interphase cells' if labels[0] == _SPINDLE else 'negative cells'}"
        lines.append(_ratio_line(name, [level[k] for k in ks], [er[k][0] for k in ks], [er[k][1] for k in ks]))
    rows: dict[bool, list[list[float]]] = {True: [[], [], []], False: [[], [], []]}
    for f in _sim_fields(seed, negative, sim_fields):
        level = level_over_background(f.image[..., 1], f.cells)
        er = er_likeness(f.image[..., 1], f.image[..., 3], f.cells, f.nuclei)
        ks = [k for k, v in f.cell_labels.items() if v == [negative] and k in er]
        if not ks:
            continue
        stained = float(np.median([level[k] for k in ks])) > 3.0
        for k in ks:
            for dst, v in zip(rows[stained], (level[k], *er[k]), strict=True):
                dst.append(v)
    lines.append(_ratio_line("HPA-sim negative, fields with the bg stain", *rows[True]))
    lines.append(_ratio_line("HPA-sim negative, fields without it", *rows[False]))
    return "\n".join(lines)


def _segmenter() -> Segmenter:
    """The classical segmenter with the service's default settings: how every real field here is segmented."""
    from locus.service.config import PipelineSettings
    from locus.service.factory import build_segmenter

    return build_segmenter(PipelineSettings(), "classical")[0]


def _absent(folder: str, field_id: str) -> str:
    """The table line for a real field that is not beside this checkout."""
    return f"REAL {field_id[:8]}: absent ({folder} is not there)"


def _real_field(folder: str, field_id: str) -> np.ndarray | None:
    """One real validation field, or None when its folder (``../shared``) or the field is absent."""
    from locus.service.readers import find_fields, load_field

    if not Path(folder).is_dir():
        return None
    refs = [r for r in find_fields(folder, on_missing="warn") if r.id == field_id]
    return load_field(refs[0]) if refs else None


def _ratio_line(name: str, *columns: list[float]) -> str:
    """One table row: the name, the count of the first column, then each column's median (range)."""

    def part(v: list[float]) -> str:
        a = np.array(v)
        if not len(a):
            return "-"
        return f"{np.median(a):.2f} ({a.min():.2f}-{a.max():.2f})"

    parts = [f"{part(c):<20}" for c in columns[:-1]] + [part(columns[-1])]
    return f"{name:<44} {len(columns[0]):>5}  " + " ".join(parts)


def stats_table(seed: int = 4242, sim_fields: int = 3) -> str:
    """Nucleus-to-cytoplasm ratios and green levels of the real fields (their own segmentation) and of HPA-sim.

    HPA-sim rows pool the cells that carry exactly the real field's first label, over the first ``sim_fields``
    fields at 2048² whose primary localisation it is.

    Parameters
    ----------
    seed : int
        HPA-sim seed (not a training seed).
    sim_fields : int
        HPA-sim fields per row.

    Returns
    -------
    str
        A text table: cells, then median (range) of the nucleus-to-cytoplasm ratio for green and for yellow, and
        of the green level over background (:func:`level_over_background`).
    """
    seg = _segmenter()
    lines = [
        f"{'field':<44} {'cells':>5}  {'nucleus/cytoplasm:':<20} {'':<20} green over background",
        f"{'':<44} {'':>5}  {'green':<20} {'yellow':<20} (8 bit, cell median)",
    ]
    for folder, fid, labels in _REAL:
        img = _real_field(folder, fid)
        if img is not None:
            cells, nuclei = seg.segment(img)
            g, y = (list(nucleus_to_cytoplasm(img[..., c], cells, nuclei).values()) for c in (1, 3))
            level = list(level_over_background(img[..., 1], cells).values())
            lines.append(_ratio_line(f"REAL {fid[:8]} {_short(labels)[:30]}", g, y, level))
        else:
            lines.append(_absent(folder, fid))
        green: list[float] = []
        yellow: list[float] = []
        levels: list[float] = []
        for f in _sim_fields(seed, labels[0], sim_fields):
            keep = {k for k, v in f.cell_labels.items() if v == [labels[0]]}
            for src, dst in ((1, green), (3, yellow)):
                r = nucleus_to_cytoplasm(f.image[..., src], f.cells, f.nuclei)
                dst.extend(v for k, v in r.items() if k in keep)
            levels.extend(v for k, v in level_over_background(f.image[..., 1], f.cells).items() if k in keep)
        lines.append(_ratio_line(f"HPA-sim {CLASS_NAMES[labels[0]][:30]} only", green, yellow, levels))
    return "\n".join(lines)


def _label(tile: np.ndarray, lines: list[str]) -> np.ndarray:
    out = tile.copy()
    for i, text in enumerate(lines):
        org = (8, 22 + 20 * i)
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5 if i else 0.58, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5 if i else 0.58, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _short(labels: list[int]) -> str:
    return ", ".join(CLASS_NAMES[c].split(" and ")[0] for c in labels)


def _biggest_inner_cell(cells: np.ndarray) -> int:
    h, w = cells.shape
    border = set(np.unique(np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]])).tolist())
    ids, counts = np.unique(cells, return_counts=True)
    best = [(c, i) for i, c in zip(ids, counts, strict=True) if i and int(i) not in border]
    return int(max(best)[1]) if best else int(ids[np.argmax(counts[1:]) + 1])


def _brightest_chromatin_cell(image: np.ndarray, cells: np.ndarray) -> int:
    """The cell whose nucleus channel is brightest at its 99th percentile: condensed mitotic chromatin."""
    blue = image[..., 2].astype(np.float32)
    ids = [int(i) for i in np.unique(cells) if i]
    return max(ids, key=lambda i: float(np.percentile(blue[cells == i], 99)))


def _crop_tile(image: np.ndarray, cells: np.ndarray, cell_id: int, side: int) -> np.ndarray:
    from locus.service.crop import CropRule, crop_cell

    x = crop_cell(image, cells, cell_id, CropRule(size=96))
    rgb = composite(np.clip(x, 0, 255).astype(np.uint8))
    return cv2.resize(rgb, (side, side), interpolation=cv2.INTER_NEAREST)


def _sim_index(seed: int, primary: int, start: int = 0) -> int:
    """The first field whose drawn localisation set starts with ``primary`` (drawn before any geometry, so a
    64² field of the same seed and index tells it cheaply)."""
    from locus.training.sim.generator import SimConfig, generate_field

    for i in range(start, start + 400):
        if generate_field(i, seed, SimConfig(size=64, noise=0.0)).field_labels[:1] == [primary]:
            return i
    return start


def _sim_fields(seed: int, primary: int, n: int) -> Iterator[SimField]:
    """The first ``n`` HPA-sim fields at 2048² whose primary localisation is ``primary``."""
    from locus.training.sim.generator import SimConfig, generate_field

    start = 0
    for _ in range(n):
        idx = _sim_index(seed, primary, start)
        start = idx + 1
        yield generate_field(idx, seed, SimConfig(size=2048))


def sim_vs_real(out: str | Path, seed: int = 4242) -> Path:
    """Draw the comparison picture.

    Parameters
    ----------
    out : str or Path
        PNG to write.
    seed : int
        HPA-sim seed of the simulated fields (not a training seed).

    Returns
    -------
    Path
        The picture.
    """
    from locus.training.sim.generator import SimConfig, generate_field

    seg = _segmenter()
    top, mid, bottom = [], [], []
    half = _TILE // 2
    for folder, fid, labels in _REAL:
        img = _real_field(folder, fid)
        if img is not None:
            cells, _ = seg.segment(img)
            rtile = cv2.resize(composite(img), (_TILE, _TILE), interpolation=cv2.INTER_AREA)
            # The mitotic-spindle field shows its mitotic cell; the others their biggest whole cell.
            pick = _brightest_chromatin_cell(img, cells) if labels[0] == _SPINDLE else _biggest_inner_cell(cells)
            rcrop = _crop_tile(img, cells, pick, half)
            top.append(_label(rtile, [f"REAL {fid[:8]} ({img.shape[1]}px)", _short(labels)]))
        else:
            top.append(_label(np.zeros((_TILE, _TILE, 3), np.uint8), ["real field absent", _short(labels)]))
            rcrop = np.zeros((half, half, 3), np.uint8)
        idx = _sim_index(seed, labels[0])
        f = generate_field(idx, seed, SimConfig(size=2048))
        stile = cv2.resize(composite(f.image), (_TILE, _TILE), interpolation=cv2.INTER_AREA)
        mid.append(_label(stile, [f"HPA-sim {idx} (2048px)", f"{_short(f.image_labels)}; {f.cells.max()} cells"]))
        spindle_cells = [k for k in f.mitotic if _SPINDLE in f.cell_labels[k]]
        pick = spindle_cells[0] if labels[0] == _SPINDLE and spindle_cells else _biggest_inner_cell(f.cells)
        scrop = _crop_tile(f.image, f.cells, pick, half)
        pair = np.concatenate([rcrop, scrop], axis=1)
        pair = np.concatenate([pair, np.zeros((half, _TILE, 3), np.uint8)], axis=0)[: half + 30]
        bottom.append(_label(pair[:, :, :], ["crop rule: real | sim"])[: half + 30])
    grid = np.concatenate([np.concatenate(top, 1), np.concatenate(mid, 1), np.concatenate(bottom, 1)], 0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), grid)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line entry: ``python -m locus.training.sim.compare --out PATH``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/sim_vs_real.png")
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument(
        "--stats", action="store_true", help="print nucleus-to-cytoplasm ratios instead of drawing the picture"
    )
    parser.add_argument(
        "--mitosis", action="store_true", help="print the chromatin extent of real and HPA-sim mitotic cells"
    )
    parser.add_argument(
        "--background",
        action="store_true",
        help="print how ER-like the unannotated green of real and HPA-sim cells is",
    )
    parser.add_argument("--sim-fields", type=int, default=3, help="HPA-sim fields per row of --stats and --mitosis")
    args = parser.parse_args(argv)
    if args.background:
        print(background_table(args.seed, max(args.sim_fields, 1)))
        return 0
    if args.mitosis:
        print(mitosis_table(args.seed, args.sim_fields))
        return 0
    if args.stats:
        print(stats_table(args.seed, args.sim_fields))
        return 0
    print(sim_vs_real(args.out, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
