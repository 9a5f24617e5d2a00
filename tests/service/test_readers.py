"""Dataset readers: Kaggle layout, HPA website JPEGs, TIFF, missing channels, ground truth."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from locus.service.classes import CHANNELS
from locus.service.readers import (
    IncompleteFieldError,
    find_fields,
    load_field,
    load_truth,
    read_cell_labels,
    read_labels_csv,
    truth_ids,
)

H, W = 24, 32


def _channel(k: int, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(k)
    top = 255 if dtype == np.uint8 else 65535
    return rng.integers(0, top, (H, W), endpoint=True).astype(dtype)


def _write_field(folder, ident: str, ext: str = "png", dtype=np.uint8, skip: tuple[str, ...] = ()) -> dict:
    arrays = {}
    for k, c in enumerate(CHANNELS):
        arrays[c] = _channel(k, dtype)
        if c not in skip:
            assert cv2.imwrite(str(folder / f"{ident}_{c}.{ext}"), arrays[c])
    return arrays


def test_kaggle_layout_8_and_16_bit(tmp_path):
    a8 = _write_field(tmp_path, "f8", dtype=np.uint8)
    a16 = _write_field(tmp_path, "f16", dtype=np.uint16)
    (tmp_path / "train.csv").write_text("ID,Label\nf8,0|16\nf16,18\n")
    refs = find_fields(tmp_path)
    assert [r.id for r in refs] == ["f16", "f8"]
    assert refs[1].labels == [0, 16] and refs[0].labels == [18]
    img8 = load_field(refs[1])
    assert img8.shape == (H, W, 4) and img8.dtype == np.uint8
    np.testing.assert_array_equal(img8[..., 3], a8["yellow"])
    img16 = load_field(refs[0])
    assert img16.dtype == np.uint16
    np.testing.assert_array_equal(img16[..., 1], a16["green"])


def test_kaggle_download_train_subfolder_and_no_csv(tmp_path):
    (tmp_path / "train").mkdir()
    _write_field(tmp_path / "train", "x")
    refs = find_fields(tmp_path)
    assert [r.id for r in refs] == ["x"] and refs[0].labels is None
    (tmp_path / "train.csv").write_text("ID,Label\nx,3\n")
    assert find_fields(tmp_path)[0].labels == [3]
    assert find_fields(tmp_path / "train")[0].labels == [3]


def test_tinted_jpeg_and_tiff(tmp_path):
    # HPA website JPEG: yellow tinted into R+G (BGR file: G and R components).
    gray = np.tile(np.linspace(0, 250, W).astype(np.uint8), (H, 1))
    tint = {"red": (0, 0, 1), "green": (0, 1, 0), "blue": (1, 0, 0), "yellow": (0, 1, 1)}
    for c in CHANNELS:
        bgr = np.stack([gray * t for t in tint[c]], axis=-1).astype(np.uint8)
        assert cv2.imwrite(str(tmp_path / f"10_A1_1_{c}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 100])
    arrays = _write_field(tmp_path, "t16", ext="tif", dtype=np.uint16)
    refs = {r.id: r for r in find_fields(tmp_path)}
    assert set(refs) == {"10_A1_1", "t16"}
    jpg = load_field(refs["10_A1_1"])
    assert jpg.shape == (H, W, 4)
    assert np.abs(jpg[..., 3].astype(int) - gray).max() <= 3
    tif = load_field(refs["t16"])
    assert tif.dtype == np.uint16
    np.testing.assert_array_equal(tif[..., 0], arrays["red"])


def test_missing_channel_is_reported(tmp_path):
    _write_field(tmp_path, "ok")
    _write_field(tmp_path, "bad", skip=("yellow",))
    _write_field(tmp_path, "worse", skip=("red", "blue"))
    with pytest.raises(IncompleteFieldError) as info:
        find_fields(tmp_path)
    assert info.value.missing == {"bad": ["yellow"], "worse": ["red", "blue"]}
    assert "bad (missing yellow)" in str(info.value)
    with pytest.warns(UserWarning, match="bad"):
        refs = find_fields(tmp_path, on_missing="warn")
    assert [r.id for r in refs] == ["ok"]


def test_read_labels_csv_validates(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text("ID,Label\na,0|16\nb,\n")
    assert read_labels_csv(p) == {"a": [0, 16], "b": []}
    p.write_text("ID,Label\na,0|19\n")
    with pytest.raises(ValueError, match=":2"):
        read_labels_csv(p)
    p.write_text("ID,Label\na,1\na,2\n")
    with pytest.raises(ValueError, match="duplicate"):
        read_labels_csv(p)
    p.write_text("Id,Labels\na,1\n")
    with pytest.raises(ValueError, match="columns"):
        read_labels_csv(p)


def test_truth(tmp_path):
    truth = tmp_path / "truth"
    truth.mkdir()
    cells = np.zeros((H, W), dtype=np.uint16)
    cells[2:10, 2:10] = 1
    cells[12:20, 5:15] = 2
    nuclei = np.zeros_like(cells)
    nuclei[4:8, 4:8] = 1
    assert cv2.imwrite(str(truth / "f1_cells.png"), cells)
    assert cv2.imwrite(str(truth / "f1_nuclei.png"), nuclei)
    (truth / "cells.csv").write_text("ID,cell_id,Label\nf1,1,0|16\nf1,2,18\n")
    assert truth_ids(tmp_path) == ["f1"] and truth_ids(truth) == ["f1"]
    assert read_cell_labels(tmp_path) == {"f1": {1: [0, 16], 2: [18]}}
    t = load_truth(tmp_path, "f1")
    assert t.cells.dtype == np.uint16
    np.testing.assert_array_equal(t.cells, cells)
    np.testing.assert_array_equal(t.nuclei, nuclei)
    assert t.cell_labels == {1: [0, 16], 2: [18]}
    with pytest.raises(FileNotFoundError):
        load_truth(tmp_path, "nope")
    (truth / "cells.csv").write_text("ID,cell_id,Label\nf1,0,1\n")
    with pytest.raises(ValueError, match="cell_id"):
        read_cell_labels(tmp_path)
