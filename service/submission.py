"""Kaggle submission CSV: ``ID,ImageWidth,ImageHeight,PredictionString``.

One row per field of view; ``PredictionString`` holds space-separated
``class confidence mask`` triples (see :mod:`locus.service.encoding`). Rows are
written with :func:`write_submission` at once, or appended one by one with
:class:`SubmissionWriter`, which resumes an interrupted run: it reports the IDs
already written and drops a last line left half-written by a crash.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from locus.service.encoding import format_prediction_string, parse_prediction_string

__all__ = ["HEADER", "SubmissionRow", "write_submission", "read_submission", "SubmissionWriter"]

HEADER: tuple[str, ...] = ("ID", "ImageWidth", "ImageHeight", "PredictionString")
"""Column names of a submission file, in order."""


@dataclass
class SubmissionRow:
    """One field of view of a submission.

    Parameters
    ----------
    id : str
        Field ID.
    width, height : int
        Image size in pixels (masks are height x width).
    predictions : list of (int, float, str)
        (class, confidence, Kaggle mask string), one per (cell, class).
    """

    id: str
    width: int
    height: int
    predictions: list[tuple[int, float, str]] = field(default_factory=list)

    def to_csv_fields(self) -> list[str]:
        """Return the four CSV fields of this row.

        Returns
        -------
        list of str
        """
        if not self.id or "," in self.id or any(ch.isspace() for ch in self.id):
            raise ValueError(f"bad field ID {self.id!r}: it must be non-empty, without commas or whitespace")
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ValueError(f"{self.id}: image size must be positive, got {self.width}x{self.height}")
        return [self.id, str(int(self.width)), str(int(self.height)), format_prediction_string(self.predictions)]


def _row_line(row: SubmissionRow) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(row.to_csv_fields())
    return buf.getvalue()


def write_submission(path: str | os.PathLike, rows: Iterable[SubmissionRow]) -> int:
    """Write a whole submission CSV (overwriting ``path``).

    Parameters
    ----------
    path : path-like
        Output file.
    rows : iterable of SubmissionRow
        The rows; IDs must be unique.

    Returns
    -------
    int
        Number of rows written.

    Raises
    ------
    ValueError
        A duplicate ID or an invalid row.
    """
    seen: set[str] = set()
    tmp = Path(str(path) + ".tmp")
    n = 0
    with open(tmp, "w", encoding="ascii", newline="") as fh:
        fh.write(",".join(HEADER) + "\n")
        for row in rows:
            if row.id in seen:
                raise ValueError(f"duplicate ID {row.id!r} in submission")
            seen.add(row.id)
            fh.write(_row_line(row))
            n += 1
    os.replace(tmp, path)
    return n


def read_submission(path: str | os.PathLike) -> dict[str, SubmissionRow]:
    """Read a submission CSV.

    Parameters
    ----------
    path : path-like
        CSV with header ``ID,ImageWidth,ImageHeight,PredictionString``.

    Returns
    -------
    dict of str to SubmissionRow
        By ID, in file order.

    Raises
    ------
    ValueError
        Wrong header, a malformed row (with its line number) or a duplicate ID.
    """
    out: dict[str, SubmissionRow] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        # One field's PredictionString (19 classes x every cell x its mask) exceeds csv's default 128 KiB field limit.
        csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != list(HEADER):
            raise ValueError(f"{path}: the header must be {','.join(HEADER)}; got {header!r}")
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) == 3:
                row = [*row, ""]
            if len(row) != 4:
                raise ValueError(f"{path}:{line}: expected 4 fields, got {len(row)}")
            ident = row[0].strip()
            try:
                width, height = int(row[1]), int(row[2])
                preds = parse_prediction_string(row[3])
            except ValueError as exc:
                raise ValueError(f"{path}:{line} ({ident}): {exc}") from exc
            if width <= 0 or height <= 0:
                raise ValueError(f"{path}:{line} ({ident}): image size must be positive, got {width}x{height}")
            if ident in out:
                raise ValueError(f"{path}:{line}: duplicate ID {ident!r}")
            out[ident] = SubmissionRow(ident, width, height, preds)
    return out


class SubmissionWriter:
    """Append submission rows one at a time, resuming an earlier partial file.

    Each row is flushed (and fsynced) as it is written, so a crash loses at
    most the row being written; on resume a trailing half-written line is
    removed and the IDs already present are in :attr:`done`.

    Parameters
    ----------
    path : path-like
        The submission CSV.
    resume : bool
        Keep the rows of an existing file (default). With False an existing
        file is overwritten.

    Examples
    --------
    >>> with SubmissionWriter("submission.csv") as w:  # doctest: +SKIP
    ...     for ref in fields:
    ...         if ref.id in w.done:
    ...             continue
    ...         w.write(SubmissionRow(ref.id, width, height, preds))
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = True):
        self.path = Path(path)
        self.done: set[str] = set()
        if resume and self.path.exists() and self.path.stat().st_size > 0:
            self._repair_tail()
            self.done = set(read_submission(self.path))
            self._fh = open(self.path, "a", encoding="ascii", newline="")  # noqa: SIM115
        else:
            self._fh = open(self.path, "w", encoding="ascii", newline="")  # noqa: SIM115
            self._fh.write(",".join(HEADER) + "\n")
            self._flush()

    def _repair_tail(self) -> None:
        data = self.path.read_bytes()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # not even a complete header line
            self.path.write_bytes(",".join(HEADER).encode("ascii") + b"\n")
            return
        with open(self.path, "r+b") as fh:
            fh.truncate(cut)

    def _flush(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def write(self, row: SubmissionRow) -> None:
        """Append one row.

        Parameters
        ----------
        row : SubmissionRow
            Its ID must not be written yet.

        Raises
        ------
        ValueError
            If the ID is already in the file.
        """
        if row.id in self.done:
            raise ValueError(f"ID {row.id!r} is already in {self.path}")
        self._fh.write(_row_line(row))
        self._flush()
        self.done.add(row.id)

    def write_many(self, rows: list[SubmissionRow]) -> None:
        """Append several rows with one flush and fsync (a batch driver writing many small rows).

        Behaves as :meth:`write` called row by row: the rows before a repeated ID are written,
        then ``ValueError`` is raised.

        Parameters
        ----------
        rows : list of SubmissionRow
            Rows whose IDs are not written yet.

        Raises
        ------
        ValueError
            If an ID is already in the file (or earlier in ``rows``).
        """
        lines: list[str] = []
        clash = None
        for r in rows:
            if r.id in self.done:
                clash = r.id
                break
            lines.append(_row_line(r))
            self.done.add(r.id)
        if lines:
            self._fh.write("".join(lines))
            self._flush()
        if clash is not None:
            raise ValueError(f"ID {clash!r} is already in {self.path}")

    def close(self) -> None:
        """Close the file."""
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> SubmissionWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
