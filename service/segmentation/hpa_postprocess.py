"""Post-processing of the HPA segmentation networks' probability maps into labels (``label_cell``).

The HPA nuclei and cell networks each give a three-channel probability map per
pixel: channel 0 background, channel 1 the border (touching) class, channel 2
the interior class. :func:`label_cell` turns a (nuclei map, cell map) pair into
nucleus and cell label images in one of two modes, both written for this project
from the published description of HPA's ``label_cell`` (``hpacellseg``; its code
is not part of this repository and none of it is copied here).

Steps shared by both modes (areas and lengths in full-resolution pixels):

1. Nucleus seeds: ``nuclei interior * (1 - (nuclei border + cell border) > 0.05) > 0.15``;
   seeds under 500 px dropped.
2. Nucleus mask: ``nuclei interior > 0.4``, holes under 1000 px filled; a
   watershed of the seeds over it with watershed lines; nuclei under 2500 px dropped.
3. Cells: ``cell interior > max(0.22, 0.5 * Otsu(cell interior))`` (and, see below,
   ``cell border <= 0.05``); a watershed on ``-max(interior, threshold)`` seeded by the
   nuclei; cells under 5500 px dropped; a closing with a disk of radius 6; holes filled.
4. Regrowth: a second watershed on the same landscape lets the cells grow into the
   border pixels (``cell border > 0.05``) connected to them; holes filled; cells under
   5500 px dropped; each nucleus keeps the part of it inside its cell.

``hpa_compat=True`` reproduces HPA's procedure step by step, including two
defects of the official code:

* the border sum is computed on the ``uint8`` maps, so ``nuclei border + cell border``
  wraps past 255 (250 + 20 reads as 14): pixels where both borders are fairly
  likely count as border-free and seed nuclei, which lets one seed bridge two
  touching nuclei;
* the cell-border exclusion is ``np.invert`` of an ``int8`` 0/1 mask, which is -1 or -2
  and never 0, so border pixels are never removed from the first cell watershed;

and its other choices: seeds numbered 4-connected *before* they are cut to the
nucleus mask (one seed spanning two nuclei stays one nucleus), a flat watershed
over the mask (breadth-first from the seeds), small nucleus-mask holes filled
even where they touch the image edge, cell ids cast to ``uint8`` before the
closing (cell 256 vanishes, 257 shares an id with 1), every hole filled whatever
its size, the cells renumbered as 4-connected pieces, and each label's boundary
pixels cleared (a 2-px gap between touching cells, a 1-px rim off every other
edge). The maps are normally at a reduced scale (1/4); the compat mode runs there
with HPA's areas scaled by ``scale²`` (500 px -> 31 px at 1/4) and clears the
label edges at full resolution (``output_shape``), where the official clears
them, because a full-resolution pixel is a quarter of a map pixel.
``tests/service/test_hpa_postprocess.py`` checks it against a literal
full-resolution reading of the procedure: on HPA-sim maps (clean and noisy) and
on touching-nuclei maps, 99-100% of that reading's cells are matched at IoU >= 0.9;
on very noisy maps, where the procedure itself breaks cells into fragments whose
outline depends on detail finer than a map pixel, 78%
(``benchmarks/bench_hpa_postprocess.py --reference``).

The default mode (``hpa_compat=False``) fixes the two defects: the border sum is
taken in floating point and border pixels are kept out of the first watershed,
so touching nuclei stay apart. It also cuts the seeds to the nucleus mask and
erodes them by 1 px at 1/4 (``seed_erosion``) before numbering them
(8-connected), which cuts the thin bridges noise leaves between touching
nuclei; keeps every cell id through every step (touching cells are never merged
or split by a relabelling); fills only holes smaller than a minimum cell
(background enclosed by a ring of touching cells stays background); and leaves
no gap between touching cells. Its regrowth (step 4) is HPA's watershed
(``regrow="watershed"``); ``regrow="nearest"`` (each border pixel to the nearest
cell) measured slightly worse against truth on noisy maps. Measured against
truth (``benchmarks/bench_hpa_postprocess.py``, cells matched at IoU >= 0.5,
2048² fields at 1/4): F1 1.000 vs HPA's 0.852 on 128 touching dividing cells
(0.958 vs 0.436 with noisy maps), 0.996-1.000 on HPA-sim maps in both modes; the
README's segmentation section has the table.

Watersheds are restricted to the pixels they can change (the connected
components of the unlabelled part of the mask that more than one label reaches,
with the labelled pixels next to them), which gives the same flooding as one
watershed over the whole image for a fraction of the work. Measured on one core
of this project's 2-core machine (``benchmarks/bench_hpa_postprocess.py``), 512²
maps of a 2048² field, labels brought back to 2048²: compat 39-55 ms and default
34-48 ms on HPA-sim fields (clean or noisy), compat 49-83 ms and default 46-80 ms
on a dense field of 128 touching cells (the higher figures on noisy maps).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import cv2
import numpy as np
from skimage.filters import threshold_otsu
from skimage.measure import label as sk_label
from skimage.segmentation import watershed

__all__ = [
    "HpaPostprocessConfig",
    "clear_label_edges",
    "fill_label_holes",
    "label_cell",
    "label_nuclei",
    "otsu_threshold_01",
    "to_probability_map",
    "to_uint8_map",
]

_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


@dataclass(frozen=True)
class HpaPostprocessConfig:
    """Thresholds and mode of :func:`label_cell`; areas and lengths in full-resolution pixels.

    Parameters
    ----------
    seed_threshold : float
        Nucleus seeds: ``interior * (1 - border sum > 1 - border_sum_max) > seed_threshold``.
    border_sum_max : float
        A seed pixel's (nuclei border + cell border) must be below this.
    nucleus_threshold : float
        Nucleus mask: ``interior > nucleus_threshold``.
    min_seed_area : float
        Smallest nucleus seed kept.
    max_nucleus_hole : float
        Holes of the nucleus mask smaller than this are filled.
    min_nucleus_area : float
        Smallest nucleus kept.
    cell_threshold_floor : float
        Lowest cell-interior threshold.
    cell_otsu_factor : float
        Multiplier of the Otsu threshold of the cell interior.
    cell_border_threshold : float
        Pixels whose cell-border probability exceeds this are border pixels.
    min_cell_area : float
        Smallest cell kept.
    closing_radius : float
        Radius of the disk of the closing of the cell labels.
    max_cell_hole : float
        Default mode: holes of the cell mask smaller than this are filled (HPA fills
        every hole, and ``hpa_compat`` does too; background enclosed by a ring of
        touching cells is a hole as well, so the default keeps holes of at least a
        minimum cell's area as background).
    seed_erosion : float
        Default mode: the nucleus seeds are eroded by a square of this half-side (rounded
        at the maps' scale: 4 px -> 1 px at 1/4) before they are numbered, which cuts the
        thin bridges noise leaves between touching nuclei; 0 disables it. HPA's
        ``label_cell`` does not erode (ignored with ``hpa_compat``).
    hpa_compat : bool
        Reproduce HPA's official post-processing, defects included (see the module
        docstring); False: the default mode, defects fixed.
    regrow : {"watershed", "nearest"}
        Default mode: how cells grow into border pixels; ``"watershed"`` (HPA's second
        watershed on ``-interior``) or ``"nearest"`` (each border pixel to the nearest cell).
        Ignored with ``hpa_compat``.
    """

    seed_threshold: float = 0.15
    border_sum_max: float = 0.95
    nucleus_threshold: float = 0.4
    min_seed_area: float = 500.0
    max_nucleus_hole: float = 1000.0
    min_nucleus_area: float = 2500.0
    cell_threshold_floor: float = 0.22
    cell_otsu_factor: float = 0.5
    cell_border_threshold: float = 0.05
    min_cell_area: float = 5500.0
    closing_radius: float = 6.0
    max_cell_hole: float = 5500.0
    seed_erosion: float = 4.0
    hpa_compat: bool = False
    regrow: Literal["watershed", "nearest"] = "watershed"

    def __post_init__(self) -> None:
        if self.regrow not in ("watershed", "nearest"):
            raise ValueError(f"regrow must be 'watershed' or 'nearest', got {self.regrow!r}")

    def to_dict(self) -> dict:
        """Return the options as a JSON-serialisable dict."""
        return asdict(self)


def to_probability_map(pred: np.ndarray) -> np.ndarray:
    """Bring a network output map to (H, W, 3) float32 probabilities in [0, 1].

    Parameters
    ----------
    pred : numpy.ndarray
        (H, W, 3) map, ``uint8`` 0-255 (as ``hpacellseg`` returns it) or float in [0, 1].

    Returns
    -------
    numpy.ndarray
        (H, W, 3) float32 in [0, 1].

    Raises
    ------
    ValueError
        The array is not (H, W, 3).
    """
    pred = np.asarray(pred)
    if pred.ndim != 3 or pred.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) probability map, got shape {pred.shape}")
    if pred.dtype == np.uint8:
        return pred.astype(np.float32) * np.float32(1.0 / 255.0)
    return pred.astype(np.float32, copy=False)


def to_uint8_map(pred: np.ndarray) -> np.ndarray:
    """Bring a network output map to (H, W, 3) ``uint8`` 0-255, as ``hpacellseg`` hands it to ``label_cell``.

    Parameters
    ----------
    pred : numpy.ndarray
        (H, W, 3) map, ``uint8`` (returned as is) or float in [0, 1]: scaled by 255 in its own
        precision and rounded half to even, as scikit-image's ``img_as_ubyte`` does.

    Returns
    -------
    numpy.ndarray
        (H, W, 3) ``uint8``.

    Raises
    ------
    ValueError
        The array is not (H, W, 3).
    """
    pred = np.asarray(pred)
    if pred.ndim != 3 or pred.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) probability map, got shape {pred.shape}")
    if pred.dtype == np.uint8:
        return pred
    if pred.dtype == np.float32:
        # 255 x in float32, rounded half to even and saturated (np.rint + clip); probabilities are not negative.
        return cv2.convertScaleAbs(np.maximum(pred, np.float32(0.0)), alpha=255.0)
    return np.clip(np.rint(pred.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def otsu_threshold_01(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (histogram of ``bins`` bins).

    Parameters
    ----------
    values : numpy.ndarray
        Values, any shape.
    bins : int
        Histogram bins over [0, 1].

    Returns
    -------
    float
        The threshold; 0.5 for an empty input, the value itself for a constant one.
    """
    hist = cv2.calcHist([np.ascontiguousarray(values, dtype=np.float32)], [0], None, [bins], [0.0, 1.0 + 1e-6]).ravel()
    total = hist.sum()
    if total == 0:
        return 0.5
    p = hist.astype(np.float64) / total
    centres = (np.arange(bins) + 0.5) / bins
    w0 = np.cumsum(p)
    m = np.cumsum(p * centres)
    mt = m[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0.0
    if not between[:-1].any():
        return float(centres[int(np.argmax(p))])
    k = int(np.argmax(between[:-1]))
    return float((k + 1) / bins)


def _otsu_uint8_as_skimage(values: np.ndarray) -> float:
    """Otsu's threshold of ``values / 255`` (``uint8`` values) exactly as ``skimage.filters.threshold_otsu`` gives it.

    scikit-image bins the float image into 256 bins between its minimum and maximum and
    returns a bin centre; the same histogram is built here from the 256 possible values'
    counts, which costs one ``bincount`` instead of a histogram of every pixel.
    """
    counts = np.bincount(values.ravel(), minlength=256)
    levels = np.arange(256) / 255.0
    present = np.flatnonzero(counts)
    if present.size == 0:
        return 0.0
    lo, hi = levels[present[0]], levels[present[-1]]
    if lo == hi:
        return float(lo)
    hist, edges = np.histogram(levels, bins=256, range=(lo, hi), weights=counts)
    return float(threshold_otsu(hist=(hist, (edges[:-1] + edges[1:]) / 2)))


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a binary mask: (int32 labels, area per label, background 0 included)."""
    _, comp = cv2.connectedComponents(mask.view(np.uint8), connectivity=connectivity, ltype=cv2.CV_32S)
    return comp, np.bincount(comp.ravel())


def _drop_small_components(mask: np.ndarray, min_area: float, connectivity: int = 8) -> np.ndarray:
    """Binary mask without its components smaller than ``min_area``."""
    if min_area <= 1 or not mask.any():
        return mask
    comp, areas = _components(mask, connectivity)
    keep = areas >= min_area
    keep[0] = False
    return keep[comp]


def _holes(mask: np.ndarray, max_area: float = np.inf, edge: bool = False, connectivity: int = 4) -> np.ndarray:
    """Background components of a mask under ``max_area`` (with ``edge``, also edge-touching ones)."""
    comp, areas = _components(~mask, connectivity)
    if len(areas) <= 1:
        return np.zeros_like(mask)
    inside = areas < max_area
    if not edge:
        for side in (comp[0], comp[-1], comp[:, 0], comp[:, -1]):
            inside[side] = False
    inside[0] = False
    return inside[comp]


def _fill_small_holes(mask: np.ndarray, max_area: float, edge: bool = False) -> np.ndarray:
    """Binary mask with its holes (4-connected background) under ``max_area`` filled."""
    if max_area <= 1:
        return mask
    return mask | _holes(mask, max_area, edge)


def _seeded_watershed(
    landscape: np.ndarray, markers: np.ndarray, mask: np.ndarray, watershed_line: bool = False
) -> np.ndarray:
    """``skimage.segmentation.watershed(landscape, markers, mask=mask)`` (4-connected), component by component.

    A 4-connected component of ``mask`` holding one marker id is flooded by it
    whole (what the watershed does); the components with several ids are flooded
    by one watershed restricted to them, inside their common bounding box (which
    keeps the raster order, so ties break as in one watershed over the image);
    components without markers stay 0. Markers outside ``mask`` are ignored, as
    scikit-image does.
    """
    out = np.zeros(markers.shape, dtype=np.int32)
    if not mask.any():
        return out
    n, comp, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    seeded = (markers > 0) & mask
    if not seeded.any():
        return out
    # Per component, the smallest and largest marker id: equal means one id floods it whole.
    where_comp, ids = comp[seeded], markers[seeded].astype(np.int32, copy=False)
    lo = np.full(n, np.iinfo(np.int32).max, dtype=np.int32)
    hi = np.zeros(n, dtype=np.int32)
    np.minimum.at(lo, where_comp, ids)
    np.maximum.at(hi, where_comp, ids)
    lut = np.where(lo == hi, hi, 0).astype(np.int32)
    lut[0] = 0
    out = lut[comp]
    contested = (hi > 0) & (lo != hi)
    if contested.any():
        x0, y0 = stats[contested, 0].min(), stats[contested, 1].min()
        x1 = (stats[contested, 0] + stats[contested, 2]).max()
        y1 = (stats[contested, 1] + stats[contested, 3]).max()
        box = (slice(y0, y1), slice(x0, x1))
        own = contested[comp[box]]
        ws = watershed(landscape[box], np.where(own, markers[box], 0), mask=own, watershed_line=watershed_line)
        out[box][own] = ws[own]
    return out


def _grow_watershed(landscape: np.ndarray, labels: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``watershed(landscape, labels, mask=(labels > 0) | allowed)``, flooding only what can change.

    Labelled pixels keep their labels; the unlabelled allowed pixels are flooded
    from the labelled pixels next to them (the only markers that can reach them).
    """
    todo = allowed & (labels == 0)
    if not todo.any():
        return labels
    near = cv2.dilate(todo.view(np.uint8), _CROSS).view(bool) & (labels > 0)
    grown = _seeded_watershed(landscape, np.where(near, labels, 0), todo | near)
    out = labels.copy()
    out[todo] = grown[todo]
    return out


def _nearest_fill(labels: np.ndarray, todo: np.ndarray) -> np.ndarray:
    """Give each ``todo`` pixel connected (8-connected through ``todo``) to a labelled pixel the nearest label.

    Nearest is Euclidean (a distance transform).
    """
    todo = todo & (labels == 0)
    if not todo.any():
        return labels
    fg = labels > 0
    # Only todo pixels whose 8-connected component (with the labelled pixels) holds a label.
    n, comp = cv2.connectedComponents((todo | fg).view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    has_label = np.zeros(n, dtype=bool)
    has_label[comp[fg]] = True
    has_label[0] = False
    todo &= has_label[comp]
    if not todo.any():
        return labels
    _, nearest = cv2.distanceTransformWithLabels(
        (~fg).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5, labelType=cv2.DIST_LABEL_PIXEL
    )
    # nearest numbers the zero pixels of the input (the labelled pixels) 1.. in raster order.
    lut = np.zeros(int(fg.sum()) + 1, dtype=np.int32)
    lut[1:] = labels[fg]
    out = labels.copy()
    out[todo] = lut[nearest[todo]]
    return out


def _nearest_fill_flat(landscape: np.ndarray, labels: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """:func:`_nearest_fill` with :func:`_grow_watershed`'s signature (the landscape is not used)."""
    return _nearest_fill(labels, allowed)


def fill_label_holes(labels: np.ndarray, max_area: float = np.inf) -> np.ndarray:
    """Fill the holes of a label image: each hole pixel takes the nearest surrounding label.

    Parameters
    ----------
    labels : numpy.ndarray
        (H, W) int32 labels, 0 = background.
    max_area : float
        Only holes smaller than this are filled (background enclosed by a ring of
        several cells is larger than a cell and stays background).

    Returns
    -------
    numpy.ndarray
        (H, W) int32 labels without holes under ``max_area``.
    """
    holes = _holes(labels > 0, max_area)
    if not holes.any():
        return labels
    return _nearest_fill(labels, holes)


def _relabel(labels: np.ndarray, size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Renumber labels 1..n in order of their old ids; return (labels, lookup old -> new of >= ``size`` entries)."""
    top = max(int(labels.max()) if labels.size else 0, size - 1)
    present = np.bincount(labels.ravel(), minlength=top + 1) > 0
    present[0] = False
    lut = np.zeros(top + 1, dtype=np.int32)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    return lut[labels], lut


def _drop_small_labels(labels: np.ndarray, min_area: float) -> np.ndarray:
    """Labels with fewer than ``min_area`` pixels (counted per id, parts included) set to 0."""
    if min_area <= 1 or not labels.any():
        return labels
    sizes = np.bincount(labels.ravel())
    small = (sizes > 0) & (sizes < min_area)
    small[0] = False
    if not small.any():
        return labels
    lut = np.arange(len(sizes), dtype=np.int32)
    lut[small] = 0
    return lut[labels]


def _disk(radius: float) -> np.ndarray:
    """Flat disk footprint: the pixels within ``radius`` of the centre (``skimage.morphology.disk`` for whole radii)."""
    r = int(np.floor(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx * xx + yy * yy <= radius * radius).astype(np.uint8)


def clear_label_edges(labels: np.ndarray) -> np.ndarray:
    """Clear every labelled pixel that has a 4-neighbour with another value (background included).

    This is the official ``label_cell``'s last edge clearing (thick boundaries, 4-connected):
    touching cells end up 2 px apart and every other edge loses a 1-px rim.

    Parameters
    ----------
    labels : numpy.ndarray
        (H, W) integer labels, 0 = background, ids below 65535.

    Returns
    -------
    numpy.ndarray
        (H, W) int32 labels with the edge pixels set to 0.
    """
    lab = np.asarray(labels)
    if not lab.any():
        return lab.astype(np.int32, copy=False)
    lab16 = lab.astype(np.uint16)
    # cv2 ignores pixels outside the image here, as scikit-image's reflected border does.
    same = cv2.dilate(lab16, _CROSS) == cv2.erode(lab16, _CROSS)
    return np.where(same, lab, 0).astype(np.int32, copy=False)


def _upsample_labels(labels: np.ndarray, shape: tuple[int, int], edges_of: np.ndarray | None = None) -> np.ndarray:
    """Labels brought to ``shape`` (nearest neighbour), optionally cleared where ``edges_of``'s edges fall there.

    ``edges_of`` is a label image of ``labels``' size (the cells, for the cells and their
    nuclei): at full size, each pixel of it with a 4-neighbour of another value is
    cleared (:func:`clear_label_edges`), in ``labels`` too. With whole factors each map
    pixel becomes a block and those edges are the blocks' rims on the sides where the
    neighbouring block differs; they are cleared on those rows and columns directly.
    """
    h, w = labels.shape
    H, W = shape
    if (h, w) == (H, W) or H % h or W % w:
        if (h, w) != (H, W):
            labels = cv2.resize(labels, (W, H), interpolation=cv2.INTER_NEAREST_EXACT)
        labels = np.ascontiguousarray(labels, dtype=np.int32)
        if edges_of is None:
            return labels
        ref = (
            edges_of
            if edges_of.shape == (H, W)
            else cv2.resize(edges_of, (W, H), interpolation=cv2.INTER_NEAREST_EXACT)
        )
        return np.where(clear_label_edges(ref) > 0, labels, 0).astype(np.int32, copy=False)
    fy, fx = H // h, W // w
    out = cv2.resize(labels.astype(np.int32, copy=False), (W, H), interpolation=cv2.INTER_NEAREST_EXACT)
    if edges_of is not None:
        ref = edges_of
        up = np.zeros(ref.shape, dtype=bool)
        up[1:] = ref[1:] != ref[:-1]
        left = np.zeros(ref.shape, dtype=bool)
        left[:, 1:] = ref[:, 1:] != ref[:, :-1]
        down = np.zeros(ref.shape, dtype=bool)
        down[:-1] = up[1:]
        right = np.zeros(ref.shape, dtype=bool)
        right[:, :-1] = left[:, 1:]
        # The first and last full-size row of each block row, the first and last column of each block column.
        out[0::fy][np.repeat(up, fx, axis=1)] = 0
        out[fy - 1 :: fy][np.repeat(down, fx, axis=1)] = 0
        out[:, 0::fx][np.repeat(left, fy, axis=0)] = 0
        out[:, fx - 1 :: fx][np.repeat(right, fy, axis=0)] = 0
    return out


def _fill_holes_compat(labels: np.ndarray) -> np.ndarray:
    """The official hole filling of a label image, read at map scale.

    The official clears every label's boundary pixels, fills every hole of what is
    left and numbers its 4-connected components. A full-resolution boundary pixel
    is a quarter of a map pixel, so here only its effect on connectivity is kept:
    the pixels where two labels touch separate them (the official's 2-px gap), a
    hole is filled when those gaps do not connect it to the outside (a hole
    surrounded by one cell; not background enclosed by a ring of touching cells),
    and each label's pixels are numbered as 4-connected pieces. The rim the
    official clears is cleared later, at full resolution (:func:`clear_label_edges`).

    Returns
    -------
    numpy.ndarray
        (H, W) int32, pieces numbered 1..n.
    """
    lab = labels.astype(np.uint16)
    fg = lab > 0
    if not fg.any():
        return np.zeros(lab.shape, dtype=np.int32)
    # A labelled pixel touches another label when a 4-neighbour's (nonzero) value differs.
    hi = cv2.dilate(lab, _CROSS)
    lo = cv2.erode(np.where(fg, lab, np.uint16(65535)), _CROSS)
    interface = fg & ((hi != lab) | (lo != lab))
    core = fg & ~interface
    # 8-connected background: it passes where a label's pixels meet only at a corner (whose rim the
    # official clears) and from the gap between two labels to the background around them.
    filled = core | _holes(core, connectivity=8)
    n, comp = cv2.connectedComponents(filled.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    out = comp
    # Interface pixels not inside a filled hole join the piece of a 4-neighbour of their own label.
    rest = np.flatnonzero(fg & ~filled)
    if rest.size:
        h, w = lab.shape
        flat_out = out.ravel()
        flat_lab = lab.ravel()
        for _ in range(4):
            if rest.size == 0:
                break
            rr, cc = np.divmod(rest, w)
            got = np.zeros(rest.size, dtype=np.int32)
            for dr, dc in ((-1, 0), (0, -1), (0, 1), (1, 0)):
                nr, nc = rr + dr, cc + dc
                ok = (got == 0) & (nr >= 0) & (nr < h) & (nc >= 0) & (nc < w)
                j = np.where(ok, nr * w + nc, 0)
                ok &= (flat_out[j] > 0) & (flat_lab[j] == flat_lab[rest])
                got[ok] = flat_out[j[ok]]
            done = got > 0
            if not done.any():
                break
            flat_out[rest[done]] = got[done]
            rest = rest[~done]
    return out


def _nuclei_compat(npred: np.ndarray, cpred: np.ndarray, area: float, cfg: HpaPostprocessConfig) -> np.ndarray:
    """Nucleus labels as the official computes them (steps 1-2, ``uint8`` maps, defects included)."""
    interior = npred[:, :, 2]
    wrapped = npred[:, :, 1] + cpred[:, :, 1]  # uint8 + uint8: wraps past 255, as the official's sum does
    levels = np.arange(256) / 255.0
    border_free = (1.0 - levels) > 1.0 - cfg.border_sum_max  # "1 - sum / 255 > 0.05", per uint8 value
    seeds = (levels > cfg.seed_threshold)[interior] & border_free[wrapped]
    # Seeds are numbered 4-connected (small ones dropped) before the watershed cuts them to the mask.
    markers, areas = _components(seeds, 4)
    keep = areas >= cfg.min_seed_area * area
    keep[0] = False
    if not keep.any():
        return np.zeros(interior.shape, dtype=np.int32)
    markers = np.where(keep[markers], markers, 0)
    mask = (levels > cfg.nucleus_threshold)[interior]
    mask = _fill_small_holes(mask, cfg.max_nucleus_hole * area, edge=True)
    mask = _drop_small_components(mask, 8 * area, connectivity=4)
    flat = np.zeros(interior.shape, dtype=np.float32)  # the official floods the binary mask: a flat landscape
    nuclei = _seeded_watershed(flat, markers, mask, watershed_line=True)
    nuclei = _drop_small_labels(nuclei, cfg.min_nucleus_area * area)
    return sk_label(nuclei, connectivity=2).astype(np.int32, copy=False)


def _label_cell_compat(
    npred: np.ndarray, cpred: np.ndarray, area: float, radius: float, cfg: HpaPostprocessConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The official ``label_cell`` at map scale, defects included (edges not yet cleared)."""
    nuclei = _nuclei_compat(npred, cpred, area, cfg)
    empty = np.zeros(nuclei.shape, dtype=np.int32)
    if not nuclei.any():
        return empty, empty.copy()
    interior = cpred[:, :, 2]
    levels = np.arange(256) / 255.0
    threshold = max(cfg.cell_threshold_floor, cfg.cell_otsu_factor * _otsu_uint8_as_skimage(interior))
    # np.invert of the int8 0/1 border mask is -1/-2, never 0: border pixels stay in the region.
    region = (levels > threshold)[interior]
    landscape = -np.maximum(interior.astype(np.float32), np.float32(255.0 * threshold))
    cells = _seeded_watershed(landscape, nuclei, region)
    cells = _drop_small_labels(cells, cfg.min_cell_area * area)
    cells = (cells & 0xFF).astype(np.uint8)  # the official casts cell ids to uint8 here
    cells = cv2.morphologyEx(cells, cv2.MORPH_CLOSE, _disk(radius))
    cells = _fill_holes_compat(cells)
    border = (levels > cfg.cell_border_threshold)[cpred[:, :, 1]]
    cells = _grow_watershed(landscape, cells, border)
    cells = _fill_holes_compat(cells)
    cells = _drop_small_labels(cells, cfg.min_cell_area * area)
    cells, _ = _relabel(cells)
    # Nuclei: the nucleus pixels inside cells, in 8-connected pieces of at least the minimum area, take their cell's id.
    inside = (cells > 0) & (nuclei > 0)
    keep = _drop_small_components(inside, cfg.min_nucleus_area * area, connectivity=8)
    return np.where(keep, cells, 0).astype(np.int32), cells


def label_nuclei(
    nuclei_pred: np.ndarray, cell_pred: np.ndarray, scale: float = 1.0, config: HpaPostprocessConfig | None = None
) -> np.ndarray:
    """Nucleus labels of the default mode (steps 1-2 of :func:`label_cell`, defects fixed).

    Parameters
    ----------
    nuclei_pred, cell_pred : numpy.ndarray
        (H, W, 3) probability maps (see :func:`to_probability_map`).
    scale : float
        Scale of the maps relative to the full-resolution field (areas scale by ``scale²``).
    config : HpaPostprocessConfig, optional
        Thresholds.

    Returns
    -------
    numpy.ndarray
        (H, W) int32 nucleus labels (ids need not be consecutive).
    """
    cfg = config or HpaPostprocessConfig()
    npred = to_probability_map(nuclei_pred)
    cpred = to_probability_map(cell_pred)
    area = scale * scale
    interior = npred[:, :, 2]
    # The border sum in floating point: two likely borders add up instead of wrapping.
    seeds = (interior > cfg.seed_threshold) & ((npred[:, :, 1] + cpred[:, :, 1]) < cfg.border_sum_max)
    seeds = _drop_small_components(seeds, cfg.min_seed_area * area)
    mask = interior > cfg.nucleus_threshold
    mask = _fill_small_holes(mask, cfg.max_nucleus_hole * area)
    # Seeds are cut to the mask before they are numbered: a seed spanning two nuclei becomes two;
    # the erosion cuts the thin bridges left where the border between touching nuclei is faint.
    seeds &= mask
    k = round(cfg.seed_erosion * scale)
    if k >= 1:
        seeds = cv2.erode(seeds.view(np.uint8), np.ones((2 * k + 1, 2 * k + 1), np.uint8)).view(bool)
    if not seeds.any():
        return np.zeros(interior.shape, dtype=np.int32)
    _, markers = cv2.connectedComponents(seeds.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    nuclei = _seeded_watershed(-interior, markers, mask, watershed_line=True)
    return _drop_small_labels(nuclei, cfg.min_nucleus_area * area)


def _label_cell_default(
    npred: np.ndarray, cpred: np.ndarray, scale: float, cfg: HpaPostprocessConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The default mode at map scale (defects fixed, ids kept through every step)."""
    area = scale * scale
    nuclei = label_nuclei(npred, cpred, scale, cfg)
    empty = np.zeros(nuclei.shape, dtype=np.int32)
    if not nuclei.any():
        return empty, empty.copy()

    interior = cpred[:, :, 2]
    border = cpred[:, :, 1] > cfg.cell_border_threshold
    threshold = max(cfg.cell_threshold_floor, cfg.cell_otsu_factor * otsu_threshold_01(interior))
    region = (interior > threshold) & ~border
    landscape = -np.maximum(interior, np.float32(threshold))
    # Nuclei seed the cells; a nucleus pixel outside the region still seeds.
    cells = _seeded_watershed(landscape, nuclei, region | (nuclei > 0))
    cells = _drop_small_labels(cells, cfg.min_cell_area * area)
    if not cells.any():
        return empty, empty.copy()

    radius = cfg.closing_radius * scale
    top = int(cells.max())
    if radius >= 1 and top < 65536:
        closed = cv2.morphologyEx(cells.astype(np.uint16), cv2.MORPH_CLOSE, _disk(radius)).astype(np.int32)
        # Only background pixels change: the closing never moves a boundary between two cells.
        cells = np.where(cells > 0, cells, closed)
    max_hole = cfg.max_cell_hole * area
    cells = fill_label_holes(cells, max_hole)

    grow = _grow_watershed if cfg.regrow == "watershed" else _nearest_fill_flat
    cells = grow(landscape, cells, border)
    cells = fill_label_holes(cells, max_hole)
    cells = _drop_small_labels(cells, cfg.min_cell_area * area)

    cells, lut = _relabel(cells, size=int(nuclei.max()) + 1)
    nuc = lut[nuclei]
    nuc = np.where((nuc == cells) & (nuclei > 0), nuc, 0).astype(np.int32, copy=False)
    return nuc, cells.astype(np.int32, copy=False)


def label_cell(
    nuclei_pred: np.ndarray,
    cell_pred: np.ndarray,
    scale: float = 1.0,
    config: HpaPostprocessConfig | None = None,
    *,
    hpa_compat: bool | None = None,
    output_shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus and cell labels from the HPA networks' probability maps.

    Parameters
    ----------
    nuclei_pred : numpy.ndarray
        (H, W, 3) nuclei-network map: channel 1 border, channel 2 interior;
        ``uint8`` 0-255 or float in [0, 1] (the compat mode rounds floats to
        ``uint8`` first, as ``hpacellseg`` hands its maps over).
    cell_pred : numpy.ndarray
        (H, W, 3) cell-network map, same layout.
    scale : float
        Scale of the maps relative to the full-resolution field (0.25 for maps
        computed at 1/4); the config's areas are multiplied by ``scale²`` and its
        closing radius by ``scale``.
    config : HpaPostprocessConfig, optional
        Thresholds and mode (HPA's thresholds, default mode).
    hpa_compat : bool, optional
        Overrides ``config.hpa_compat``: True reproduces HPA's official post-processing
        (defects included), False the default mode.
    output_shape : tuple of int, optional
        (H, W) of the full-resolution field: the labels are brought to it (nearest
        neighbour) and, in compat mode, their edges cleared there (:func:`clear_label_edges`).
        Default: labels at the maps' size, edges not cleared.

    Returns
    -------
    nuclei_labels : numpy.ndarray
        (H, W) int32; nucleus ``k`` lies inside cell ``k`` (0 where a cell lost its nucleus).
        In compat mode every nucleus pixel inside cell ``k`` is ``k``: a cell that holds
        two merged nuclei holds them under one id.
    cell_labels : numpy.ndarray
        (H, W) int32, 0 = background, cells ``1..n``.

    Raises
    ------
    ValueError
        The maps are not (H, W, 3) or differ in shape.

    Notes
    -----
    The order of the returned pair, (nuclei, cells), follows HPA's ``label_cell``;
    the :class:`~locus.service.segmentation.base.Segmenter` contract returns (cells, nuclei).
    Measured times (one core, 512² maps of a 2048² field, ``output_shape`` 2048²) are in
    the module docstring.

    Examples
    --------
    >>> nuclei, cells = label_cell(nuclei_map, cell_map, scale=0.25)  # doctest: +SKIP
    >>> nuclei, cells = label_cell(nuclei_map, cell_map, scale=0.25, hpa_compat=True,
    ...                            output_shape=(2048, 2048))  # doctest: +SKIP
    """
    cfg = config or HpaPostprocessConfig()
    if hpa_compat is not None and hpa_compat != cfg.hpa_compat:
        cfg = replace(cfg, hpa_compat=bool(hpa_compat))
    if np.shape(nuclei_pred) != np.shape(cell_pred):
        raise ValueError(f"the nuclei and cell maps differ in shape: {np.shape(nuclei_pred)} vs {np.shape(cell_pred)}")
    if cfg.hpa_compat:
        nuclei, cells = _label_cell_compat(
            to_uint8_map(nuclei_pred), to_uint8_map(cell_pred), scale * scale, cfg.closing_radius * scale, cfg
        )
    else:
        nuclei, cells = _label_cell_default(to_probability_map(nuclei_pred), to_probability_map(cell_pred), scale, cfg)
    if output_shape is not None:
        shape = (int(output_shape[0]), int(output_shape[1]))
        if not cfg.hpa_compat:
            if cells.shape != shape:
                cells = cv2.resize(cells, shape[::-1], interpolation=cv2.INTER_NEAREST_EXACT)
                nuclei = cv2.resize(nuclei, shape[::-1], interpolation=cv2.INTER_NEAREST_EXACT)
        else:
            # A nucleus pixel holds its cell's id: it goes where its cell's edge goes.
            nuclei = _upsample_labels(nuclei, shape, edges_of=cells)
            cells = _upsample_labels(cells, shape, edges_of=cells)
    return np.ascontiguousarray(nuclei, dtype=np.int32), np.ascontiguousarray(cells, dtype=np.int32)
