"""Label images kept at the size they were computed at, with the nearest-neighbour map to full resolution.

A segmenter that works on a reduced copy of a field brings its labels back by a nearest-neighbour resize:
full-resolution pixel ``(r, c)`` takes the label of working pixel ``(rows[r], cols[c])``. Everything the
pipeline reads from the full-resolution label image (each cell's box, area, centroid and border contact, each
nucleus' area, each mask's COCO RLE) follows exactly from the small image and the two index maps, so
:class:`LabelGrid` computes them there: a 2048² field segmented at 512² is read in a sixteenth of the
pixels. The results are identical to those of :func:`locus.service.cells.cell_records` and
:func:`locus.service.encoding.encode_label_masks` on the upsampled image (the tests check it pixel for
pixel); the full-resolution image itself is built once, when asked for.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from locus.service.cells import CellRecord, cell_records
from locus.service.encoding import encode_label_masks, encode_runs

__all__ = ["LabelGrid", "nearest_map"]


def nearest_map(src: int, dst: int) -> np.ndarray:
    """The source index of every destination index of OpenCV's ``INTER_NEAREST_EXACT`` resize along one axis.

    Parameters
    ----------
    src, dst : int
        Source and destination lengths (> 0).

    Returns
    -------
    numpy.ndarray
        (dst,) ``int64``, non-decreasing, taken from OpenCV itself (a resize of the index ramp), so
        ``small[rows][:, cols]`` is exactly ``cv2.resize(small, ..., interpolation=cv2.INTER_NEAREST_EXACT)``.
    """
    ramp = np.repeat(np.arange(src, dtype=np.int32)[:, None], 2, axis=1)  # two columns: OpenCV's general path
    out = cv2.resize(ramp, (2, int(dst)), interpolation=cv2.INTER_NEAREST_EXACT)
    return out[:, 0].astype(np.int64)


class LabelGrid:
    """A full-resolution label image held as a small one and its nearest-neighbour index maps.

    Parameters
    ----------
    small : numpy.ndarray
        (h, w) integer label image, 0 = background, no negative labels.
    rows : numpy.ndarray
        (H,) non-decreasing indices into ``small``'s rows.
    cols : numpy.ndarray
        (W,) non-decreasing indices into ``small``'s columns.

    Examples
    --------
    >>> grid = LabelGrid.upsampled(small, (2048, 2048))  # doctest: +SKIP
    >>> grid.records() == cell_records(grid.full())  # doctest: +SKIP
    True
    """

    def __init__(self, small: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
        small = np.asarray(small)
        if small.ndim != 2 or small.dtype.kind not in "iu":
            raise ValueError(f"expected a 2-D integer label image, got {small.dtype} of shape {small.shape}")
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        for name, m, n in (("rows", rows, small.shape[0]), ("cols", cols, small.shape[1])):
            if m.ndim != 1 or (m.size and (m.min() < 0 or m.max() >= n or np.any(np.diff(m) < 0))):
                raise ValueError(f"{name} must be non-decreasing indices into the small image's {n} {name}")
        self.small = small.astype(np.int32, copy=False)
        self.rows = rows
        self.cols = cols
        self._full: np.ndarray | None = None
        # Only the small rows and columns some full-resolution pixel takes (all of them when enlarging): the
        # "used" image, with how many full rows/columns each stands for and where its first one is.
        self._ur, self._rstart, self._rcount = np.unique(rows, return_index=True, return_counts=True)
        self._uc, self._cstart, self._ccount = np.unique(cols, return_index=True, return_counts=True)

    @classmethod
    def upsampled(cls, small: np.ndarray, shape: tuple[int, int]) -> LabelGrid:
        """The grid of ``small`` brought to ``shape`` by OpenCV's ``INTER_NEAREST_EXACT`` resize.

        Parameters
        ----------
        small : numpy.ndarray
            (h, w) integer label image.
        shape : tuple of int
            (H, W) at full resolution.

        Returns
        -------
        LabelGrid
        """
        h, w = small.shape
        return cls(small, nearest_map(h, int(shape[0])), nearest_map(w, int(shape[1])))

    @classmethod
    def identity(cls, labels: np.ndarray) -> LabelGrid:
        """A grid over a label image already at full resolution (its own full image; nothing is saved).

        Parameters
        ----------
        labels : numpy.ndarray
            (H, W) integer label image.

        Returns
        -------
        LabelGrid
        """
        grid = cls(labels, np.arange(labels.shape[0]), np.arange(labels.shape[1]))
        grid._full = grid.small
        return grid

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) at full resolution."""
        return int(self.rows.size), int(self.cols.size)

    @property
    def is_identity(self) -> bool:
        """Whether the small image is the full one."""
        h, w = self.small.shape
        return (h, w) == self.shape and self._ur.size == h and self._uc.size == w

    def full(self) -> np.ndarray:
        """The (H, W) ``int32`` label image at full resolution (built on the first call, then kept)."""
        if self._full is None:
            h, w = self.shape
            if self.is_identity:
                self._full = self.small
            elif np.array_equal(self.rows, nearest_map(self.small.shape[0], h)) and np.array_equal(
                self.cols, nearest_map(self.small.shape[1], w)
            ):
                self._full = cv2.resize(self.small, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
            else:
                self._full = np.ascontiguousarray(self.small[np.ix_(self.rows, self.cols)])
        return self._full

    def where_equal(self, other: LabelGrid) -> LabelGrid:
        """This grid's labels kept only where ``other`` has the same label (0 elsewhere), at full resolution.

        Computed on the small images when both grids share their index maps (then exactly the full-resolution
        result), else on the full images.

        Parameters
        ----------
        other : LabelGrid
            A grid of the same full size (for nuclei: the cells).

        Returns
        -------
        LabelGrid
        """
        if self.shape != other.shape:
            raise ValueError(f"grids of different sizes: {self.shape} and {other.shape}")
        if (
            self.small.shape == other.small.shape
            and np.array_equal(self.rows, other.rows)
            and np.array_equal(self.cols, other.cols)
        ):
            kept = np.where(self.small == other.small, self.small, 0).astype(np.int32, copy=False)
            grid = LabelGrid(kept, self.rows, self.cols)
            if self.is_identity:
                grid._full = grid.small
            return grid
        mine, theirs = self.full(), other.full()
        return LabelGrid.identity(np.where(mine == theirs, mine, 0).astype(np.int32, copy=False))

    def _used(self) -> np.ndarray:
        """The small image restricted to the rows and columns some full-resolution pixel takes."""
        h, w = self.small.shape
        if self._ur.size == h and self._uc.size == w:
            return self.small
        return np.ascontiguousarray(self.small[np.ix_(self._ur, self._uc)])

    def _weights(self) -> np.ndarray:
        """Full-resolution pixels each used small pixel stands for, flattened like ``_used()``."""
        return np.outer(self._rcount, self._ccount).ravel().astype(np.float64)

    def areas(self, minlength: int = 0) -> np.ndarray:
        """Full-resolution pixel count of every label (``numpy.bincount`` of :meth:`full`).

        Parameters
        ----------
        minlength : int
            Least length of the result.

        Returns
        -------
        numpy.ndarray
            ``int64`` counts indexed by label.
        """
        if self.is_identity:
            return np.bincount(self.small.ravel(), minlength=minlength)
        counts = np.bincount(self._used().ravel(), weights=self._weights(), minlength=minlength)
        return np.rint(counts).astype(np.int64)  # sums of integers below 2**53: exact

    def records(self) -> list[CellRecord]:
        """:func:`locus.service.cells.cell_records` of the full-resolution image, computed on the small one.

        Returns
        -------
        list of CellRecord
            One per label present at full resolution, sorted by id; boxes, areas and border contact equal, and
            centroids bit for bit equal to, those of the full image's records.
        """
        if self.is_identity:
            return cell_records(self.small)
        used = self._used()
        if used.size and used.min() < 0:
            raise ValueError("label images must not hold negative labels")
        slices = ndimage.find_objects(used)
        if not slices:
            return []
        flat = used.ravel()
        n = len(slices) + 1
        weights = self._weights()
        rstart, rcount = self._rstart.astype(np.float64), self._rcount.astype(np.float64)
        cstart, ccount = self._cstart.astype(np.float64), self._ccount.astype(np.float64)
        # Sum of the full-resolution row (column) indices a used small row (column) stands for.
        row_sum = rcount * rstart + rcount * (rcount - 1) / 2
        col_sum = ccount * cstart + ccount * (ccount - 1) / 2
        area = np.bincount(flat, weights=weights, minlength=n)
        sum_r = np.bincount(flat, weights=np.outer(row_sum, ccount).ravel(), minlength=n)
        sum_c = np.bincount(flat, weights=np.outer(rcount, col_sum).ravel(), minlength=n)
        rend = self._rstart + self._rcount
        cend = self._cstart + self._ccount
        h, w = self.shape
        records: list[CellRecord] = []
        for idx, sl in enumerate(slices, start=1):
            if sl is None:
                continue
            rs, cs = sl
            r0, r1 = int(self._rstart[rs.start]), int(rend[rs.stop - 1])
            c0, c1 = int(self._cstart[cs.start]), int(cend[cs.stop - 1])
            m00 = float(area[idx])
            # Box-local sums (exact integers), as cell_records has them from OpenCV's moments: the same floats.
            m01 = float(sum_r[idx] - m00 * r0)
            m10 = float(sum_c[idx] - m00 * c0)
            records.append(CellRecord.from_moments(idx, (r0, c0, r1, c1), m00, m01, m10, (h, w)))
        return records

    def encode(self, ids: list[int] | None = None) -> dict[int, dict]:
        """COCO compressed RLE of every (or the given) labels: :func:`~locus.service.encoding.encode_label_masks`
        of the full-resolution image, from the small one's runs.

        Parameters
        ----------
        ids : list of int, optional
            Labels to encode (default: every non-zero label present); a label with no pixels gets an empty mask.

        Returns
        -------
        dict of int to dict
            ``{label: {"size": [H, W], "counts": str}}``.
        """
        if self.is_identity:
            return encode_label_masks(self.small, ids)
        h, w = self.shape
        used = self._used()
        hu, wu = used.shape
        if h * w == 0 or used.size == 0:
            return encode_label_masks(np.zeros((h, w), np.int32), ids)
        flat = cv2.transpose(used).ravel()  # column-major runs of the used image, column by column
        k = np.arange(1, flat.size)
        change = np.flatnonzero((flat[1:] != flat[:-1]) | (k % hu == 0)) + 1
        starts = np.concatenate(([0], change))
        ends = np.concatenate((change, [flat.size]))
        values = flat[starts]
        fg = values != 0
        starts, ends, values = starts[fg], ends[fg], values[fg]
        col = starts // hu
        row0 = self._rstart[starts % hu]  # first full row of the run's first small row
        last = (ends - 1) % hu
        row1 = self._rstart[last] + self._rcount[last]  # end of the full rows of its last small row
        # Every small column stands for ccount full columns: repeat its runs once per full column.
        copies = self._ccount[col]
        total = int(copies.sum())
        rep = np.repeat(np.arange(starts.size), copies)
        offset = np.arange(total) - np.repeat(np.cumsum(copies) - copies, copies)
        full_col = self._cstart[col][rep] + offset
        run_start = full_col * h + row0[rep]
        run_end = full_col * h + row1[rep]
        run_value = values[rep]
        order = np.lexsort((run_start, run_value))
        return encode_runs(run_start[order], run_end[order], run_value[order], (h, w), ids)
