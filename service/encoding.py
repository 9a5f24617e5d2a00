"""Mask encodings: COCO compressed RLE, the Kaggle mask string and the PredictionString.

Kaggle mask string (HPA Single-Cell Image Classification, 2021)
---------------------------------------------------------------
A binary HxW mask is made ``uint8`` and Fortran-ordered, encoded with
``pycocotools.mask.encode`` (COCO compressed RLE), its ``counts`` bytes are
compressed with ``zlib`` at level 9 and the result is base64-encoded to ASCII.
Decoding reverses the steps; the image height and width come from the
submission's ``ImageHeight`` / ``ImageWidth`` columns.

A ``PredictionString`` is space-separated triples ``class confidence mask``,
one triple per (cell, class); a cell with two classes appears twice.

Fast path
---------
:func:`encode_label_masks` encodes every cell of a label image in one
vectorised pass over the pixels (run boundaries of the Fortran-flattened label
image), so encoding n cells costs O(H x W) numpy work plus O(runs) per cell
instead of n full-image mask builds.
"""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Iterable, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

__all__ = [
    "encode_mask_coco",
    "decode_mask_coco",
    "encode_binary_mask",
    "decode_binary_mask",
    "rle_to_kaggle",
    "kaggle_to_rle",
    "encode_label_masks",
    "encode_runs",
    "format_prediction_string",
    "parse_prediction_string",
]


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W); got shape {mask.shape}")
    if mask.dtype != np.bool_:
        mask = mask != 0
    return np.asfortranarray(mask, dtype=np.uint8)


def _counts_str(counts: bytes | str) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else str(counts)


def encode_mask_coco(mask: np.ndarray) -> dict:
    """Encode a binary mask as COCO compressed RLE.

    Parameters
    ----------
    mask : numpy.ndarray
        Shape (H, W); any non-zero value is foreground.

    Returns
    -------
    dict
        ``{"size": [H, W], "counts": str}``, the counts as an ASCII string
        (``pycocotools.mask.decode`` accepts it after ``counts.encode()``).
    """
    rle = mask_utils.encode(_check_mask(mask))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": _counts_str(rle["counts"])}


def as_pycoco(rle: dict) -> dict:
    """A COCO RLE as pycocotools takes it: compressed counts as bytes, or an uncompressed counts list converted.

    Parameters
    ----------
    rle : dict
        ``{"size": [h, w], "counts": str | bytes | list}``.

    Returns
    -------
    dict
        The same mask, ``counts`` as compressed bytes.
    """
    counts = rle["counts"]
    h, w = (int(v) for v in rle["size"])
    if isinstance(counts, list | tuple | np.ndarray):
        return mask_utils.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [h, w], "counts": counts}


def decode_mask_coco(rle: dict) -> np.ndarray:
    """Decode a COCO RLE (compressed, as str or bytes, or uncompressed counts list) to a mask.

    Parameters
    ----------
    rle : dict
        ``{"size": [H, W], "counts": ...}``.

    Returns
    -------
    numpy.ndarray
        Shape (H, W), ``bool``.
    """
    return mask_utils.decode(as_pycoco(rle)).astype(bool)


def rle_to_kaggle(rle: dict) -> str:
    """Turn a COCO compressed RLE into the Kaggle mask string (zlib level 9, base64).

    Parameters
    ----------
    rle : dict
        COCO compressed RLE with ``counts`` as str or bytes.

    Returns
    -------
    str
        ASCII base64 text.
    """
    counts = as_pycoco(rle)["counts"]
    return base64.b64encode(zlib.compress(counts, 9)).decode("ascii")


def kaggle_to_rle(text: str, height: int, width: int) -> dict:
    """Turn a Kaggle mask string into a COCO compressed RLE without decoding pixels.

    Parameters
    ----------
    text : str
        The base64 mask string.
    height, width : int
        Image size.

    Returns
    -------
    dict
        ``{"size": [height, width], "counts": bytes}``, usable by ``pycocotools.mask`` directly.

    Raises
    ------
    ValueError
        If the text is not valid base64 or zlib data.
    """
    try:
        counts = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"not a valid Kaggle mask string ({exc}): {text[:40]!r}") from exc
    return {"size": [int(height), int(width)], "counts": counts}


