"""Mask encodings: COCO RLE, Kaggle mask strings, PredictionString, the label-image fast path."""

from __future__ import annotations

import base64
import zlib

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from locus.service.encoding import (
    decode_binary_mask,
    decode_mask_coco,
    encode_binary_mask,
    encode_label_masks,
    encode_mask_coco,
    format_prediction_string,
    kaggle_to_rle,
    parse_prediction_string,
    rle_to_kaggle,
)

SHAPES = [(1, 1), (1, 7), (7, 1), (5, 3), (33, 17), (64, 64), (101, 57)]


def _masks(rng: np.random.Generator):
    for shape in SHAPES:
        yield np.zeros(shape, dtype=bool)
        yield np.ones(shape, dtype=bool)
        yield rng.random(shape) < 0.5
        yield rng.random(shape) < 0.05
        m = np.zeros(shape, dtype=bool)
        m[shape[0] // 3 : 2 * shape[0] // 3 + 1, shape[1] // 4 :] = True
        yield m


def test_coco_round_trip_decoded_by_pycocotools():
    rng = np.random.default_rng(1)
    for mask in _masks(rng):
        rle = encode_mask_coco(mask)
        assert rle["size"] == list(mask.shape)
        assert isinstance(rle["counts"], str)
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), mask)
        np.testing.assert_array_equal(decode_mask_coco(rle), mask)


def test_coco_accepts_non_bool_and_c_order():
    mask = np.zeros((4, 6), dtype=np.uint16)
    mask[1:3, 2:5] = 7
    rle = encode_mask_coco(mask)
    np.testing.assert_array_equal(decode_mask_coco(rle), mask > 0)
    with pytest.raises(ValueError):
        encode_mask_coco(np.zeros((2, 2, 2)))


def test_kaggle_round_trip():
    rng = np.random.default_rng(2)
    for mask in _masks(rng):
        text = encode_binary_mask(mask)
        assert text.isascii() and " " not in text
        np.testing.assert_array_equal(decode_binary_mask(text, *mask.shape), mask)
        assert rle_to_kaggle(encode_mask_coco(mask)) == text
        rle = kaggle_to_rle(text, *mask.shape)
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)


def test_kaggle_string_follows_the_documented_steps():
    # 3x4 mask; column-major runs: 4 zeros, 2 ones, 6 zeros (rows 1-2 of column 1).
    mask = np.zeros((3, 4), dtype=np.uint8)
    mask[1:3, 1] = 1
    counts = mask_utils.encode(np.asfortranarray(mask))["counts"]
    expected = base64.b64encode(zlib.compress(counts, 9)).decode("ascii")
    assert encode_binary_mask(mask) == expected
    # Hand-decode: base64 -> zlib -> COCO counts -> uncompressed runs.
    raw = zlib.decompress(base64.b64decode(expected))
    assert raw == counts
    # COCO's string: a small count c is chr(48 + c); counts from the 4th on are delta-coded against
    # the count two back. Runs [4, 2, 6] -> b"426".
    assert raw == b"426"
    assert mask_utils.frPyObjects({"size": [3, 4], "counts": [4, 2, 6]}, 3, 4)["counts"] == raw
    np.testing.assert_array_equal(decode_binary_mask(expected, 3, 4), mask.astype(bool))


def test_prediction_string_sample():
    m1 = np.zeros((3, 4), dtype=bool)
    m1[1:3, 1] = True
    m2 = np.zeros((3, 4), dtype=bool)
    m2[0, :] = True
    s1, s2 = encode_binary_mask(m1), encode_binary_mask(m2)
    text = f"0 0.9 {s1} 16 0.25 {s1} 5 1 {s2}"
    items = parse_prediction_string(text)
    assert items == [(0, 0.9, s1), (16, 0.25, s1), (5, 1.0, s2)]
    np.testing.assert_array_equal(decode_binary_mask(items[2][2], 3, 4), m2)
    again = format_prediction_string(items)
    assert parse_prediction_string(again) == items
    assert again.split() == ["0", "0.9", s1, "16", "0.25", s1, "5", "1.0", s2]


def test_prediction_string_edge_cases():
    assert parse_prediction_string("") == []
    assert parse_prediction_string(None) == []
    assert format_prediction_string([]) == ""
    conf = np.float32(0.123456789)
    out = parse_prediction_string(format_prediction_string([(3, conf, "eNoLAAA=")]))
    assert out[0][1] == float(conf)  # exact round trip
    with pytest.raises(ValueError):
        parse_prediction_string("0 0.5")
    with pytest.raises(ValueError):
        parse_prediction_string("19 0.5 abc")
    with pytest.raises(ValueError):
        parse_prediction_string("x 0.5 abc")
    with pytest.raises(ValueError):
        format_prediction_string([(0, float("nan"), "abc")])
    with pytest.raises(ValueError):
        format_prediction_string([(0, 0.5, "a b")])
    with pytest.raises(ValueError):
        kaggle_to_rle("not base64!!", 3, 4)


def test_label_masks_fast_path_equals_per_mask_encoding():
    rng = np.random.default_rng(3)
    for k in range(60):
        shape = tuple(int(v) for v in rng.integers(1, 30, 2))
        labels = rng.integers(0, 5, shape)
        if k % 3 == 0:
            labels = labels * (rng.random(shape) < 0.1)
        if k % 7 == 0:
            labels[:] = 2
        got = encode_label_masks(labels, [1, 2, 3, 4, 9])
        for i in (1, 2, 3, 4, 9):
            assert got[i] == encode_mask_coco(labels == i), (shape, i)
    labels = np.zeros((20, 30), dtype=np.uint16)
    labels[2:8, 3:9] = 5
    labels[10:, 20:] = 7
    got = encode_label_masks(labels)
    assert sorted(got) == [5, 7]
    np.testing.assert_array_equal(decode_mask_coco(got[7]), labels == 7)
