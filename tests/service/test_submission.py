"""Submission CSV reader, writer and resumable writer."""

from __future__ import annotations

import numpy as np
import pytest

from locus.service.encoding import encode_binary_mask
from locus.service.submission import SubmissionRow, SubmissionWriter, read_submission, write_submission


def _rows() -> list[SubmissionRow]:
    m = np.zeros((6, 8), dtype=bool)
    m[1:4, 2:5] = True
    s = encode_binary_mask(m)
    return [
        SubmissionRow("a1", 8, 6, [(0, 0.75, s), (16, 0.5, s)]),
        SubmissionRow("b2", 8, 6, []),
        SubmissionRow("c3", 8, 6, [(18, 1.0, s)]),
    ]


def test_round_trip(tmp_path):
    path = tmp_path / "submission.csv"
    assert write_submission(path, _rows()) == 3
    text = path.read_text()
    assert text.splitlines()[0] == "ID,ImageWidth,ImageHeight,PredictionString"
    assert text.splitlines()[2] == "b2,8,6,"
    back = read_submission(path)
    assert list(back) == ["a1", "b2", "c3"]
    assert back["a1"] == _rows()[0]
    assert back["b2"].predictions == []


def test_validation(tmp_path):
    path = tmp_path / "s.csv"
    with pytest.raises(ValueError, match="duplicate"):
        write_submission(path, [_rows()[0], _rows()[0]])
    path.write_text("ID,Width,Height,PredictionString\n")
    with pytest.raises(ValueError, match="header"):
        read_submission(path)
    path.write_text("ID,ImageWidth,ImageHeight,PredictionString\nx,8,6,0 0.5\n")
    with pytest.raises(ValueError, match=":2"):
        read_submission(path)
    path.write_text("ID,ImageWidth,ImageHeight,PredictionString\nx,8,6,\nx,8,6,\n")
    with pytest.raises(ValueError, match="duplicate"):
        read_submission(path)
    with pytest.raises(ValueError):
        write_submission(path, [SubmissionRow("bad id", 8, 6, [])])


def test_writer_resumes_and_repairs_partial_line(tmp_path):
    path = tmp_path / "s.csv"
    rows = _rows()
    with SubmissionWriter(path) as w:
        assert w.done == set()
        w.write(rows[0])
        w.write(rows[1])
    # Simulate a crash in the middle of the third row.
    with open(path, "a") as fh:
        fh.write("c3,8,6,18 1.0 eNo")
    with SubmissionWriter(path) as w:
        assert w.done == {"a1", "b2"}
        with pytest.raises(ValueError, match="already"):
            w.write(rows[0])
        w.write(rows[2])
    assert list(read_submission(path)) == ["a1", "b2", "c3"]
    with SubmissionWriter(path, resume=False) as w:
        assert w.done == set()
    assert read_submission(path) == {}


def test_write_many_appends_in_one_go_and_refuses_repeats(tmp_path):
    from locus.service.submission import SubmissionRow, SubmissionWriter, read_submission

    out = tmp_path / "s.csv"
    with SubmissionWriter(out) as w:
        w.write_many([SubmissionRow("a", 4, 4, []), SubmissionRow("b", 4, 4, [])])
        with pytest.raises(ValueError):
            w.write_many([SubmissionRow("c", 4, 4, []), SubmissionRow("a", 4, 4, [])])
    assert set(read_submission(out)) == {"a", "b", "c"}  # as row-by-row writes: rows before the repeat land