def encode_binary_mask(mask: np.ndarray) -> str:
    """Encode a binary mask as the Kaggle mask string.

    uint8 Fortran-ordered -> ``pycocotools.mask.encode`` -> counts bytes ->
    ``zlib.compress(level=9)`` -> base64 -> ASCII.

    Parameters
    ----------
    mask : numpy.ndarray
        Shape (H, W); any non-zero value is foreground.

    Returns
    -------
    str
        The mask string (no spaces).
    """
    rle = mask_utils.encode(_check_mask(mask))
    return base64.b64encode(zlib.compress(rle["counts"], 9)).decode("ascii")


def decode_binary_mask(text: str, height: int, width: int) -> np.ndarray:
    """Decode a Kaggle mask string.

    Parameters
    ----------
    text : str
        The base64 mask string.
    height, width : int
        Image size (``ImageHeight``, ``ImageWidth``).

    Returns
    -------
    numpy.ndarray
        Shape (height, width), ``bool``.
    """
    return mask_utils.decode(kaggle_to_rle(text, height, width)).astype(bool)


def _column_major(labels: np.ndarray) -> np.ndarray:
    """The label image flattened in column-major (COCO) order; OpenCV's transpose is ~6x numpy's ``ravel("F")``."""
    if labels.dtype in (np.int32, np.uint16, np.uint8, np.int16, np.float32) and labels.size:
        return cv2.transpose(np.ascontiguousarray(labels)).ravel()
    return labels.ravel(order="F")


