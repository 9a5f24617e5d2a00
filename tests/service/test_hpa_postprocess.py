"""Tests of the HPA post-processing's two modes: ``hpa_compat`` (HPA's official procedure, defects included)
and the default (defects fixed).

HPA's official ``label_cell`` cannot be installed here, so the tests check the fast
compat mode against :func:`reference_label_cell`, a slow, literal reading of the
official procedure as published, written with
scikit-image and SciPy at full resolution, the way ``hpacellseg`` runs it on maps
brought back to full size; and hand-worked tiny cases show each defect reproduced
in compat mode and fixed in the default mode.

The probability maps are built from label images (HPA-sim truth, or drawn scenes
of dividing cells with touching nuclei) at the networks' 1/4 scale: clean maps,
noisy maps (logit noise through a softmax, like an unsure network) and scenes of
touching nuclei. The helpers here are also used by ``benchmarks/bench_hpa_postprocess.py``.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi

from locus.service.metric import segmentation_scores
from locus.service.segmentation.hpa_postprocess import (
    HpaPostprocessConfig,
    clear_label_edges,
    label_cell,
    to_uint8_map,
)

SCALE = 0.25
#: Logit-noise settings of :func:`noisy_maps`: "noisy" puts a cell's border probability over HPA's 0.05
#: in patches over ~15% of its interior, "very noisy" over ~30%.
NOISE = {"noisy": dict(sigma=1.0, floor=0.01), "very noisy": dict(sigma=1.5, floor=0.02)}


# ----------------------------------------------------------------------------- maps from label images
def maps_from_labels(
    labels: np.ndarray, width: int = 2, sigma: float = 0.7, border_peak: float | np.ndarray = 1.0
) -> np.ndarray:
    """An (H, W, 3) float32 probability map a network could give for a label image.

    Interior = each label eroded by ``width`` px; border = the rest of the label
    (its inner band along the background and along other labels). Both are
    smoothed by a Gaussian of ``sigma`` px. The border class takes ``border_peak``
    of the band's probability and the interior the rest (a network unsure about
    borders puts some interior probability there); channel 0 takes what is left.

    Parameters
    ----------
    labels : numpy.ndarray
        (H, W) integer labels, 0 = background.
    width : int
        Width of the border band in map pixels.
    sigma : float
        Smoothing in map pixels.
    border_peak : float or numpy.ndarray
        Border probability in the middle of the band (0-1), one value or one per pixel.

    Returns
    -------
    numpy.ndarray
        (H, W, 3) float32, channels background, border, interior, summing to 1.
    """
    lab = labels.astype(np.float32)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    interior = (labels > 0) & (cv2.dilate(lab, k) == cv2.erode(lab, k))
    band = (labels > 0) & ~interior
    inner = cv2.GaussianBlur(interior.astype(np.float32), (0, 0), sigma)
    edge = cv2.GaussianBlur(band.astype(np.float32), (0, 0), sigma)
    peak = np.asarray(border_peak, dtype=np.float32)
    border = peak * edge
    inner = np.clip(inner + (1.0 - peak) * edge, 0, 1)
    background = np.clip(1.0 - inner - border, 0, 1)
    out = np.dstack([background, border, inner]).astype(np.float32)
    return out / out.sum(axis=2, keepdims=True)


def noisy_maps(pred: np.ndarray, seed: int, sigma: float = 1.5, blur: float = 1.0, floor: float = 0.02) -> np.ndarray:
    """Logit noise on a probability map: ``softmax(log max(p, floor) + noise)``, the noise smooth over ``blur`` px.

    With the defaults a cell's border probability, 0.02 before the noise, exceeds
    HPA's 0.05 in patches over about a quarter of its interior, as an unsure
    network's would.

    Parameters
    ----------
    pred : numpy.ndarray
        (H, W, 3) probabilities.
    seed : int
        Random seed.
    sigma : float
        Standard deviation of the (smoothed) noise per channel, in logits.
    blur : float
        Gaussian smoothing of the noise in map pixels (network errors are not per pixel).
    floor : float
        Smallest probability before the noise.

    Returns
    -------
    numpy.ndarray
        (H, W, 3) float32 probabilities.
    """
    rng = np.random.default_rng(seed)
    logits = np.log(np.clip(pred.astype(np.float64), floor, 1.0))
    for c in range(3):
        n = cv2.GaussianBlur(rng.standard_normal(pred.shape[:2]).astype(np.float32), (0, 0), blur)
        logits[:, :, c] += sigma * n / max(float(n.std()), 1e-6)
    e = np.exp(logits - logits.max(axis=2, keepdims=True))
    return (e / e.sum(axis=2, keepdims=True)).astype(np.float32)


def dividing_cells_scene(
    seed: int, grid: int = 8, slot: int = 64, peaks: tuple[float, float] = (0.5, 1.0)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells in pairs like freshly divided cells: two daughters touching along a line, their nuclei touching across it.

    Each of ``grid`` x ``grid`` slots of ``slot`` map pixels holds one pair: an ellipse
    cut in two by a line through its centre, and two nuclei, one each side, cut at
    the line so they touch along it. At 1/4 scale a slot of 64 px is 256 px of the
    field; daughters are ~15,000-25,000 px and nuclei ~2,900-4,500 px at full size,
    above HPA's minimum areas (5500 and 2500).

    Parameters
    ----------
    seed : int
        Random seed (sizes, orientations, offsets).
    grid : int
        Pairs per row and column (``2 * grid²`` cells).
    slot : int
        Side of a slot in map pixels.
    peaks : tuple of float
        Range of each pair's border probability (``border_peak`` of :func:`maps_from_labels`):
        how sure the networks are of the line between the daughters.

    Returns
    -------
    cells, nuclei : numpy.ndarray
        (grid * slot, grid * slot) int32 labels; nucleus ``k`` lies in cell ``k``.
    border_peak : numpy.ndarray
        (grid * slot, grid * slot) float32, each pair's border probability over its slot.
    """
    rng = np.random.default_rng(seed)
    size = grid * slot
    cells = np.zeros((size, size), np.int32)
    nuclei = np.zeros((size, size), np.int32)
    border_peak = np.zeros((size, size), np.float32)
    yy, xx = np.mgrid[0:slot, 0:slot].astype(np.float32)
    next_id = 1
    for gy in range(grid):
        for gx in range(grid):
            cy, cx = slot / 2 + rng.uniform(-3, 3), slot / 2 + rng.uniform(-3, 3)
            theta = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)  # along the pair's axis
            v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
            a, b = rng.uniform(28, 31), rng.uniform(22, 25)
            body = (u / a) ** 2 + (v / b) ** 2 <= 1
            na, nb = rng.uniform(12, 13.5), rng.uniform(10, 11.5)
            off = na - rng.uniform(1.5, 3.0)  # each nucleus reaches past the line: cut there, they touch along it
            box = (slice(gy * slot, (gy + 1) * slot), slice(gx * slot, (gx + 1) * slot))
            border_peak[box] = rng.uniform(*peaks)
            for side in (-1, 1):
                half = body & (side * u > 0)
                nuc = (((u - side * off) / na) ** 2 + (v / nb) ** 2 <= 1) & half
                cells[box][half] = next_id
                nuclei[box][nuc] = next_id
                next_id += 1
    return cells, nuclei, border_peak


