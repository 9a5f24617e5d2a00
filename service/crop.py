"""The crop rule: (field, cell label image, cell id) -> model input.

This is the one function both training and the service call to turn a cell
into the tensor the classifier sees; a test proves the two sides produce
identical tensors. The rule, recorded in every model manifest:

1. Take the cell's bounding box (rows, columns) in the full-resolution label image.
2. Make it square around its centre, side = ``max(height, width) * (1 + 2 * padding)``
   (at least ``min_side`` pixels), and cut that window from the field; parts of the
   window outside the image are zero.
3. When ``mask_other_cells`` is set, zero every pixel that belongs to another cell
   (label not 0 and not this cell); background pixels are kept.
4. Resize to ``size`` x ``size`` (area interpolation when shrinking, linear when
   enlarging) and bring values to float32 0-255 (:func:`locus.service.imaging.to_unit255`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from scipy import ndimage

from locus.service.cells import label_mask
from locus.service.imaging import UINT16_TO_255

__all__ = ["CropRule", "cell_boxes", "crop_cell", "crop_cells", "square_window"]


@dataclass(frozen=True)
class CropRule:
    """How a cell becomes a model input.

    Parameters
    ----------
    size : int
        Side of the square model input in pixels.
    padding : float
        Context added on each side, as a fraction of the bounding box's longer side.
    mask_other_cells : bool
        Zero the pixels of other cells inside the window.
    min_side : int
        Smallest window side in full-resolution pixels (tiny fragments are not blown up).
    """

    size: int = 128
    padding: float = 0.1
    mask_other_cells: bool = True
    min_side: int = 16

    def to_dict(self) -> dict:
        """Return the rule as a JSON-serialisable dict (stored in the manifest)."""
        return asdict(self)


MAX_WINDOW_SIDE = 8192
"""Largest crop window built at full resolution; a larger window (a cell over about 6800 px long) is reduced
by an integer factor before the final resize, so a crop never allocates more than about the field itself."""


def cell_boxes(labels: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """Bounding boxes of every cell in a label image.

    Parameters
    ----------
    labels : numpy.ndarray
        (H, W) integer label image, 0 = background.

    Returns
    -------
    dict
        ``{cell_id: (row0, col0, row1, col1)}``, end-exclusive.
    """
    boxes: dict[int, tuple[int, int, int, int]] = {}
    for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is not None:
            boxes[idx] = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
    return boxes


def square_window(box: tuple[int, int, int, int], rule: CropRule) -> tuple[int, int, int, int]:
    """The square window (row0, col0, row1, col1) the rule cuts around a bounding box.

    Parameters
    ----------
    box : tuple of int
        (row0, col0, row1, col1), end-exclusive.
    rule : CropRule
        The crop rule.

    Returns
    -------
    tuple of int
        The window; it may extend beyond the image.
    """
    r0, c0, r1, c1 = box
    side = max(r1 - r0, c1 - c0)
    side = max(int(round(side * (1.0 + 2.0 * rule.padding))), rule.min_side)
    rc = (r0 + r1) / 2.0
    cc = (c0 + c1) / 2.0
    wr0 = int(np.floor(rc - side / 2.0))
    wc0 = int(np.floor(cc - side / 2.0))
    return wr0, wc0, wr0 + side, wc0 + side


def crop_cell(
    image: np.ndarray,
    labels: np.ndarray,
    cell_id: int,
    rule: CropRule,
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Cut one cell out of a field as a model input.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W, C) field, ``uint8``, ``uint16`` or float 0-255.
    labels : numpy.ndarray
        (H, W) integer cell label image.
    cell_id : int
        The cell's label.
    rule : CropRule
        The crop rule.
    box : tuple of int, optional
        The cell's bounding box, when already known (see :func:`cell_boxes`).

    Returns
    -------
    numpy.ndarray
        (size, size, C) ``float32`` in 0-255.
    """
    if box is None:
        rows, cols = np.nonzero(labels == cell_id)
        if rows.size == 0:
            raise ValueError(f"cell {cell_id} is not in the label image")
        box = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
    h, w = labels.shape
    wr0, wc0, wr1, wc1 = square_window(box, rule)
    side = wr1 - wr0
    sr0, sc0, sr1, sc1 = max(wr0, 0), max(wc0, 0), min(wr1, h), min(wc1, w)
    # The window in the image's own dtype, other cells zeroed with one masked copy (cheap integer work); the
    # float conversion and the value scale come after, on as few pixels as possible.
    k = max(1, -(-side // MAX_WINDOW_SIDE))  # > 1 only for windows larger than any real cell
    wside = -(-side // k)
    window = np.zeros((wside, wside, image.shape[2]), dtype=np.float32)
    if sr1 > sr0 and sc1 > sc0:
        src = image[sr0:sr1, sc0:sc1]
        if rule.mask_other_cells:
            lab = labels[sr0:sr1, sc0:sc1]
            keep = cv2.bitwise_or(label_mask(lab, 0), label_mask(lab, cell_id))
            src = cv2.copyTo(np.ascontiguousarray(src), keep)
            if src.ndim == 2:
                src = src[:, :, None]
        if k == 1:
            window[sr0 - wr0 : sr1 - wr0, sc0 - wc0 : sc1 - wc0] = src
        else:
            # A window over MAX_WINDOW_SIDE (a cell longer than the largest real field): reduce the part inside
            # the image by k first, so memory is bounded by the image, never by the window.
            oh, ow = -(-(sr1 - sr0) // k), -(-(sc1 - sc0) // k)
            small = cv2.resize(src.astype(np.float32), (ow, oh), interpolation=cv2.INTER_AREA)
            small = small.reshape(oh, ow, -1)
            r, c = (sr0 - wr0) // k, (sc0 - wc0) // k
            oh, ow = min(oh, wside - r), min(ow, wside - c)
            window[r : r + oh, c : c + ow] = small[:oh, :ow]
    if wside != rule.size:
        interp = cv2.INTER_AREA if wside > rule.size else cv2.INTER_LINEAR
        window = cv2.resize(window, (rule.size, rule.size), interpolation=interp)
        if window.ndim == 2:  # cv2 drops a single channel axis
            window = window[:, :, None]
    if image.dtype == np.uint16:
        window *= UINT16_TO_255  # the one value rule (locus.service.imaging.to_unit255), after the linear resize
    return np.ascontiguousarray(window, dtype=np.float32)


def crop_cells(
    image: np.ndarray,
    labels: np.ndarray,
    rule: CropRule,
    cell_ids: list[int] | None = None,
    boxes: dict[int, tuple[int, int, int, int]] | None = None,
) -> tuple[list[int], np.ndarray]:
    """Crop every (or the given) cells of a field.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W, C) field.
    labels : numpy.ndarray
        (H, W) integer cell label image.
    rule : CropRule
        The crop rule.
    cell_ids : list of int, optional
        Cells to crop, default all present, in increasing id order.
    boxes : dict, optional
        ``{cell_id: (row0, col0, row1, col1)}`` when already known (:func:`cell_boxes`), so the label
        image is not scanned again.

    Returns
    -------
    ids : list of int
        The cell ids, in the order of the batch.
    batch : numpy.ndarray
        (N, size, size, C) ``float32`` in 0-255.
    """
    boxes = cell_boxes(labels) if boxes is None else boxes
    ids = sorted(boxes) if cell_ids is None else list(cell_ids)
    batch = np.zeros((len(ids), rule.size, rule.size, image.shape[2]), dtype=np.float32)

    def crop_some(ks: range) -> None:
        for k in ks:
            batch[k] = crop_cell(image, labels, ids[k], rule, boxes.get(ids[k]))

    # Cells are independent and OpenCV and numpy's copies release the GIL: a few threads share them out
    # (same crops, less wall time on a multi-core host).
    workers = min(_CROP_THREADS, len(ids) // _CELLS_PER_THREAD)
    if workers <= 1:
        crop_some(range(len(ids)))
    else:
        list(_crop_pool().map(crop_some, [range(i, len(ids), workers) for i in range(workers)]))
    return ids, batch


#: Threads that crop one field's cells (at most), and the fewest cells worth a thread.
_CROP_THREADS = min(4, os.cpu_count() or 1)
_CELLS_PER_THREAD = 4
_CROP_POOL: ThreadPoolExecutor | None = None


def _crop_pool() -> ThreadPoolExecutor:
    global _CROP_POOL
    if _CROP_POOL is None:
        _CROP_POOL = ThreadPoolExecutor(max_workers=_CROP_THREADS, thread_name_prefix="locus-crop")
    return _CROP_POOL
