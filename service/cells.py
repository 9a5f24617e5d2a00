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

    @classmethod
    def from_moments(
        cls, id: int, bbox: tuple[int, int, int, int], m00: float, m01: float, m10: float, shape: tuple[int, int]
    ) -> CellRecord:
        """A record from a cell's box and its box-local moments (OpenCV's ``m00``, ``m01``, ``m10``).

        Parameters
        ----------
        id : int
            The cell's label.
        bbox : tuple of int
            (row0, col0, row1, col1), end-exclusive.
        m00, m01, m10 : float
            Pixel count, and the sums of the pixels' rows and columns measured from the box's corner (exact
            integers), so the centroid is one division and one addition, the same floats whoever sums them.
        shape : tuple of int
            (H, W) of the label image.

        Returns
        -------
        CellRecord
        """
        r0, c0, r1, c1 = (int(v) for v in bbox)
        h, w = shape
        return cls(
            id=int(id),
            bbox=(r0, c0, r1, c1),
            area=int(m00),
            centroid=(float(m01 / m00 + r0), float(m10 / m00 + c0)),
            touches_border=bool(r0 == 0 or c0 == 0 or r1 == h or c1 == w),
        )

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
        box = (rs.start, cs.start, rs.stop, cs.stop)
        records.append(CellRecord.from_moments(idx, box, m["m00"], m["m01"], m["m10"], (h, w)))
    return records