def sim_truth(index: int, seed: int = 3, size: int = 512, cell_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """HPA-sim cell and nucleus truth of one field at map scale (1/4 of a field of ``4 * size``).

    Cells that HPA's procedure cannot return by design are taken out: those whose
    nucleus is under its minimum nucleus area (with a margin), which it drops, and
    binucleate cells (two nuclei, apart or touching), which it splits in two.
    """
    from skimage.measure import label as sk_label

    from locus.training.sim.generator import SimConfig, generate_field

    # Label maps only: drawn at map scale (no pixel integration: its centre-sampled truth can cut thin necks).
    f = generate_field(index, seed, SimConfig(size=size, cell_scale=cell_scale, max_supersample=1))
    n_true = int(max(f.cells.max(), f.nuclei.max()))
    area = np.bincount(f.nuclei.ravel(), minlength=n_true + 1)
    pieces = sk_label(f.nuclei, connectivity=2)
    owner = np.zeros(int(pieces.max()) + 1, np.int64)
    owner[pieces.ravel()] = f.nuclei.ravel()
    n_pieces = np.bincount(owner[1:], minlength=n_true + 1)
    keep = (area >= 1.5 * 2500 * SCALE * SCALE) & (n_pieces == 1)
    keep[f.multinucleate] = False
    keep[0] = False
    lut = np.where(keep, np.arange(n_true + 1), 0).astype(np.int32)
    return lut[f.cells], lut[f.nuclei]


# ----------------------------------------------------------------------------- the literal reading of the official
def reference_label_cell(nuclei_map: np.ndarray, cell_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HPA's published ``label_cell`` read literally, at full resolution, on ``uint8`` maps (slow).

    Written for these tests from the published description of the procedure,
    one library call per described step, with scikit-image's semantics where the
    description names a scikit-image function: seeds ``interior * (1 - (uint8 nuclei
    border + uint8 cell border) / 255 > 0.05) > 0.15`` (the uint8 sum wraps), seeds
    under 500 px dropped and numbered 4-connected; mask ``interior > 0.4`` with holes
    under 1000 px filled and objects under 8 px dropped; a watershed of the mask
    itself (flat) with lines; nuclei under 2500 px dropped and relabelled; cell
    region ``interior > max(0.22, 0.5 Otsu)`` times ``np.invert`` of the int8 border
    mask (never 0); watershed on ``-clip(interior, 255 threshold)`` seeded by the
    nuclei; cells under 5500 px dropped; ids cast to uint8; closing with disk(6);
    edges cleared, holes filled, relabelled (4-connected); a second watershed into
    the pixels with border > 0.05; edges cleared, holes filled; relabelled
    (8-connected); cells under 5500 px dropped; nuclei = cell ids on the nucleus
    pixels inside cells that form 8-connected pieces of at least 2500 px.

    Parameters
    ----------
    nuclei_map, cell_map : numpy.ndarray
        (H, W, 3) ``uint8`` full-resolution maps.

    Returns
    -------
    nuclei_labels, cell_labels : numpy.ndarray
        (H, W) integer labels.
    """
    from skimage import filters, measure, morphology, segmentation

    def fill_holes(labels: np.ndarray) -> np.ndarray:
        kept = labels * ~segmentation.find_boundaries(labels)
        return ndi.label(ndi.binary_fill_holes(kept > 0))[0]

    n_border, n_inside = nuclei_map[..., 1], nuclei_map[..., 2]
    c_border, c_inside = cell_map[..., 1], cell_map[..., 2]
    border_sum = n_border + c_border
    assert border_sum.dtype == np.uint8  # the wrap is part of what is reproduced
    seeds = (n_inside / 255.0) * (1 - border_sum / 255.0 > 0.05) > 0.15
    seeds = morphology.remove_small_objects(seeds, max_size=499)
    markers = ndi.label(seeds)[0]
    mask = n_inside / 255.0 > 0.4
    mask = morphology.remove_small_holes(mask, max_size=999)
    mask = morphology.remove_small_objects(mask, max_size=7)
    nuclei = segmentation.watershed(mask.astype(np.uint8), markers, mask=mask, watershed_line=True)
    nuclei = morphology.remove_small_objects(nuclei, max_size=2499)
    nuclei = measure.label(nuclei)

    threshold = max(0.22, 0.5 * filters.threshold_otsu(c_inside / 255.0))
    region = (c_inside / 255.0 > threshold) * np.invert((c_border / 255.0 > 0.05).astype(np.int8))
    distance = np.maximum(c_inside.astype(np.float64), 255.0 * threshold)
    cells = segmentation.watershed(-distance, nuclei, mask=region != 0)
    cells = morphology.remove_small_objects(cells, max_size=5499).astype(np.uint8)
    cells = morphology.closing(cells, morphology.disk(6))
    cells = fill_holes(cells)
    grow = (cells > 0) | (c_border / 255.0 > 0.05)
    cells = segmentation.watershed(-distance, cells, mask=grow)
    cells = fill_holes(cells)
    cells = measure.label(cells > 0)
    cells = morphology.remove_small_objects(cells, max_size=5499)
    cells = measure.label(cells)
    inside = measure.label((cells > 0) & (nuclei > 0))
    inside = morphology.remove_small_objects(inside, max_size=2499)
    return cells * (inside > 0), cells


def full_size(pred: np.ndarray, factor: int = 4) -> np.ndarray:
    """A map at 1/``factor`` brought to full size and ``uint8``, as ``hpacellseg`` hands its maps to ``label_cell``."""
    h, w = pred.shape[:2]
    up = cv2.resize(pred.astype(np.float32), (w * factor, h * factor), interpolation=cv2.INTER_LINEAR)
    return to_uint8_map(up)


def upsample_labels(labels: np.ndarray, factor: int = 4) -> np.ndarray:
    """Labels at 1/``factor`` brought to full size (nearest neighbour)."""
    h, w = labels.shape
    return cv2.resize(labels.astype(np.int32), (w * factor, h * factor), interpolation=cv2.INTER_NEAREST_EXACT)


def uint8_map(border: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """An (H, W, 3) ``uint8`` map from its border and interior channels (0-255); background takes the rest."""
    border = np.asarray(border, dtype=np.int32)
    inside = np.asarray(inside, dtype=np.int32)
    background = np.clip(255 - border - inside, 0, 255)
    return np.dstack([background, border, inside]).astype(np.uint8)


# Hand-worked cases run at scale 0.1: HPA's areas shrink 100x (seeds 5 px, nuclei 25 px, cells 55 px,
# holes filled under 10 px in the nucleus mask and 55 px in the default's cells) and the closing radius
# to 0.6 px (a single pixel: no closing), so every pixel of these small maps can be worked out by hand.
TINY = 0.1


def two_touching_nuclei(line_nuclei_border: int, line_cell_border: int, line_inside: int = 110):
    """Two 10x20 nuclei touching along columns 19-20, in a 20x40 cell region.

    Where the nuclei touch, the contact line (columns 19-20, rows 7-16) carries the given
    nuclei border, cell border and nuclei interior values (the cell interior there is what
    the cell border leaves); elsewhere the nuclei and the cell region are interior (230).
    """
    h, w = 24, 42
    n_border = np.zeros((h, w), np.int32)
    n_inside = np.zeros((h, w), np.int32)
    c_border = np.zeros((h, w), np.int32)
    c_inside = np.zeros((h, w), np.int32)
    c_inside[2:22, 1:41] = 230
    n_inside[7:17, 10:30] = 230
    n_border[7:17, 19:21] = line_nuclei_border
    n_inside[7:17, 19:21] = line_inside
    c_border[7:17, 19:21] = line_cell_border
    c_inside[7:17, 19:21] = 255 - line_cell_border
    return uint8_map(n_border, n_inside), uint8_map(c_border, c_inside)


def test_uint8_wrap_of_the_border_sum_merges_touching_nuclei_only_in_compat_mode() -> None:
    # 130 + 130 = 260 wraps to 4 in uint8: "no border" for HPA's code, so the contact line seeds
    # (interior 110/255 > 0.15) and joins the two seeds; the nucleus mask (interior > 0.4) joins them too.
    nm, cm = two_touching_nuclei(130, 130)
    nuclei, cells = label_cell(nm, cm, TINY, hpa_compat=True)
    assert cells.max() == 1  # one cell over both daughters
    assert set(np.unique(nuclei[7:17, 10:30])) == {1}  # both nuclei under the cell's id
    # Default: the sum in floating point is 1.02 > 0.95, the line is border, the seeds stay apart.
    nuclei, cells = label_cell(nm, cm, TINY)
    assert cells.max() == 2
    left, right = cells[12, 5], cells[12, 35]
    assert {left, right} == {1, 2}
    assert nuclei[12, 12] == left and nuclei[12, 27] == right
    # Control: 250 + 0 does not wrap (0.98 > 0.95 in both modes): both keep the nuclei apart.
    nm, cm = two_touching_nuclei(250, 0)
    assert label_cell(nm, cm, TINY, hpa_compat=True)[1].max() == 2
    assert label_cell(nm, cm, TINY)[1].max() == 2


def test_the_wrap_follows_uint8_arithmetic_exactly() -> None:
    # sum 498 wraps to 242: 1 - 242/255 = 0.051 > 0.05, border-free; 499 wraps to 243: border.
    for total, merged in ((498, True), (499, False)):
        nm, cm = two_touching_nuclei(255, total - 255)
        cells = label_cell(nm, cm, TINY, hpa_compat=True)[1]
        assert (cells.max() == 1) == merged, total


def test_np_invert_leaves_border_pixels_in_the_first_watershed_only_in_compat_mode() -> None:
    # Cell A (columns 1-19) holds a nucleus; region B (columns 22-40) looks like a cell's interior but
    # holds none. Between them, columns 20-21 are border (0.6) with interior 0.4 (above HPA's 0.22).
    h, w = 24, 42
    c_border = np.zeros((h, w), np.int32)
    c_inside = np.zeros((h, w), np.int32)
    c_inside[2:22, 1:41] = 230
    c_border[2:22, 20:22] = 153
    c_inside[2:22, 20:22] = 102
    n_inside = np.zeros((h, w), np.int32)
    n_inside[7:17, 5:15] = 230
    nm, cm = uint8_map(np.zeros((h, w)), n_inside), uint8_map(c_border, c_inside)
    # Compat: int8 invert gives -1/-2, never 0, so the border stays in the region and A floods into B.
    cells = label_cell(nm, cm, TINY, hpa_compat=True)[1]
    assert cells.max() == 1 and cells[12, 35] == 1
    # Default: border pixels are kept out of the first watershed; the regrowth takes the border band
    # (cell border > 0.05) but not B, whose pixels are neither border nor reached.
    cells = label_cell(nm, cm, TINY)[1]
    assert cells.max() == 1 and cells[12, 10] == 1 and cells[12, 21] == 1 and cells[12, 35] == 0


def test_seeds_numbered_before_the_mask_cuts_them_join_nuclei_only_in_compat_mode() -> None:
    # Two 10x10 nuclei touch along columns 19-20, where nuclei border 140 + cell border 115 = 255 (no
    # wrap: 1.0 > 0.95, no seed in either mode) but the nuclei interior is 115 (0.45: mask). Below them,
    # row 17 has interior 77 (0.30): seed (> 0.15) but not mask (<= 0.4), and it joins the two seeds.
    # HPA numbers the seeds before the watershed cuts them to the mask: one id for both nuclei.
    nm, cm = two_touching_nuclei(140, 115, line_inside=115)
    nm[17, 10:30] = (178, 0, 77)
    nuclei, cells = label_cell(nm, cm, TINY, hpa_compat=True)
    assert set(np.unique(nuclei[7:17, 10:30])) == {1} and cells.max() == 1
    # Default: seeds are cut to the mask first, so they are two, and the watershed line splits the mask.
    nuclei, cells = label_cell(nm, cm, TINY)
    assert len(set(np.unique(nuclei[7:17, 10:30])) - {0}) == 2
    assert cells.max() == 2
    # Control: without the joining row both modes keep two nuclei.
    nm, cm = two_touching_nuclei(140, 115, line_inside=115)
    assert label_cell(nm, cm, TINY, hpa_compat=True)[1].max() == 2


def grid_of_cells(rows: int, cols: int, hole: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Maps of ``rows`` x ``cols`` separate 10x10 cells (2 px apart), each with a 6x6 nucleus, 12 px per slot."""
    h, w = rows * 12 + 2, cols * 12 + 2
    n_inside = np.zeros((h, w), np.int32)
    c_inside = np.zeros((h, w), np.int32)
    for r in range(rows):
        for c in range(cols):
            y, x = 2 + 12 * r, 2 + 12 * c
            c_inside[y : y + 10, x : x + 10] = 230
            n_inside[y + 2 : y + 8, x + 2 : x + 8] = 230
    zeros = np.zeros((h, w))
    return uint8_map(zeros, n_inside), uint8_map(zeros, c_inside)


def test_cell_ids_wrap_at_256_in_compat_mode() -> None:
    # HPA's code casts the cell labels to uint8 after the first watershed: the 256th cell (in the raster
    # order of its nucleus) becomes 0 and vanishes; cells 257... share ids with cells 1... but stay
    # separate (they are numbered again as pieces). 17 x 16 = 272 cells.
    nm, cm = grid_of_cells(17, 16)
    nuclei, cells = label_cell(nm, cm, TINY, hpa_compat=True)
    assert cells.max() == 271
    r, c = divmod(255, 16)  # the 256th cell
    y, x = 2 + 12 * r, 2 + 12 * c
    assert not cells[y : y + 10, x : x + 10].any()
    assert label_cell(nm, cm, TINY)[1].max() == 272


def test_holes_filled_whatever_their_size_in_compat_mode_only() -> None:
    # One cell: a 40x40 ring, 8 px thick, around a 24x24 hole (576 px, above the default's 55 px at scale 0.1).
    h = w = 44
    c_inside = np.zeros((h, w), np.int32)
    c_inside[2:42, 2:42] = 230
    c_inside[10:34, 10:34] = 0
    n_inside = np.zeros((h, w), np.int32)
    n_inside[3:9, 3:9] = 230
    zeros = np.zeros((h, w))
    nm, cm = uint8_map(zeros, n_inside), uint8_map(zeros, c_inside)
    cells = label_cell(nm, cm, TINY, hpa_compat=True)[1]
    assert cells.max() == 1 and np.all(cells[10:34, 10:34] == 1)
    cells = label_cell(nm, cm, TINY)[1]
    assert cells.max() == 1 and not cells[10:34, 10:34].any()


def test_background_enclosed_by_touching_cells_stays_background_in_both_modes() -> None:
    # Four cells touching in a ring around a 16x16 background square: HPA's gaps between touching
    # cells connect it to the outside, so it is not a hole.
    h = w = 40
    c_inside = np.zeros((h, w), np.int32)
    n_inside = np.zeros((h, w), np.int32)
    c_inside[2:38, 2:38] = 230
    c_inside[12:28, 12:28] = 0
    c_border = np.zeros((h, w), np.int32)
    for sl in ((slice(2, 38), slice(19, 21)), (slice(19, 21), slice(2, 38))):
        c_border[sl] = 200  # the four cells meet along the middle lines
    c_border[12:28, 12:28] = 0
    for y, x in ((4, 4), (4, 28), (28, 4), (28, 28)):
        n_inside[y : y + 7, x : x + 7] = 230
    c_inside = np.where(c_border > 0, 55, c_inside)
    nm, cm = uint8_map(np.zeros((h, w)), n_inside), uint8_map(c_border, c_inside)
    for compat in (True, False):
        cells = label_cell(nm, cm, TINY, hpa_compat=compat)[1]
        assert cells.max() == 4, compat
        assert not cells[12:28, 12:28].any(), compat


def test_compat_clears_label_edges_at_full_size() -> None:
    labels = np.zeros((8, 12), np.int32)
    labels[1:7, 1:6] = 1
    labels[1:7, 6:11] = 2
    cleared = clear_label_edges(labels)
    # a 2-px gap between the touching cells (columns 5 and 6), a 1-px rim off every other edge
    assert not cleared[:, 5:7].any()
    assert np.all(cleared[2:6, 2:5] == 1) and np.all(cleared[2:6, 7:10] == 2)
    assert not cleared[1].any() and not cleared[6].any()
    assert cleared.sum() == 12 * 1 + 12 * 2
    # label_cell clears them where it brings the labels to full size, in compat mode only
    nm, cm = two_touching_nuclei(250, 0)
    _, compat = label_cell(nm, cm, TINY, hpa_compat=True, output_shape=(96, 168))
    _, default = label_cell(nm, cm, TINY, output_shape=(96, 168))
    assert compat.shape == default.shape == (96, 168)
    touching = (default[:, :-1] != default[:, 1:]) & (default[:, :-1] > 0) & (default[:, 1:] > 0)
    assert touching.any()  # the default's cells touch...
    assert not ((compat[:, :-1] != compat[:, 1:]) & (compat[:, :-1] > 0) & (compat[:, 1:] > 0)).any()  # compat's do not
    assert compat.astype(bool).sum() < default.astype(bool).sum()


# ----------------------------------------------------------------------------- maps from truth
@functools.lru_cache(maxsize=16)
def small_sim(index: int, noise: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(truth cells, truth nuclei, nuclei map, cell map): a 256² HPA-sim field at 1/4 (1024² at full size).

    Cached: the tests read these arrays and never write them.
    """
    cells, nuclei = sim_truth(index, size=256, cell_scale=1.5)
    nm, cm = maps_from_labels(nuclei), maps_from_labels(cells)
    if noise:
        nm, cm = noisy_maps(nm, 100 + index, **NOISE[noise]), noisy_maps(cm, 200 + index, **NOISE[noise])
    return cells, nuclei, nm, cm


@functools.lru_cache(maxsize=16)
def small_touching(seed: int, noise: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(truth cells, truth nuclei, nuclei map, cell map): 16 pairs of divided cells, 256² maps."""
    cells, nuclei, peak = dividing_cells_scene(seed, grid=4)
    nm, cm = maps_from_labels(nuclei, border_peak=peak), maps_from_labels(cells, border_peak=peak)
    if noise:
        nm, cm = noisy_maps(nm, 300 + seed, **NOISE[noise]), noisy_maps(cm, 400 + seed, **NOISE[noise])
    return cells, nuclei, nm, cm


def scores_vs_truth(truth: np.ndarray, nm: np.ndarray, cm: np.ndarray, **kw) -> dict:
    """Cells of ``label_cell`` at full size against the truth brought to full size (IoU >= 0.5)."""
    full = upsample_labels(truth)
    nuclei, cells = label_cell(nm, cm, SCALE, output_shape=full.shape, **kw)
    assert cells.dtype == nuclei.dtype == np.int32 and cells.shape == full.shape
    assert np.all(cells[nuclei > 0] == nuclei[nuclei > 0])  # nucleus k lies in cell k
    return segmentation_scores(cells, full, 0.5)


@pytest.mark.parametrize("compat", [False, True])
def test_both_modes_find_every_cell_of_clean_sim_maps(compat: bool) -> None:
    for index in (0, 1):
        truth, _, nm, cm = small_sim(index)
        s = scores_vs_truth(truth, nm, cm, hpa_compat=compat)
        assert s["n_matched"] == s["n_true"] == s["n_pred"], s
        assert s["mean_iou"] >= 0.93, s


def test_touching_nuclei_merge_in_compat_mode_and_stay_apart_by_default() -> None:
    truth, _, nm, cm = small_touching(0)
    default = scores_vs_truth(truth, nm, cm)
    compat = scores_vs_truth(truth, nm, cm, hpa_compat=True)
    assert default["n_true"] == 32
    assert default["n_matched"] >= 30, default  # the defects fixed: the daughters stay apart
    assert compat["n_matched"] <= default["n_matched"] - 4, compat  # HPA's defects merge pairs
    assert compat["n_pred"] < default["n_pred"]


@pytest.mark.slow
def test_default_is_at_least_as_good_as_compat_on_noisy_maps() -> None:
    for truth, _, nm, cm in (small_sim(0, "very noisy"), small_touching(1, "noisy")):
        default = scores_vs_truth(truth, nm, cm)
        compat = scores_vs_truth(truth, nm, cm, hpa_compat=True)
        assert default["f1"] >= compat["f1"], (default, compat)
        assert default["f1"] >= 0.85, default


def agreement_with_reference(scenes: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> tuple[int, int]:
    """(reference cells matched by the compat mode at IoU >= 0.9, reference cells), over scenes."""
    matched = total = 0
    for _, _, nm, cm in scenes:
        ref_nuclei, ref_cells = reference_label_cell(full_size(nm), full_size(cm))
        nuclei, cells = label_cell(nm, cm, SCALE, hpa_compat=True, output_shape=ref_cells.shape)
        s = segmentation_scores(cells, ref_cells, 0.9)
        matched += s["n_matched"]
        total += s["n_true"]
    return matched, total


@pytest.mark.slow
def test_compat_matches_the_literal_reading_on_a_clean_field() -> None:
    matched, total = agreement_with_reference([small_sim(0)])
    assert total >= 10 and matched == total


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clean", "noisy", "touching"])
def test_compat_matches_the_literal_reading_on_truth_maps(kind: str) -> None:
    """At least 99% of the cells of HPA's procedure (read literally, at full size) match the compat mode's."""
    if kind == "touching":
        scenes = [small_touching(seed) for seed in (0, 1)]
    else:
        scenes = [small_sim(index, None if kind == "clean" else kind) for index in (0, 1, 2)]
    matched, total = agreement_with_reference(scenes)
    assert total >= 30 and matched >= 0.99 * total, (matched, total)


def test_output_shape_brings_labels_to_full_size_and_clears_edges_in_compat_mode() -> None:
    _, _, nm, cm = small_sim(0)
    for shape in ((1024, 1024), (1023, 1022)):  # whole factor 4 and not
        for compat in (False, True):
            small_nuclei, small_cells = label_cell(nm, cm, SCALE, hpa_compat=compat)
            nuclei, cells = label_cell(nm, cm, SCALE, hpa_compat=compat, output_shape=shape)
            up_cells = cv2.resize(small_cells, shape[::-1], interpolation=cv2.INTER_NEAREST_EXACT)
            up_nuclei = cv2.resize(small_nuclei, shape[::-1], interpolation=cv2.INTER_NEAREST_EXACT)
            if compat:
                up_cells = clear_label_edges(up_cells)
                up_nuclei = np.where(up_cells > 0, up_nuclei, 0)
            np.testing.assert_array_equal(cells, up_cells)
            np.testing.assert_array_equal(nuclei, up_nuclei)


def test_float_maps_are_rounded_to_uint8_as_img_as_ubyte_does() -> None:
    from skimage.util import img_as_ubyte

    rng = np.random.default_rng(0)
    x = rng.random((64, 80, 3)).astype(np.float32)
    x[0, :6, 0] = [0.5 / 255, 1.5 / 255, 2.5 / 255, 1.0, 0.0, 254.5 / 255]
    np.testing.assert_array_equal(to_uint8_map(x), img_as_ubyte(x))
    np.testing.assert_array_equal(to_uint8_map(x.astype(np.float64)), img_as_ubyte(x.astype(np.float64)))
    u8 = (x * 255).astype(np.uint8)
    assert to_uint8_map(u8) is u8
    with pytest.raises(ValueError):
        to_uint8_map(x[..., :2])


def test_config_and_keyword_select_the_mode() -> None:
    nm, cm = two_touching_nuclei(130, 130)
    compat_cfg = HpaPostprocessConfig(hpa_compat=True)
    assert label_cell(nm, cm, TINY, compat_cfg)[1].max() == 1
    assert label_cell(nm, cm, TINY, compat_cfg, hpa_compat=False)[1].max() == 2  # the keyword wins
    assert HpaPostprocessConfig().to_dict()["hpa_compat"] is False
    with pytest.raises(ValueError, match="regrow"):
        HpaPostprocessConfig(regrow="fastest")
    with pytest.raises(ValueError):
        label_cell(nm, cm[:-1], TINY, hpa_compat=True)


def test_empty_maps_give_empty_labels_in_both_modes() -> None:
    empty = np.zeros((64, 96, 3), np.float32)
    empty[..., 0] = 1
    for compat in (False, True):
        nuclei, cells = label_cell(empty, empty, SCALE, hpa_compat=compat, output_shape=(256, 384))
        assert cells.shape == (256, 384) and not cells.any() and not nuclei.any()


# ----------------------------------------------------------------------------- settings and backend
def test_the_setting_reaches_the_hpa_backend(monkeypatch, tmp_path) -> None:
    from locus.service.config import PipelineSettings
    from locus.service.segmentation import make_segmenter
    from tests.service.test_hpa_segmentation import build_hpa_like_onnx

    monkeypatch.setenv("LOCUS_HPA_COMPAT", "true")
    options = PipelineSettings().segmenter_options("hpa")
    assert options["hpa_compat"] is True
    monkeypatch.delenv("LOCUS_HPA_COMPAT")
    assert PipelineSettings().segmenter_options("hpa")["hpa_compat"] is False

    nuclei_net = build_hpa_like_onnx(tmp_path / "nuclei.onnx", threshold=0.15)
    cell_net = build_hpa_like_onnx(tmp_path / "cell.onnx", threshold=0.08)
    options.update(nuclei_model=nuclei_net, cell_model=cell_net, providers=["CPUExecutionProvider"])
    seg = make_segmenter("hpa", **options)
    try:
        assert seg.postprocess.hpa_compat is True
        from locus.training.sim.generator import SimConfig, generate_field

        image = generate_field(0, 3, SimConfig(size=512)).image
        nm, cm = seg.predict_maps([image])[0]
        for compat in (True, False):
            cells, nuclei = seg.segment(image, hpa_compat=compat)
            want_nuclei, want_cells = label_cell(nm, cm, 0.25, hpa_compat=compat, output_shape=(512, 512))
            np.testing.assert_array_equal(cells, want_cells)
            np.testing.assert_array_equal(nuclei, want_nuclei)
        default_cells, _ = seg.segment(image)  # the segmenter's own setting: compat
        np.testing.assert_array_equal(default_cells, seg.segment_many([image], hpa_compat=True)[0][0])
    finally:
        seg.close()
