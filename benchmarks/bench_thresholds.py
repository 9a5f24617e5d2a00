"""Benchmark: decision thresholds per view count and per tuning rule, out of sample.

Run with ``python benchmarks/bench_thresholds.py --run RUN --heldout DIR [DIR ...] [--model DIR]``,
where RUN is the model's training run (its ``config.json`` and crop cache give the validation
cells, split as training split them) and each DIR a folder of held-out HPA-sim fields with
per-cell truth (``locus default-model`` leaves both in its ``--work`` folder). Needs ``[train]``.

Thresholds are tuned on the validation cells and judged on held-out cells (crops cut by the
same segmenter, labelled from the truth) with the F1 a user gets from the calls, averaged over
the classes that have held-out positives (macro F1). For 1, 2, 4 and 8 test-time views it
prints the macro F1 per held-out folder with:

* ``before``: the one-view argmax thresholds applied to the n-view mean (the service and the
  default model before per-view sets and the one-SE rule);
* ``one-view``: the one-view one-SE thresholds applied to the n-view mean (a model without
  per-view sets);
* ``argmax``: each view count's own set, at the best validation F1;
* ``one-se``: each view count's own set, the middle of the thresholds within one bootstrap
  standard error of the best F1 (the default);
* ``oracle``: each class's best threshold on the held-out cells themselves (the ceiling; no
  rule tuned on validation can beat it).

When ``../shared`` holds the real validation fields it also prints, per rule and view count,
the real fields' image-level result: true labels called on at least one cell, fields with a
wrong class on at least 40% of their cells, and the calls on 89_B5_1 (ER).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from locus.service.classes import CLASS_NAMES, NUM_CLASSES  # noqa: E402
from locus.service.inference import Classifier  # noqa: E402
from locus.service.tta import stack_views  # noqa: E402
from locus.training.thresholds import best_f1_threshold, tune_thresholds  # noqa: E402

VIEWS = (1, 2, 4, 8)


def per_view_scores(classifier: Classifier, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """(8, N, 19) scores of every cell in each of the eight views."""
    out = np.zeros((8, len(images), NUM_CLASSES), np.float32)
    for s in range(0, len(images), batch):
        chunk = images[s : s + batch]
        out[:, s : s + len(chunk)] = classifier.predict(stack_views(chunk, 8).astype(np.float32)).reshape(
            8, len(chunk), NUM_CLASSES
        )
    return out


def macro_f1(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> float:
    """Mean over classes with positives of the F1 of the calls ``p >= thresholds``."""
    called = p >= np.asarray(thresholds)[None, :]
    scores = []
    for c in range(y.shape[1]):
        pos = y[:, c].astype(bool)
        if not pos.any():
            continue
        tp = int((called[:, c] & pos).sum())
        scores.append(2 * tp / max(1, int(called[:, c].sum()) + int(pos.sum())))
    return float(np.mean(scores))


def oracle(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Each class's best threshold on these cells."""
    return np.array([best_f1_threshold(y[:, c], p[:, c])[0] for c in range(y.shape[1])])


def crops_of(config_path: Path, dirs: list[str] | None, out: Path):
    """The crops of a run's config (its own data, or ``dirs`` instead) and, for its own data, the split."""
    from locus.training.config import load_config
    from locus.training.dataset import build_crops, split_by_image

    overrides = {} if dirs is None else {"train_dirs": dirs, "out": str(out), "cache_dir": str(out / "cache")}
    config = load_config(config_path, overrides)
    crops = build_crops(config, progress=False)
    _, va = split_by_image(crops, config.val_fraction, config.seed)
    return crops, va


