"""Label grids: what the pipeline reads from working-size labels equals what the full-resolution image gives."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from locus.service.cells import cell_records
from locus.service.encoding import decode_mask_coco, encode_label_masks
from locus.service.labelgrid import LabelGrid, nearest_map
from locus.service.segmentation.classical import ClassicalSegmenter
from locus.training.sim.generator import SimConfig, generate_field


def _blobs(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    """Random label image of a few overlapping discs (cells with concave unions, background between)."""
    labels = np.zeros((h, w), np.int32)
    for k in range(1, n + 1):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        r = int(rng.integers(1, max(2, min(h, w) // 3)))
        cv2.circle(labels, (int(cx), int(cy)), r, k, -1)
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_grid_equals_the_upsampled_image(seed):
    """Records, areas and RLE of a grid equal those of OpenCV's nearest-exact resize, enlarging and shrinking."""
    rng = np.random.default_rng(seed)
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        H, W = (int(v) for v in rng.integers(1, 160, 2))
        small = _blobs(rng, h, w, 5) if rng.random() < 0.7 else rng.integers(0, 4, (h, w)).astype(np.int32)
        grid = LabelGrid.upsampled(small, (H, W))
        full = cv2.resize(small, (W, H), interpolation=cv2.INTER_NEAREST_EXACT).reshape(H, W)
        assert np.array_equal(grid.full(), full)
        assert grid.records() == cell_records(full)  # boxes, areas, border contact; centroids bit for bit
        assert np.array_equal(grid.areas(8), np.bincount(full.ravel(), minlength=8))
        assert grid.encode() == encode_label_masks(full)
        assert grid.encode([2, 9]) == encode_label_masks(full, [2, 9])  # 9 is absent: an empty mask


def test_runs_across_a_column_boundary_are_one_run():
    """A label that fills the bottom of one column and the top of the next is one COCO run, as pycocotools has it."""
    small = np.array([[0, 1], [1, 1]], np.int32)
    grid = LabelGrid.upsampled(small, (4, 4))
    rle = grid.encode([1])[1]
    mask = decode_mask_coco(rle)
    assert np.array_equal(mask.astype(bool), grid.full() == 1)
    assert rle == encode_label_masks(grid.full(), [1])[1]


def test_where_equal_is_the_full_resolution_rule():
    """Nuclei kept where the cells agree: on the small images when the maps are shared, identical to full size."""
    rng = np.random.default_rng(7)
    for _ in range(30):
        h, w = (int(v) for v in rng.integers(2, 40, 2))
        H, W = (int(v) for v in rng.integers(2, 140, 2))
        cells = _blobs(rng, h, w, 5)
        nuclei = np.where(rng.random((h, w)) < 0.7, cells, rng.integers(0, 6, (h, w))).astype(np.int32)
        cg, ng = LabelGrid.upsampled(cells, (H, W)), LabelGrid.upsampled(nuclei, (H, W))
        full_c, full_n = cg.full(), ng.full()
        want = np.where(full_n == full_c, full_n, 0)
        kept = ng.where_equal(cg)
        assert not kept.is_identity or (h, w) == (H, W)
        np.testing.assert_array_equal(kept.full(), want)
        other = LabelGrid.identity(full_c)  # different maps: the full-resolution path
        np.testing.assert_array_equal(ng.where_equal(other).full(), want)
    with pytest.raises(ValueError, match="different sizes"):
        LabelGrid.identity(np.zeros((3, 3), np.int32)).where_equal(LabelGrid.identity(np.zeros((4, 3), np.int32)))


def test_nearest_map_is_opencvs():
    """The index maps reproduce OpenCV's nearest-exact resize of an index ramp, monotone."""
    for src, dst in [(512, 2048), (512, 1728), (433, 3072), (7, 3), (1, 5)]:
        m = nearest_map(src, dst)
        assert m.shape == (dst,) and np.all(np.diff(m) >= 0) and m.min() >= 0 and m.max() < src
        ramp = np.tile(np.arange(src, dtype=np.int32)[:, None], (1, 3))
        assert np.array_equal(cv2.resize(ramp, (3, dst), interpolation=cv2.INTER_NEAREST_EXACT)[:, 1], m)


def test_bad_maps_are_refused():
    with pytest.raises(ValueError, match="non-decreasing"):
        LabelGrid(np.zeros((4, 4), np.int32), np.array([0, 2, 1, 3]), np.arange(4))
    with pytest.raises(ValueError, match="integer"):
        LabelGrid(np.zeros((4, 4), np.float32), np.arange(4), np.arange(4))


@pytest.mark.parametrize("size", [1536, 1728])
def test_classical_grids_are_its_full_labels(size):
    """The classical segmenter's grids give the same cells, nuclei, records and masks as its full-size labels."""
    image = generate_field(0, 31, SimConfig(size=size, n_cells=(6, 9))).image
    seg = ClassicalSegmenter()
    cells_grid, nuclei_grid = seg.segment_grids(image)
    assert not cells_grid.is_identity  # segmented at a reduced size
    cells, nuclei = seg.segment(image)
    assert np.array_equal(cells_grid.full(), cells) and np.array_equal(nuclei_grid.full(), nuclei)
    records = cells_grid.records()
    assert len(records) >= 3 and records == cell_records(cells)
    assert cells_grid.encode() == encode_label_masks(cells)
    assert np.array_equal(nuclei_grid.areas(), np.bincount(nuclei.ravel()))
