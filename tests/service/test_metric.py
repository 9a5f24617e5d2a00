"""The competition metric on hand-worked cases, and against an independent implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from locus.service.encoding import encode_binary_mask, encode_mask_coco
from locus.service.metric import (
    average_precision,
    evaluate,
    map_difference,
    map_interval,
    match_image,
    paired_maps,
    segmentation_scores,
    truth_from_labels,
)

H, W = 40, 60


def _rect(r0: int, r1: int, c0: int, c1: int, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def _pixels(mask: np.ndarray, n: int) -> np.ndarray:
    """The first n pixels of a mask (row-major), as a mask."""
    out = np.zeros_like(mask)
    rr, cc = np.nonzero(mask)
    out[rr[:n], cc[:n]] = True
    return out


# Three cells of one image; cell B has two classes.
A = _rect(0, 10, 0, 10)  # 100 px
B = _rect(15, 25, 0, 10)
C = _rect(0, 10, 20, 30)


def _truth(*cells: tuple[np.ndarray, list[int]]) -> list[tuple[dict, list[int]]]:
    return [(encode_mask_coco(m), classes) for m, classes in cells]


def test_perfect_predictions_score_one():
    truth = {"img": _truth((A, [0]), (B, [0, 16]), (C, [5]))}
    preds = {
        "img": [
            (0, 0.9, encode_binary_mask(A)),
            (0, 0.8, encode_binary_mask(B)),
            (16, 0.7, encode_binary_mask(B)),
            (5, 0.6, encode_mask_coco(C)),
        ]
    }
    res = evaluate(truth, preds)
    assert res.mean_ap == 1.0 and res.mAP == 1.0
    assert res.ap[0] == 1.0 and res.ap[16] == 1.0 and res.ap[5] == 1.0
    assert res.n_gt[0] == 2 and res.n_pred[0] == 2 and res.n_tp[0] == 2


def test_absent_classes_are_nan_and_excluded():
    truth = {"img": _truth((A, [0]), (B, [1]))}
    preds = {
        "img": [(0, 0.9, encode_binary_mask(A)), (1, 0.8, encode_binary_mask(B)), (7, 0.95, encode_binary_mask(C))]
    }  # class 7 has no GT anywhere
    res = evaluate(truth, preds)
    assert math.isnan(res.ap[7]) and res.n_pred[7] == 1
    assert all(math.isnan(res.ap[c]) for c in range(19) if c not in (0, 1))
    assert res.mean_ap == 1.0  # mean over the 2 classes with GT only
    assert "n/a" in res.table() and res.table().splitlines()[-1] == "mAP: 1.000"
    assert res.to_dict()["classes"][7]["ap"] is None
    assert math.isnan(evaluate({"img": []}, {"img": []}).mean_ap)


def test_swapped_classes_score_zero():
    truth = {"img": _truth((A, [0]), (B, [1]))}
    preds = {"img": [(1, 0.9, encode_binary_mask(A)), (0, 0.8, encode_binary_mask(B))]}
    res = evaluate(truth, preds)
    assert res.ap[0] == 0.0 and res.ap[1] == 0.0 and res.mean_ap == 0.0


@pytest.mark.parametrize(("n_pixels", "hit"), [(59, False), (60, True), (61, True), (100, True)])
def test_iou_threshold_exact_pixels(n_pixels: int, hit: bool):
    # Prediction = n of the 100 GT pixels: IoU = n / 100 exactly. 0.59 misses, 0.60 (inclusive) and 0.61 hit.
    truth = {"img": _truth((A, [3]))}
    pred = _pixels(A, n_pixels)
    assert pred.sum() == n_pixels
    res = evaluate(truth, {"img": [(3, 0.5, encode_binary_mask(pred))]})
    assert res.ap[3] == (1.0 if hit else 0.0)


def test_iou_just_below_and_above_with_superset():
    # GT = 60 px of A; prediction = A (100 px) minus k pixels outside the GT: IoU = 60 / (100 - k).
    gt = _pixels(A, 60)
    outside = A & ~gt
    for removed, expected in [(0, 1.0), (1, 1.0)]:  # 60/100 = 0.6 hit, 60/99 > 0.6 hit
        pred = A & ~_pixels(outside, removed)
        assert evaluate({"i": _truth((gt, [2]))}, {"i": [(2, 1.0, encode_binary_mask(pred))]}).ap[2] == expected
    pred = A | _rect(10, 11, 0, 1)  # 101 px: IoU 60/101 < 0.6
    assert evaluate({"i": _truth((gt, [2]))}, {"i": [(2, 1.0, encode_binary_mask(pred))]}).ap[2] == 0.0


def test_duplicate_is_false_positive():
    truth = {"img": _truth((A, [0]), (B, [0]))}
    a, b = encode_binary_mask(A), encode_binary_mask(B)
    # Duplicate of A ranked below both true matches: TP, TP, FP -> AP 1.
    assert evaluate(truth, {"img": [(0, 0.9, a), (0, 0.8, b), (0, 0.7, a)]}).ap[0] == 1.0
    # Duplicate ranked between: TP, FP, TP -> precision 1, 1/2, 2/3 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    res = evaluate(truth, {"img": [(0, 0.9, a), (0, 0.8, a), (0, 0.7, b)]})
    assert res.ap[0] == pytest.approx(5 / 6, abs=1e-12)
    assert res.n_tp[0] == 2 and res.n_pred[0] == 3
    # One GT, two matching predictions: the higher-confidence one is the TP, even with the lower IoU.
    ious = np.array([[0.7], [1.0]])
    np.testing.assert_array_equal(match_image(None, [0.9, 0.8], None, ious=ious), [True, False])
    np.testing.assert_array_equal(match_image(None, [0.8, 0.9], None, ious=ious), [False, True])


def test_confidence_order_changes_ap():
    # 3 GT cells, 3 exact predictions and 9 misses. Perfect order: AP 1.
    cells = [_rect(0, 8, 8 * k, 8 * k + 6) for k in range(3)]
    truth = {"img": _truth(*[(m, [4]) for m in cells])}
    miss = encode_binary_mask(_rect(30, 40, 50, 60))
    hits = [encode_binary_mask(m) for m in cells]

    def preds(hit_ranks: list[int]) -> dict:
        out = []
        h = iter(hits)
        for rank in range(1, 13):
            out.append((4, 1.0 - rank / 100, next(h) if rank in hit_ranks else miss))
        return {"img": out}

    assert evaluate(truth, preds([1, 2, 3])).ap[4] == 1.0
    # TPs at ranks 1, 4, 12: precisions 1, 2/4, 3/12 -> AP = (1 + 1/2 + 1/4) / 3 = 7/12 = 0.58333...
    assert evaluate(truth, preds([1, 4, 12])).ap[4] == pytest.approx(7 / 12, abs=1e-12)
    # TPs at ranks 2, 3, 12: precisions 1/2, 2/3, 1/4 -> monotone 2/3, 2/3, 1/4 -> AP = (2/3 + 2/3 + 1/4) / 3.
    assert evaluate(truth, preds([2, 3, 12])).ap[4] == pytest.approx((2 / 3 + 2 / 3 + 1 / 4) / 3, abs=1e-12)


def test_average_precision_direct():
    assert math.isnan(average_precision([0.5], [False], 0))
    assert average_precision([], [], 3) == 0.0
    assert average_precision([0.9, 0.8], [False, True], 1) == 0.5
    # Ties: stable sort keeps input order (FP first -> 0.5; TP first -> 1.0).
    assert average_precision([0.5, 0.5], [False, True], 1) == 0.5
    assert average_precision([0.5, 0.5], [True, False], 1) == 1.0
    # Only the ranking matters.
    assert average_precision([3.0, 2.0, 1.0], [True, False, True], 2) == average_precision(
        [0.3, 0.2, 0.1], [True, False, True], 2
    )
    with pytest.raises(ValueError):
        average_precision([0.1, 0.2], [True, True], 1)


def test_multilabel_cells_and_fp_in_image_without_class():
    truth = {"i1": _truth((A, [0, 16])), "i2": _truth((B, [1]))}
    a, b = encode_binary_mask(A), encode_binary_mask(B)
    res = evaluate(truth, {"i1": [(0, 0.9, a)], "i2": [(1, 0.9, b)]})
    assert res.ap[0] == 1.0 and res.ap[16] == 0.0 and res.ap[1] == 1.0
    assert res.mean_ap == pytest.approx(2 / 3)
    res = evaluate(truth, {"i1": [(0, 0.9, a), (16, 0.1, a)], "i2": [(1, 0.9, b)]})
    assert res.mean_ap == 1.0
    # Class 0 predicted on i2 (no class-0 GT there), ranked first: FP, TP -> AP 1/2.
    res = evaluate(truth, {"i1": [(0, 0.5, a), (16, 0.5, a)], "i2": [(1, 0.9, b), (0, 0.9, b)]})
    assert res.ap[0] == 0.5 and res.n_gt[0] == 1


def test_missing_and_extra_images_and_size_check():
    truth = {"i1": _truth((A, [0])), "i2": _truth((B, [0]))}
    with pytest.warns(UserWarning, match="not in the truth"):
        res = evaluate(truth, {"i1": [(0, 0.9, encode_binary_mask(A))], "zz": []})
    assert res.ap[0] == 0.5 and res.missing_ids == ["i2"] and res.extra_ids == ["zz"]

    class Row:
        width, height = W + 1, H
        predictions = [(0, 0.9, encode_binary_mask(A))]

    with pytest.raises(ValueError, match="truth is"):
        evaluate(truth, {"i1": Row()})


def test_truth_from_labels():
    labels = np.zeros((H, W), dtype=np.uint16)
    labels[A] = 1
    labels[B] = 2
    labels[C] = 3
    with pytest.warns(UserWarning, match="no labels"):
        cells = truth_from_labels(labels, {1: [0], 2: [16, 0]})
    assert [c for _, c in cells] == [[0], [0, 16]]
    assert cells[1][0] == encode_mask_coco(B)


# ---- independent reference implementation (pixel IoU, python loops, VOC-style AP sum) ----


def _reference_map(truth_masks, preds, thr=0.6):
    """truth_masks: {img: [(mask, classes)]}; preds: {img: [(cls, score, mask)]}."""
    aps = {}
    for c in range(19):
        n_gt = sum(c in cl for cells in truth_masks.values() for _, cl in cells)
        ranked = []  # (score, is_tp) in image order then per-image input order
        for img, cells in truth_masks.items():
            gts = [m for m, cl in cells if c in cl]
            used = [False] * len(gts)
            mine = [(s, m) for cc, s, m in preds.get(img, []) if cc == c]
            decided = {}
            for idx in sorted(range(len(mine)), key=lambda i: -mine[i][0]):
                m = mine[idx][1]
                best, best_j = -1.0, -1
                for j, g in enumerate(gts):
                    inter = np.logical_and(m, g).sum()
                    union = np.logical_or(m, g).sum()
                    iou = inter / union if union else 0.0
                    if iou > best:
                        best, best_j = iou, j
                ok = best_j >= 0 and best >= thr and not used[best_j]
                if ok:
                    used[best_j] = True
                decided[idx] = ok
            ranked += [(mine[i][0], decided[i]) for i in range(len(mine))]
        if n_gt == 0:
            continue
        ranked = sorted(ranked, key=lambda t: -t[0])
        precisions = []
        n_tp = 0
        for k, (_, ok) in enumerate(ranked, start=1):
            n_tp += ok
            precisions.append((n_tp / k, ok))
        ap = 0.0
        for k, (_, ok) in enumerate(precisions):
            if ok:
                ap += max(p for p, _ in precisions[k:]) / n_gt
        aps[c] = ap
    return aps


def test_against_independent_implementation():
    rng = np.random.default_rng(7)
    shape = (24, 30)
    for _trial in range(40):
        truth_masks, preds = {}, {}
        for img in range(3):
            labels = np.zeros(shape, dtype=np.int32)
            n_cells = int(rng.integers(0, 5))
            for k in range(n_cells):
                r, c = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
                labels[r : r + rng.integers(4, 9), c : c + rng.integers(4, 9)] = k + 1
            cells = []
            for k in range(1, n_cells + 1):
                m = labels == k
                if m.any():
                    cells.append((m, sorted(set(rng.choice(4, size=rng.integers(1, 3)).tolist()))))
            truth_masks[f"im{img}"] = cells
            plist = []
            for _ in range(int(rng.integers(0, 8))):
                cls = int(rng.integers(0, 4))
                if cells and rng.random() < 0.7:
                    base, cell_cls = cells[int(rng.integers(len(cells)))]
                    base = base.copy()
                    if rng.random() < 0.8:
                        cls = int(rng.choice(cell_cls))
                    # Perturb: drop/add a few pixels so that IoUs spread around 0.6.
                    rr, cc = np.nonzero(base)
                    drop = rng.random(len(rr)) < rng.uniform(0, 0.6)
                    base[rr[drop], cc[drop]] = False
                    if not base.any():
                        base[rr[0], cc[0]] = True
                else:
                    base = np.zeros(shape, dtype=bool)
                    r, c = rng.integers(0, shape[0] - 5), rng.integers(0, shape[1] - 5)
                    base[r : r + 5, c : c + 5] = True
                plist.append((cls, float(np.round(rng.random(), 1)), base))  # ties on purpose
            preds[f"im{img}"] = plist
        ref = _reference_map(truth_masks, preds)
        truth = {i: [(encode_mask_coco(m), cl) for m, cl in cells] for i, cells in truth_masks.items()}
        enc = {i: [(c, s, encode_binary_mask(m)) for c, s, m in p] for i, p in preds.items()}
        res = evaluate(truth, enc)
        for c in range(19):
            if c in ref:
                assert res.ap[c] == pytest.approx(ref[c], abs=1e-12), (c, res.ap[c], ref[c])
            else:
                assert math.isnan(res.ap[c])


def test_map_interval_is_a_bootstrap_over_images():
    """Each resample is scored as evaluate() scores the same images listed with repeats; the interval brackets
    the mAP and collapses when every image is alike."""
    good = _truth((A, [0]), (C, [5]))
    hit = [(0, 0.9, encode_binary_mask(A)), (5, 0.8, encode_binary_mask(C))]
    miss = [(0, 0.9, encode_binary_mask(C)), (5, 0.8, encode_binary_mask(A))]
    same = {f"i{k}": good for k in range(6)}
    full = evaluate(same, {f"i{k}": hit for k in range(6)}).mAP
    assert map_interval(same, {f"i{k}": hit for k in range(6)}, n_boot=50) == (full, full) == (1.0, 1.0)
    # half the images right, half wrong: resamples range from mostly wrong to mostly right
    preds = {f"i{k}": hit if k % 2 else miss for k in range(6)}
    mean = evaluate(same, preds).mAP
    lo, hi = map_interval(same, preds, n_boot=400)
    assert lo < mean < hi and lo >= 0.0 and hi <= 1.0
    assert map_interval(same, preds, n_boot=400) == (lo, hi)  # seeded
    # one resample by hand: the images it draws, repeats included, as distinct images through evaluate()
    rng = np.random.default_rng(3)
    ids = list(same)
    pick = [ids[i] for i in rng.integers(0, len(ids), len(ids))]
    by_hand = evaluate(
        {f"{i}#{n}": same[i] for n, i in enumerate(pick)}, {f"{i}#{n}": preds[i] for n, i in enumerate(pick)}
    )
    one = map_interval(same, preds, n_boot=1, seed=3, level=0.0)
    assert one[0] == pytest.approx(by_hand.mAP)
    assert all(math.isnan(v) for v in map_interval({}, {}))  # no images, no interval


def test_map_difference_pairs_the_two_models_on_the_same_resamples():
    """The difference is evaluate(A) - evaluate(B); each resample scores both sets on the same draw; sharing the
    fields' difficulty makes the paired interval far narrower than either model's own interval."""
    good = _truth((A, [0]), (C, [5]))
    hit = [(0, 0.9, encode_binary_mask(A)), (5, 0.8, encode_binary_mask(C))]
    miss = [(0, 0.9, encode_binary_mask(C)), (5, 0.8, encode_binary_mask(A))]
    half = [(0, 0.9, encode_binary_mask(A)), (5, 0.8, encode_binary_mask(A))]  # class 0 right, class 5 wrong
    truth = {f"i{k}": good for k in range(10)}
    # Both models fail the same hard fields (0-3); A also gets field 4 right, where B gets half of it.
    a = {f"i{k}": miss if k < 4 else hit for k in range(10)}
    b = {**a, "i4": half}
    d = map_difference(truth, a, b, n_boot=400)
    assert d.difference == pytest.approx(evaluate(truth, a).mAP - evaluate(truth, b).mAP)
    assert d.difference > 0 and d.n_images == 10 and d.level == 0.9
    lo, hi = d.interval
    assert 0.0 <= lo <= d.difference <= hi
    a_lo, a_hi = map_interval(truth, a, n_boot=400)
    assert hi - lo < 0.5 * (a_hi - a_lo), (d.interval, (a_lo, a_hi))  # paired: the hard fields cancel
    assert 0.5 < d.a_better <= 1.0  # A is never below B; ties where field 4 is not drawn
    assert map_difference(truth, a, b, n_boot=400) == d  # seeded
    same = map_difference(truth, a, a, n_boot=50)
    assert (same.difference, same.interval, same.a_better) == (0.0, (0.0, 0.0), 0.0)
    # one resample by hand: both rows are evaluate() on the drawn images, repeats as distinct images
    rng = np.random.default_rng(5)
    ids = list(truth)
    pick = [ids[i] for i in rng.integers(0, len(ids), len(ids))]
    rows = paired_maps(truth, [a, b], n_boot=1, seed=5)[1]
    for row, preds in zip(rows, (a, b), strict=True):
        by_hand = evaluate(
            {f"{i}#{n}": truth[i] for n, i in enumerate(pick)}, {f"{i}#{n}": preds[i] for n, i in enumerate(pick)}
        )
        assert row[0] == pytest.approx(by_hand.mAP)
    assert math.isnan(map_difference({}, {}, {}).difference)
    assert "A - B: +" in d.text() and "paired bootstrap interval over 10 images" in d.text()


def test_segmentation_scores():
    true = np.zeros((H, W), dtype=np.int32)
    true[A] = 1
    true[B] = 2
    true[C] = 3
    pred = np.zeros_like(true)
    pred[A] = 5  # IoU 1
    pred[_pixels(B, 60)] = 6  # IoU 0.6
    pred[_rect(30, 35, 40, 45)] = 7  # no match
    s = segmentation_scores(pred, true)
    assert (s["n_pred"], s["n_true"], s["n_matched"]) == (3, 3, 2)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["mean_iou"] == pytest.approx(0.8)
    assert segmentation_scores(pred, true, iou_threshold=0.7)["n_matched"] == 1
    empty = segmentation_scores(np.zeros((4, 4), int), np.zeros((4, 4), int))
    assert empty["f1"] == 1.0 and math.isnan(empty["mean_iou"])


# ---- locus eval (the installed console script) ----


def _tiny_dataset(root) -> tuple[dict, dict]:
    import cv2

    truth = root / "truth"
    truth.mkdir()
    rows = ["ID,cell_id,Label"]
    fields = {}
    for f, ident in enumerate(["fa", "fb"]):
        cells = np.zeros((H, W), dtype=np.uint16)
        cells[2:12, 3:15] = 1
        cells[15:30, 20:40] = 2
        cells[32:38, 45 - f : 58] = 3
        assert cv2.imwrite(str(truth / f"{ident}_cells.png"), cells)
        labels = {1: [0, 16], 2: [5], 3: [18]} if f == 0 else {1: [0], 2: [2], 3: [18]}
        rows += [f"{ident},{k},{'|'.join(map(str, v))}" for k, v in labels.items()]
        fields[ident] = (cells, labels)
    (truth / "cells.csv").write_text("\n".join(rows) + "\n")
    return fields


def _locus() -> str:
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "locus"
    if not exe.exists():
        pytest.skip("the locus console script is not installed in this environment")
    return str(exe)


@pytest.mark.slow
def test_locus_eval_cli(tmp_path):
    import json
    import subprocess

    from locus.service.submission import SubmissionRow, write_submission

    fields = _tiny_dataset(tmp_path)
    rows = []
    for ident, (cells, labels) in fields.items():
        preds = [(c, 0.9, encode_binary_mask(cells == k)) for k, cl in labels.items() for c in cl]
        rows.append(SubmissionRow(ident, W, H, preds))
    write_submission(tmp_path / "submission.csv", rows)
    out_json = tmp_path / "out.json"
    proc = subprocess.run(
        [
            _locus(),
            "eval",
            "--truth",
            str(tmp_path),
            "--predictions",
            str(tmp_path / "submission.csv"),
            "--json",
            str(out_json),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "mAP: 1.000"
    assert any(line.split()[:2] == ["16", "Cytosol"] for line in lines)
    data = json.loads(out_json.read_text())
    assert data["mAP"] == 1.0 and data["classes"][0]["n_gt"] == 2 and data["classes"][1]["ap"] is None

    # A worse submission: drop field fb's rows -> its cells are misses.
    write_submission(tmp_path / "half.csv", rows[:1])
    proc = subprocess.run(
        [_locus(), "eval", "--truth", str(tmp_path / "truth"), "--predictions", str(tmp_path / "half.csv")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    half_map = float(proc.stdout.strip().splitlines()[-1].split()[-1])
    assert half_map < 1.0

    # Two models on the same fields: the difference and its paired interval.
    base = [_locus(), "eval", "--truth", str(tmp_path), "--predictions", str(tmp_path / "submission.csv")]
    proc = subprocess.run(
        [*base, "--against", str(tmp_path / "half.csv"), "--json", str(out_json)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"mAP submission.csv - half.csv: +{1.0 - half_map:.3f}"), last
    assert "paired bootstrap interval over 2 images" in last
    data = json.loads(out_json.read_text())
    assert data["mAP"] == 1.0 and data["against"]["mAP"] == pytest.approx(half_map, abs=5e-4)
    assert data["against"]["difference"] == pytest.approx(1.0 - half_map)
    lo, hi = data["against"]["interval"]
    assert 0.0 <= lo <= data["against"]["difference"] <= hi

    proc = subprocess.run(
        [_locus(), "eval", "--truth", str(tmp_path / "nothing"), "--predictions", str(tmp_path / "half.csv")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "locus eval" in proc.stderr