def real_scores(model: Path) -> tuple[dict, dict]:
    """Per real field and view count, the cells' scores (through the service pipeline); and the labels."""
    from locus.service.config import PipelineSettings
    from locus.service.factory import build_pipeline
    from locus.service.pipeline import ClassifyOptions
    from locus.service.readers import find_fields, load_field
    from locus.training.default_model import _real_sets

    sets = _real_sets()
    scores: dict[int, dict[str, np.ndarray]] = {v: {} for v in VIEWS}
    labels: dict[str, list[int]] = {}
    if not sets:
        return scores, labels
    pipeline = build_pipeline(PipelineSettings(), model_dir=model, segmenter="classical")
    try:
        for root, lab in sets:
            for ref in find_fields(root, on_missing="warn"):
                if ref.id not in lab:
                    continue
                image = load_field(ref)
                labels[ref.id] = list(lab[ref.id])
                for v in VIEWS:
                    result = pipeline.run(image, ClassifyOptions(include_masks=False, tta=v))
                    scores[v][ref.id] = np.stack([c.probabilities for c in result.cells])
    finally:
        pipeline.close()
    return scores, labels


def main() -> int:
    """Run the benchmark and print its tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="the model's training run folder")
    ap.add_argument("--heldout", nargs="+", required=True, help="held-out HPA-sim folders (per-cell truth)")
    ap.add_argument("--model", default=str(REPO / "models" / "locus-sim-b0"), help="model folder")
    ap.add_argument("--work", default="/tmp/bench_thresholds", help="scratch folder for the held-out crop cache")
    args = ap.parse_args()

    from locus.service.metric import evaluate_image_level

    t0 = time.time()
    classifier = Classifier(args.model)
    crops, va = crops_of(Path(args.run) / "config.json", None, Path(args.work))
    val_y = crops.labels[va]
    val_p = per_view_scores(classifier, crops.images[va])
    held = {}
    for d in args.heldout:
        hc, _ = crops_of(Path(args.run) / "config.json", [d], Path(args.work) / Path(d).name)
        held[Path(d).name] = (hc.labels, per_view_scores(classifier, hc.images))
    print(
        f"{len(va)} validation cells, {sum(len(y) for y, _ in held.values())} held-out cells, {time.time() - t0:.0f} s"
    )

    rules: dict[str, dict[int, np.ndarray]] = {"before": {}, "one-view": {}, "argmax": {}, "one-se": {}}
    t1 = time.time()
    for v in VIEWS:
        mean = val_p[:v].mean(axis=0)
        rules["argmax"][v] = np.asarray(tune_thresholds(val_y, mean, rule="argmax"))
        rules["one-se"][v] = np.asarray(tune_thresholds(val_y, mean, rule="one-se"))
    for v in VIEWS:
        rules["before"][v] = rules["argmax"][1]
        rules["one-view"][v] = rules["one-se"][1]
    print(f"tuning: {time.time() - t1:.1f} s for both rules at four view counts")

    names = list(held)
    print("\nheld-out macro F1 of the calls (" + " / ".join(names) + "; mean)")
    for v in VIEWS:
        for rule in (*rules, "oracle"):
            if rule in ("before", "one-view") and v == 1:
                continue
            row = []
            for name in names:
                y, p = held[name]
                mean = p[:v].mean(axis=0)
                row.append(macro_f1(y, mean, oracle(y, mean) if rule == "oracle" else rules[rule][v]))
            print(f"  {v} view(s)  {rule:9s} " + " / ".join(f"{x:.3f}" for x in row) + f";  {np.mean(row):.3f}")

    print("\nthresholds (one-se) per view count")
    for c, name in enumerate(CLASS_NAMES):
        print(f"  {name:42s}" + "".join(f"{rules['one-se'][v][c]:7.3f}" for v in VIEWS))

    scores, labels = real_scores(Path(args.model))
    if labels:
        print("\nreal fields: true labels called / fields with a wrong class on >= 40% / calls on 89_B5_1")
        for v in VIEWS:
            for rule in rules:
                if rule in ("before", "one-view") and v == 1:
                    continue
                res = evaluate_image_level(labels, scores[v], rules[rule][v]).to_dict()
                er = next((f for f in res["fields"] if f["id"] == "89_B5_1"), None)
                calls = "" if er is None else str(er["called"])
                print(
                    f"  {v} view(s)  {rule:9s} {res['labels_found']}/{res['labels_total']}  "
                    f"{res['fields_with_wrong_dominant']}  {calls}"
                )
    print(f"\ntotal {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
