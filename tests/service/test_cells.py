"""Tests of per-cell records."""

from __future__ import annotations

import numpy as np
import pytest

from locus.service.cells import CellRecord, cell_records


def test_records_by_hand() -> None:
    labels = np.array(
        [
            [0, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 1, 1, 0, 3, 3],
            [0, 0, 0, 0, 3, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=np.int32,
    )
    recs = cell_records(labels)
    assert [r.id for r in recs] == [1, 3]  # id 2 is absent, no record
    one, three = recs
    assert one == CellRecord(id=1, bbox=(1, 1, 3, 3), area=4, centroid=(1.5, 1.5), touches_border=False)
    assert three.bbox == (2, 4, 4, 6)
    assert three.area == 3
    assert three.centroid == pytest.approx((7 / 3, 13 / 3))
    assert three.touches_border  # reaches the last column
    assert three.to_dict() == {
        "id": 3,
        "bbox": [2, 4, 4, 6],
        "area": 3,
        "centroid": [pytest.approx(7 / 3), pytest.approx(13 / 3)],
        "touches_border": True,
    }


def test_border_contact_each_side() -> None:
    labels = np.zeros((10, 12), dtype=np.int32)
    labels[0, 5] = 1  # top
    labels[9, 5] = 2  # bottom
    labels[5, 0] = 3  # left
    labels[5, 11] = 4  # right
    labels[4:6, 4:6] = 5  # inside
    flags = {r.id: r.touches_border for r in cell_records(labels)}
    assert flags == {1: True, 2: True, 3: True, 4: True, 5: False}


def test_disconnected_cell_and_sorting() -> None:
    labels = np.zeros((8, 8), dtype=np.uint16)
    labels[1, 1] = 7
    labels[6, 6] = 7
    labels[3, 3] = 2
    recs = cell_records(labels)
    assert [r.id for r in recs] == [2, 7]
    assert recs[1].bbox == (1, 1, 7, 7) and recs[1].area == 2 and recs[1].centroid == (3.5, 3.5)


def test_empty_and_background_only() -> None:
    assert cell_records(np.zeros((5, 5), dtype=np.int32)) == []
    assert cell_records(np.zeros((0, 0), dtype=np.int32)) == []


def test_matches_regionprops() -> None:
    from skimage.measure import regionprops

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=(40, 50)).astype(np.int32)
    recs = cell_records(labels)
    props = regionprops(labels)
    assert [r.id for r in recs] == [p.label for p in props]
    for r, p in zip(recs, props, strict=True):
        assert r.bbox == tuple(p.bbox)
        assert r.area == p.area
        assert r.centroid == pytest.approx(p.centroid)


@pytest.mark.parametrize(
    "bad", [np.zeros((3, 3, 2), np.int32), np.zeros((3, 3), np.float32), -np.ones((2, 2), np.int32)]
)
def test_bad_labels(bad) -> None:
    with pytest.raises(ValueError):
        cell_records(bad)


def test_records_identical_for_every_label_dtype() -> None:
    """int32 labels take OpenCV's moments, others numpy: same areas, boxes and centroids to the last bit."""
    rng = np.random.default_rng(3)
    labels = np.zeros((300, 420), np.int32)
    for k in range(1, 30):
        r, c = rng.integers(0, 300), rng.integers(0, 420)
        hh, ww = rng.integers(5, 90, 2)
        labels[r : r + hh, c : c + ww] = k
    fast = cell_records(labels)
    for dtype in (np.uint16, np.int64, np.uint32):
        assert cell_records(labels.astype(dtype)) == fast
    assert len(fast) > 10
