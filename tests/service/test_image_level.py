"""Image-level mode of the metric (fields with image labels only) and ``locus eval --image-level``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from locus.cli import main
from locus.service.classes import NUM_CLASSES
from locus.service.metric import (
    cell_probabilities_from_submission,
    evaluate_image_level,
    evaluate_image_level_csv,
    field_calls,
)
from locus.service.submission import SubmissionRow, write_submission

THR = np.full(NUM_CLASSES, 0.5)


def _cells(*rows: dict[int, float]) -> np.ndarray:
    p = np.zeros((len(rows), NUM_CLASSES))
    for i, r in enumerate(rows):
        for k, v in r.items():
            p[i, k] = v
    return p


def test_field_calls_found_missed_and_dominant_wrong_classes():
    # 5 cells; true labels ER (6) and Golgi (7). ER on 4 cells, Golgi on none, nuclear membrane (1) on 2 of 5
    probs = _cells({6: 0.9, 1: 0.6}, {6: 0.8, 1: 0.7}, {6: 0.7}, {6: 0.6, 7: 0.4}, {16: 0.55})
    f = field_calls("f", [7, 6], probs, THR)
    assert f.true_labels == [6, 7]
    assert f.called == {1: 2, 6: 4, 16: 1}
    assert f.top == {6: 4, 16: 1}
    assert f.found == [6] and f.missed == [7]
    assert f.wrong_dominant == [1]  # 2/5 = 40%: at the limit counts; cytosol on 1/5 does not
    assert f.image_scores[7] == pytest.approx(0.4)


def test_image_level_ap_uses_the_highest_cell_score():
    labels = {"a": [6], "b": [6], "c": [18]}
    probs = {
        "a": _cells({6: 0.2}, {6: 0.9}),  # image score 0.9
        "b": _cells({6: 0.3}),  # 0.3
        "c": _cells({6: 0.5}, {18: 0.9}),  # 0.5: a negative image ranked between the two positives
    }
    res = evaluate_image_level(labels, probs, THR)
    # ER ranking: a (tp), c (fp), b (tp) -> AP = (1/1 + 2/3) / 2
    assert res.ap[6] == pytest.approx((1 + 2 / 3) / 2)
    assert res.ap[18] == pytest.approx(1.0)
    assert math.isnan(res.ap[0])  # no image carries it
    assert res.labels_found == (2, 3)  # b's ER (0.3) is not called
    assert res.fields_with_wrong_dominant == 1  # c: ER on 1 of 2 cells
    assert "image-level mAP" in res.table()
    d = res.to_dict()
    assert d["labels_found"] == 2 and d["fields"][0]["found"] == ["Endoplasmic reticulum"]


def test_cells_from_a_submission_row_are_distinct_masks():
    preds = [(6, 0.9, "m1"), (1, 0.2, "m1"), (6, 0.1, "m2"), (18, 0.8, "m2")]
    p = cell_probabilities_from_submission(preds)
    assert p.shape == (2, NUM_CLASSES)
    assert p[0, 6] == 0.9 and p[0, 1] == 0.2 and p[1, 18] == 0.8 and p[1, 0] == 0.0


def test_locus_eval_image_level(tmp_path: Path, capsys):
    (tmp_path / "train.csv").write_text("ID,Label\nf1,6\nf2,18\n")
    rows = [
        SubmissionRow("f1", 8, 8, [(6, 0.9, "a"), (18, 0.1, "a"), (6, 0.7, "b"), (1, 0.8, "b")]),
        SubmissionRow("f2", 8, 8, [(6, 0.2, "c"), (18, 0.9, "c")]),
    ]
    csv_path = tmp_path / "sub.csv"
    write_submission(csv_path, rows)
    res = evaluate_image_level_csv(tmp_path / "train.csv", csv_path, THR)
    assert res.labels_found == (2, 2)
    assert res.fields[0].wrong_dominant == [1]
    out_json = tmp_path / "r.json"
    rc = main(
        ["eval", "--truth", str(tmp_path), "--predictions", str(csv_path), "--image-level", "--threshold", "0.5"]
        + ["--json", str(out_json)]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "true labels called on >= 1 cell: 2/2" in text
    assert "Nuclear membrane" in text
    assert out_json.is_file()


def test_locus_eval_image_level_uses_the_models_thresholds_for_its_views(tmp_path: Path, capsys):
    """Predictions averaged over 8 views are judged with the model's 8-view thresholds (``--tta 8``)."""
    import json

    from tests.modelfolder import write_model_folder

    model = write_model_folder(tmp_path / "m", thresholds=0.95)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["view_thresholds"] = {"8": [0.5] * NUM_CLASSES}
    (model / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "train.csv").write_text("ID,Label\nf1,6\n")
    csv_path = tmp_path / "sub.csv"
    write_submission(csv_path, [SubmissionRow("f1", 8, 8, [(6, 0.9, "a"), (6, 0.7, "b")])])
    base = ["eval", "--truth", str(tmp_path), "--predictions", str(csv_path), "--image-level", "--model", str(model)]
    assert main(base) == 0
    assert "true labels called on >= 1 cell: 0/1" in capsys.readouterr().out  # 0.9 < 0.95, the one-view threshold
    assert main([*base, "--tta", "8"]) == 0
    assert "true labels called on >= 1 cell: 1/1" in capsys.readouterr().out  # 0.9 >= 0.5, the 8-view threshold