def encode_label_masks(labels: np.ndarray, ids: Iterable[int] | None = None) -> dict[int, dict]:
    """Encode every cell of a label image as COCO compressed RLE in one pass.

    The label image is flattened in Fortran (column-major) order, the order
    COCO RLE uses; the boundaries where the label value changes give every
    run of every cell at once. Each cell's runs are turned into its
    uncompressed counts (zeros, ones, zeros, ...) and compressed by
    ``pycocotools`` — no full-image mask is ever built per cell.

    Parameters
    ----------
    labels : numpy.ndarray
        Shape (H, W), integer label image, 0 = background.
    ids : iterable of int, optional
        Labels to encode (default: every non-zero label present). A label
        with no pixels gets an empty mask.

    Returns
    -------
    dict of int to dict
        ``{label: {"size": [H, W], "counts": str}}``, identical to
        :func:`encode_mask_coco` of ``labels == label``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"a label image must be 2-D (H, W); got shape {labels.shape}")
    h, w = labels.shape
    n = h * w
    flat = _column_major(labels)
    if n == 0:
        wanted = [] if ids is None else [int(i) for i in ids]
        return {i: encode_mask_coco(np.zeros((h, w), np.uint8)) for i in wanted}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [n]))
    return encode_runs(starts, ends, flat[starts], (h, w), ids)


def encode_runs(
    starts: np.ndarray,
    ends: np.ndarray,
    values: np.ndarray,
    shape: tuple[int, int],
    ids: Iterable[int] | None = None,
) -> dict[int, dict]:
    """COCO compressed RLE of every label, from the runs of a label image in column-major order.

    Parameters
    ----------
    starts, ends : numpy.ndarray
        Start and end (exclusive) of each run, as positions in the column-major flattened image, in
        increasing order; runs of one label may touch (they are merged), runs of label 0 are ignored.
    values : numpy.ndarray
        The label of each run.
    shape : tuple of int
        (H, W) of the image.
    ids : iterable of int, optional
        Labels to encode (default: every non-zero label present); a label without runs gets an empty mask.

    Returns
    -------
    dict of int to dict
        ``{label: {"size": [H, W], "counts": str}}``, as :func:`encode_mask_coco` of ``labels == label``.
    """
    h, w = int(shape[0]), int(shape[1])
    n = h * w
    keep = values != 0
    starts, ends, values = starts[keep], ends[keep], values[keep]
    order = np.argsort(values, kind="stable")  # runs of one label stay in increasing position
    starts, ends, values = starts[order], ends[order], values[order]
    if len(values) > 1:  # merge runs of one label that touch (never the case for maximal runs)
        joined = (values[1:] == values[:-1]) & (starts[1:] == ends[:-1])
        if joined.any():
            first = np.concatenate(([True], ~joined))
            last = np.concatenate((~joined, [True]))
            starts, ends, values = starts[first], ends[last], values[first]
    present, first = np.unique(values, return_index=True)
    last = np.append(first[1:], len(values)) if len(first) else first
    bounds = {int(v): (int(a), int(b)) for v, a, b in zip(present, first, last, strict=True)}
    wanted = present.tolist() if ids is None else [int(i) for i in ids]
    out: dict[int, dict] = {}
    for label in wanted:
        if label not in bounds:
            counts = np.array([n], dtype=np.int64)
        else:
            a, b = bounds[label]
            s, e = starts[a:b], ends[a:b]
            counts = np.empty(2 * len(s) + 1, dtype=np.int64)
            counts[0] = s[0]
            counts[1:-1:2] = e - s
            counts[2:-1:2] = s[1:] - e[:-1]
            counts[-1] = n - e[-1]
            if counts[-1] == 0:  # pycocotools ends on the last non-empty run
                counts = counts[:-1]
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts.tolist()}, h, w)
        out[label] = {"size": [h, w], "counts": _counts_str(rle["counts"])}
    return out


def _format_confidence(conf: float) -> str:
    value = float(conf)
    if not math.isfinite(value):
        raise ValueError(f"confidence must be finite; got {conf!r}")
    return repr(value)


def format_prediction_string(items: Sequence[tuple[int, float, str]]) -> str:
    """Format (class, confidence, mask string) triples as a Kaggle ``PredictionString``.

    Parameters
    ----------
    items : sequence of (int, float, str)
        One triple per (cell, class). Confidences are written so that they
        read back exactly (shortest round-trip repr).

    Returns
    -------
    str
        Space-separated ``class confidence mask`` triples ("" for none).

    Raises
    ------
    ValueError
        A class id outside 0-18, a non-finite confidence or a mask string with whitespace.
    """
    parts: list[str] = []
    for cls, conf, mask in items:
        cls = int(cls)
        if not 0 <= cls <= 18:
            raise ValueError(f"class id {cls} is outside 0-18")
        if not mask or any(ch.isspace() for ch in mask):
            raise ValueError("a mask string must be non-empty and contain no whitespace")
        parts.append(f"{cls} {_format_confidence(conf)} {mask}")
    return " ".join(parts)


def parse_prediction_string(text: str | None) -> list[tuple[int, float, str]]:
    """Parse a Kaggle ``PredictionString`` into (class, confidence, mask string) triples.

    Parameters
    ----------
    text : str or None
        Space-separated triples; empty or None means no prediction.

    Returns
    -------
    list of (int, float, str)

    Raises
    ------
    ValueError
        If the token count is not a multiple of 3 or a class / confidence does not parse.
    """
    if text is None:
        return []
    tokens = str(text).split()
    if len(tokens) % 3:
        raise ValueError(f"a PredictionString has 'class confidence mask' triples; got {len(tokens)} tokens")
    out: list[tuple[int, float, str]] = []
    for k in range(0, len(tokens), 3):
        try:
            cls = int(tokens[k])
            conf = float(tokens[k + 1])
        except ValueError as exc:
            raise ValueError(f"triple {k // 3}: bad class or confidence {tokens[k]!r} {tokens[k + 1]!r}") from exc
        if not 0 <= cls <= 18:
            raise ValueError(f"triple {k // 3}: class id {cls} is outside 0-18")
        out.append((cls, conf, tokens[k + 2]))
    return out
