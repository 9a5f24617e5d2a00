"""Per-cell records from a label image: id, bounding box, area, centroid, border contact.

Conventions follow scikit-image: coordinates are (row, column), boxes are
``(row0, col0, row1, col1)`` with the end exclusive.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
from scipy import ndimage

__all__ = ["CellRecord", "cell_records", "label_mask"]


@dataclass(frozen=True)
class CellRecord:
    """One cell of a label image.

    Parameters
    ----------
    id : int
        The cell's label.
    bbox : tuple of int
        (row0, col0, row1, col1), end-exclusive.
    area : int
        Number of pixels.
    centroid : tuple of float
        (row, column) mean of the cell's pixel coordinates.
    touches_border : bool
        Whether a pixel of the cell lies on the first or last row or column
        (the cell may be cut by the image border).
    """

    id: int
    bbox: tuple[int, int, int, int]
    area: int
    centroid: tuple[float, float]
    touches_border: bool

    def to_dict(self) -> dict:
        """Return the record as a JSON-serialisable dict."""
        data = asdict(self)
        data["bbox"] = list(self.bbox)
        data["centroid"] = list(self.centroid)
        return data


def label_mask(labels: np.ndarray, value: int) -> np.ndarray:
    """``labels == value`` as a 0/255 ``uint8`` mask (OpenCV's compare for ``int32``, several times numpy's speed).

    Parameters
    ----------
    labels : numpy.ndarray
        (H, W) integer label image.
    value : int
        The label.

    Returns
    -------
    numpy.ndarray
        (H, W) ``uint8``, 255 where ``labels == value``.
    """
    if labels.dtype == np.int32 and min(labels.shape) > 4:  # (OpenCV reads arrays of <= 4 rows or columns as scalars)
        return cv2.compare(labels, int(value), cv2.CMP_EQ)
    return (labels == value).astype(np.uint8) * np.uint8(255)


def cell_records(labels: np.ndarray) -> list[CellRecord]:
    """Records of every cell in a label image.

    Parameters
    ----------
    labels : numpy.ndarray
        (H, W) integer label image, 0 = background; ids need not be consecutive.

    Returns
    -------
    list of CellRecord
        One per label present, sorted by id.

    Raises
    ------
    ValueError
        ``labels`` is not 2-D, not integer, or has negative labels.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected a 2-D label image, got shape {labels.shape}")
    if labels.dtype.kind not in "iu" and labels.dtype != bool:
        raise ValueError(f"expected an integer label image, got dtype {labels.dtype}")
    if labels.size == 0:
        return []
    if labels.dtype == bool:
        labels = labels.view(np.uint8)
    if labels.dtype.kind == "i" and labels.min() < 0:
        raise ValueError("label images must not hold negative labels")
    slices = ndimage.find_objects(labels)
    h, w = labels.shape
    records: list[CellRecord] = []
    for idx, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        rs, cs = sl
        # OpenCV's moments of the 0/255 mask: integer sums, so area and centroid are exactly numpy's
        # (pixel count; mean row and column, one rounding each), in a fraction of the time.
        m = cv2.moments(label_mask(labels[sl], idx), binaryImage=True)
        area = int(m["m00"])
        centroid = (float(m["m01"] / m["m00"] + rs.start), float(m["m10"] / m["m00"] + cs.start))
        touches = rs.start == 0 or cs.start == 0 or rs.stop == h or cs.stop == w
        records.append(
            CellRecord(
                id=idx,
                bbox=(int(rs.start), int(cs.start), int(rs.stop), int(cs.stop)),
                area=area,
                centroid=centroid,
                touches_border=bool(touches),
            )
        )
    return records
