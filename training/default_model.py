"""``locus default-model``: build the shipped default model from scratch, in one command.

Steps
-----
1. Generate HPA-sim training sets that mix field sizes and magnifications (cells about 60 to 500 px
   across, :data:`TRAIN_MIX`), and held-out sets at 512², 1024², 1536², 2048² and 3072² on another seed
   (the magnification follows the field size, as when one field is sent at several resolutions).
2. Train EfficientNet-B0 on the classical segmenter's crops (what the service sees), each labelled by the
   truth cell it matches.
3. Export a candidate model folder (``model.onnx``, ``grad.onnx``, manifest, card).
4. Evaluate the candidate, and the model already in ``--out``, on every held-out size through the service's
   own pipeline (competition mAP, IoU 0.6) and on the real validation fields with image labels only
   (:data:`REAL_VALIDATION`, when present; never trained on).
5. Replace ``--out`` only when the candidate is measured better (worst size and mean over sizes, and on the
   real fields no fewer true labels found, no more fields with a wrong majority class and no fewer net cell calls
   (true-label calls minus other calls), with one view and with 8), or with ``--force``;
   write the per-size table, the plots, the real-field calls and the confusion of the cell calls into the
   manifest and ``MODEL_CARD.md``.

The manifest hashes only the ONNX files, so adding the metrics afterwards keeps the folder valid (checked with
:func:`locus.service.manifest.load_manifest`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from locus.training.sim.generator import PRIMARY_CYCLE_LENGTH

__all__ = [
    "DEFAULTS",
    "HELDOUT_SIZES",
    "REAL_VALIDATION",
    "TRAIN_MIX",
    "build_default_model",
    "configure_parser",
    "evaluate_real",
    "evaluate_sizes",
    "net_cell_calls",
    "record_evaluation",
    "run",
    "score_folder",
]

DEFAULTS: dict[str, Any] = {
    "out": "models/locus-sim-b0",
    "work": "runs/default-model",
    "fields": 480,
    "input_size": 96,
    "epochs": 24,
    "batch_size": 32,
    "learning_rate": 2e-3,
    "seed": 2021,
    # 0.4 was tried (stop 23): held-out mAP 0.691-0.744 against 0.722-0.773 for the installed model, real
    # image-level mAP 0.783 against 0.900, so the default model is trained without extra labels.
    "extra_label_rate": 0.0,
    "diffuse_partner_rate": 0.3,
}

#: Training mix: (field side px, (low, high) median cell diameter px, share of the training fields).
#: Together they cover the cell sizes of real data (HPA 2048² fields: ~250-400 px; users' downscaled
#: fields and other microscopes: down to ~60 px) at the field sizes users send.
TRAIN_MIX: tuple[tuple[int, tuple[float, float], float], ...] = (
    (512, (60.0, 110.0), 0.48),
    (1024, (110.0, 220.0), 0.26),
    (1536, (200.0, 340.0), 0.14),
    (2048, (300.0, 500.0), 0.12),
)

#: Held-out field sizes and how many fields of each (magnification follows the size: cells ~0.16 x side): one whole
#: block of the primary-class cycle (24 fields), so every class is measured at every size.
HELDOUT_SIZES: dict[int, int] = dict.fromkeys((512, 1024, 1536, 2048, 3072), PRIMARY_CYCLE_LENGTH)
#: First held-out field index: the first block of the cycle at or after field 100000 (100008).
HELDOUT_START = -(-100_000 // PRIMARY_CYCLE_LENGTH) * PRIMARY_CYCLE_LENGTH

#: Real fields with image labels only, for validation (never trained on): (folder, labels; None: its train.csv).
#: 89_B5_1's label (Endoplasmic reticulum) is the one given in ../shared/hpa-samples/README.md.
REAL_VALIDATION: tuple[tuple[str, dict[str, list[int]] | None], ...] = (
    ("../shared/hpa-samples", {"89_B5_1": [6]}),
    ("../shared/hpa-real", None),
)

#: Reference pixel size (um) of HPA-sim's 2048² scale; the manifest's ``pixel_size`` is the centre of the mix.
_REF_PIXEL_SIZE_UM = 0.08


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``locus default-model`` options.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The subcommand's parser.
    """
    d = DEFAULTS
    parser.add_argument("--out", default=d["out"], help=f"model folder to write (default {d['out']})")
    parser.add_argument("--work", default=d["work"], help=f"data and run folder (default {d['work']})")
    parser.add_argument(
        "--fields", type=int, default=d["fields"], help="HPA-sim training fields, shared out by the size mix"
    )
    parser.add_argument(
        "--heldout-scale",
        type=float,
        default=1.0,
        help="multiplier on the held-out fields per size (default 1: 24 at each size, one cycle of primary classes)",
    )
    parser.add_argument(
        "--sizes",
        default=",".join(str(s) for s in HELDOUT_SIZES),
        help="held-out field sizes, comma-separated (default 512,1024,1536,2048,3072)",
    )
    parser.add_argument("--input-size", type=int, default=d["input_size"], help="crop side (model input)")
    parser.add_argument("--epochs", type=int, default=d["epochs"])
    parser.add_argument("--batch-size", type=int, default=d["batch_size"])
    parser.add_argument("--lr", type=float, default=d["learning_rate"], dest="learning_rate")
    parser.add_argument(
        "--label-source",
        choices=["cell", "image"],
        default="cell",
        help="cell: per-cell HPA-sim truth (default); image: weak labels as with Kaggle data",
    )
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument(
        "--extra-label-rate",
        type=float,
        default=d["extra_label_rate"],
        metavar="P",
        help="HPA-sim training fields: probability of one more, randomly drawn localisation (mixtures; "
        f"default {d['extra_label_rate']}); the held-out fields keep the generator's default (0)",
    )
    parser.add_argument(
        "--diffuse-partner-rate",
        type=float,
        default=d["diffuse_partner_rate"],
        metavar="P",
        help="HPA-sim training fields: probability that a field without nucleoplasm or cytosol gains one of them "
        f"(default {d['diffuse_partner_rate']}); the held-out fields keep the generator's default (0)",
    )
    parser.add_argument("--workers", type=int, default=2, help="processes for data generation and crops")
    parser.add_argument(
        "--segmenter",
        default="classical",
        help="segmenter of the training crops (with --masks segmenter) and of the held-out evaluation",
    )
    parser.add_argument(
        "--masks",
        choices=["segmenter", "truth"],
        default="segmenter",
        help="training crops from the segmenter's cells, labelled by the truth cell each matches "
        "(what the service sees; default), or from the truth masks",
    )
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (quick runs)")
    parser.add_argument("--name", default="locus-sim-b0")
    parser.add_argument("--version", default="3.6.0")
    parser.add_argument("--no-grad", action="store_true", help="do not export grad.onnx")
    parser.add_argument("--skip-eval", action="store_true", help="do not evaluate (the candidate replaces --out)")
    parser.add_argument("--no-compare", action="store_true", help="do not evaluate the model already in --out")
    parser.add_argument("--force", action="store_true", help="replace --out even when the candidate is not better")
    parser.add_argument("--no-real", action="store_true", help="skip the real validation fields")
    parser.add_argument("--keep-data", action="store_true", help="reuse existing HPA-sim folders in --work")
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="skip generation and training: evaluate (and maybe install) the candidate already in --work",
    )
    parser.add_argument("--quiet", action="store_true")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def _same_sim(folder: Path, n: int, seed: int, config: Any, start: int) -> bool:
    """Whether ``folder``'s ``sim.json`` records this very dataset (kept data is reused only then)."""
    from dataclasses import asdict

    try:
        meta = json.loads((folder / "sim.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    want = json.loads(json.dumps(asdict(config)))
    have = {**want, **meta.get("config", {})}
    # a field the folder predates (written before the option existed) is at the generator's default
    defaults = json.loads(json.dumps(asdict(type(config)())))
    for key in want:
        if key not in meta.get("config", {}):
            have[key] = defaults[key]
    return (meta.get("n"), meta.get("seed"), meta.get("start"), have) == (n, seed, start, want)


def _simulate(folder: Path, n: int, seed: int, config: Any, start: int, workers: int, keep: bool, progress: bool):
    from locus.training.sim.generator import write_dataset

    if keep and (folder / "train.csv").is_file() and _same_sim(folder, n, seed, config, start):
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    return write_dataset(folder, n=n, seed=seed, config=config, workers=workers, progress=progress, start=start)


def _train_sets(
    work: Path,
    n_fields: int,
    seed: int,
    workers: int,
    keep: bool,
    progress: bool,
    extra_label_rate: float = 0.0,
    diffuse_partner_rate: float = 0.0,
) -> list[Path]:
    from locus.training.sim.generator import SimConfig

    out = []
    for j, (size, drange, share) in enumerate(TRAIN_MIX):
        n = max(2, int(round(n_fields * share)))
        cfg = SimConfig(
            size=size,
            cell_diameter_range=drange,
            extra_label_rate=extra_label_rate,
            diffuse_partner_rate=diffuse_partner_rate,
        )
        out.append(_simulate(work / f"sim-train-{size}", n, seed, cfg, j * 10_000, workers, keep, progress))
    return out


def _heldout_sets(
    work: Path, sizes: list[int], scale: float, seed: int, workers: int, keep: bool, progress: bool
) -> dict[int, Path]:
    from locus.training.sim.generator import SimConfig

    out = {}
    for size in sizes:
        n = max(2, int(round(HELDOUT_SIZES.get(size, 6) * scale)))
        out[size] = _simulate(
            work / f"sim-heldout-{size}", n, seed, SimConfig(size=size), HELDOUT_START, workers, keep, progress
        )
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def score_folder(
    pipeline: Any,
    folder: str | Path,
    progress: bool = False,
    pixel_size: float | None = None,
    keep: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Competition mAP and cell-level confusion of one pipeline on one HPA-sim folder with truth.

    Every field goes through :meth:`locus.service.pipeline.Pipeline.run` (what is served), its Kaggle
    predictions through :func:`locus.service.metric.evaluate`. Each predicted cell that matches a truth cell
    (IoU >= 0.6) adds to the confusion: for each true class of the cell, which classes were called.

    Parameters
    ----------
    pipeline : Pipeline
        Built by :func:`locus.service.factory.build_pipeline`.
    folder : str or Path
        HPA-sim dataset with ``truth/``.
    progress : bool
        Print one line per field.
    pixel_size : float, optional
        The fields' pixel size (``ClassifyOptions.pixel_size``: resampled to the model's scale); None: as sent.
    keep : dict, optional
        Filled with ``"truth"`` and ``"predictions"`` (per field, as :func:`locus.service.metric.evaluate`
        takes them), to compare this model with another on the same fields (:func:`compare_sizes`).

    Returns
    -------
    dict
        ``{"map", "map_interval", "ap", "fields", "cells", "matched", "top1", "confusion", "n_true", "alone",
        "mixed"}`` (``map_interval``: the 90% bootstrap interval of the mAP over the fields,
        :func:`locus.service.metric.map_interval`);
        ``confusion[t][c]`` counts matched cells of true class ``t`` called ``c``; ``n_true[t]`` the matched cells
        of class ``t``; ``alone[t]`` and ``mixed[t]`` are ``[cells, cells where t is called]`` over the matched
        cells whose only label is ``t`` and over those where ``t`` is one of several (a pattern under another).
    """
    from locus.service.classes import NUM_CLASSES
    from locus.service.metric import evaluate, label_iou, map_interval, truth_from_labels
    from locus.service.pipeline import ClassifyOptions
    from locus.service.readers import find_fields, load_field, load_truth, read_cell_labels

    refs = find_fields(folder)
    labels = read_cell_labels(folder)
    truth, preds = {}, {}
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    n_true = np.zeros(NUM_CLASSES, np.int64)
    alone = np.zeros((NUM_CLASSES, 2), np.int64)
    mixed = np.zeros((NUM_CLASSES, 2), np.int64)
    cells = matched = top1 = 0
    options = ClassifyOptions(include_masks=True, pixel_size=pixel_size)
    for ref in refs:
        t = load_truth(folder, ref.id, cell_labels=labels.get(ref.id, {}))
        result = pipeline.run(load_field(ref), options)
        truth[ref.id] = truth_from_labels(t.cells, t.cell_labels)
        preds[ref.id] = result.predictions()
        cells += len(result.cells)
        p_ids, t_ids, iou = label_iou(result.cell_labels, t.cells)
        if iou.size:
            best = iou.argmax(axis=1)
            pos = {int(k): i for i, k in enumerate(p_ids)}
            for cell in result.cells:
                i = pos.get(cell.record.id)
                if i is None or iou[i, best[i]] < 0.6:
                    continue
                true = t.cell_labels.get(int(t_ids[best[i]]), [])
                matched += 1
                top1 += int(np.argmax(cell.probabilities)) in true
                for c in true:
                    n_true[c] += 1
                    split = alone if len(true) == 1 else mixed
                    split[c] += (1, int(c in cell.labels))
                    for k in cell.labels:
                        confusion[c, k] += 1
        if progress:
            print(f"  {ref.id}: {len(result.cells)} cells", flush=True)
    res = evaluate(truth, preds)
    d = res.to_dict()
    if keep is not None:
        keep.update(truth=truth, predictions=preds)
    return {
        "map": d["mAP"],
        "map_interval": list(map_interval(truth, preds)),
        "ap": [c["ap"] for c in d["classes"]],
        "fields": len(refs),
        "cells": cells,
        "matched": matched,
        "top1": top1 / matched if matched else None,
        "confusion": confusion.tolist(),
        "n_true": n_true.tolist(),
        "alone": alone.tolist(),
        "mixed": mixed.tolist(),
    }


def evaluate_sizes(
    model_dir: str | Path,
    heldout: dict[int, Path],
    segmenter: str = "classical",
    progress: bool = True,
    keep: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Held-out competition mAP of a model folder at every field size.

    Parameters
    ----------
    model_dir : str or Path
        The model folder.
    heldout : dict of int to Path
        Field size -> HPA-sim folder with truth.
    segmenter : str
        Segmentation backend.
    progress : bool
        Print a line per size.
    keep : dict, optional
        Filled per size (``str``) with the truth and predictions (:func:`score_folder`'s ``keep``).

    Returns
    -------
    dict
        ``{"by_size": {size: score_folder(...)}, "mean_map", "worst_map", "worst_size", "seconds", "tta"}`` (``tta``:
        the test-time augmentation views the pipeline used).
    """
    from locus.service.config import PipelineSettings
    from locus.service.factory import build_pipeline

    t0 = time.time()
    pipeline = build_pipeline(PipelineSettings(), model_dir=model_dir, segmenter=segmenter)
    by_size = {}
    try:
        for size, folder in sorted(heldout.items()):
            t = time.time()
            kept = None if keep is None else keep.setdefault(str(size), {})
            by_size[str(size)] = score_folder(pipeline, folder, keep=kept)
            if progress:
                s = by_size[str(size)]
                print(
                    f"{model_dir} @ {size}²: mAP {s['map']:.3f} ({s['fields']} fields, {s['cells']} cells, "
                    f"{time.time() - t:.0f} s)",
                    flush=True,
                )
    finally:
        pipeline.close()
    maps = {int(k): v["map"] for k, v in by_size.items() if v["map"] is not None}
    worst = min(maps, key=maps.get) if maps else None
    return {
        "by_size": by_size,
        "mean_map": float(np.mean(list(maps.values()))) if maps else None,
        "worst_map": maps[worst] if worst is not None else None,
        "worst_size": worst,
        "seconds": round(time.time() - t0, 1),
        "tta": pipeline.tta,
    }


def compare_sizes(
    kept_a: dict[str, dict[str, Any]],
    kept_b: dict[str, dict[str, Any]],
    *,
    level: float = 0.9,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired bootstrap comparison of two models on the same held-out fields, per size and over sizes.

    Each size's fields are resampled with replacement and both models are scored on the same draw
    (:func:`locus.service.metric.paired_maps`), so how hard the drawn fields are cancels out of the
    difference. The worst size and the mean over sizes are compared on the same draws: for each
    resample, model A's worst (or mean) mAP over the sizes against model B's.

    Parameters
    ----------
    kept_a, kept_b : dict
        Per size, the truth and predictions of each model (:func:`evaluate_sizes`'s ``keep``), on the
        same fields.
    level : float
        Coverage of the intervals.
    n_boot : int
        Resamples.
    seed : int
        Seed of the resampling.

    Returns
    -------
    dict
        ``{"by_size": {size: d}, "worst": d, "mean": d, "level", "n_boot"}``, each ``d`` as
        :meth:`locus.service.metric.MapDifference.to_dict` (``"difference"``: mAP(A) - mAP(B), ``"interval"``,
        ``"a_better"`` and ``"b_better"``: the shares of the resamples with A above B and with B above A).
    """
    from locus.service.metric import MapDifference, paired_maps

    sizes = sorted((s for s in kept_a if s in kept_b), key=int)
    full, boots, n_fields = {}, {}, {}
    for s in sizes:
        truth = kept_a[s]["truth"]
        preds = [kept_a[s]["predictions"], kept_b[s]["predictions"]]
        full[s], boots[s] = paired_maps(truth, preds, n_boot=n_boot, seed=seed)
        n_fields[s] = len(truth)

    def summary(point: np.ndarray, draws: np.ndarray, n: int) -> dict[str, Any]:
        return MapDifference.from_draws(point[0], point[1], draws, level, n).to_dict()

    by_size = {s: summary(full[s], boots[s], n_fields[s]) for s in sizes}
    out: dict[str, Any] = {"by_size": by_size, "level": level, "n_boot": n_boot}
    if sizes:
        points = np.stack([full[s] for s in sizes])  # (sizes, 2)
        draws = np.stack([boots[s] for s in sizes])  # (sizes, 2, n_boot)
        total = sum(n_fields.values())
        out["worst"] = summary(points.min(axis=0), draws.min(axis=0), total)
        out["mean"] = summary(points.mean(axis=0), draws.mean(axis=0), total)
    return out


def _swap(paired: dict[str, Any]) -> dict[str, Any]:
    """The same comparison seen from the other model (B - A)."""

    def flip(d: dict[str, Any]) -> dict[str, Any]:
        lo, hi = d["interval"]
        flipped = {"difference": -d["difference"], "interval": [-hi, -lo]}
        return {**d, **flipped, "a_better": d["b_better"], "b_better": d["a_better"]}

    out = {k: v for k, v in paired.items() if k not in ("by_size", "worst", "mean")}
    out["by_size"] = {s: flip(d) for s, d in paired["by_size"].items()}
    for key in ("worst", "mean"):
        if key in paired:
            out[key] = flip(paired[key])
    return out


def _real_sets() -> list[tuple[Path, dict[str, list[int]]]]:
    from locus.service.readers import read_labels_csv

    out = []
    for folder, labels in REAL_VALIDATION:
        root = Path(folder)
        if not root.is_dir():
            continue
        if labels is None:
            csv_path = root / "train.csv"
            if not csv_path.is_file():
                continue
            labels = read_labels_csv(csv_path)
        out.append((root, labels))
    return out


def evaluate_real(
    model_dir: str | Path, segmenter: str = "classical", views: int | None = None
) -> dict[str, Any] | None:
    """Image-level validation on the real fields of :data:`REAL_VALIDATION` (None when none is present).

    Parameters
    ----------
    model_dir : str or Path
        The model folder.
    segmenter : str
        Segmentation backend.
    views : int, optional
        Test-time views (1, 2, 4 or 8), read with the model's thresholds for that many; None: the pipeline's
        default (``LOCUS_TTA``).

    Returns
    -------
    dict or None
        :meth:`locus.service.metric.ImageLevelResult.to_dict` plus ``"table"`` (text) and ``"cells"``
        (per field, per cell: its calls and top label, by class name).
    """
    from locus.service.classes import CLASS_NAMES
    from locus.service.config import PipelineSettings
    from locus.service.factory import build_pipeline
    from locus.service.metric import evaluate_image_level
    from locus.service.pipeline import ClassifyOptions
    from locus.service.readers import find_fields, load_field

    sets = _real_sets()
    if not sets:
        return None
    pipeline = build_pipeline(PipelineSettings(), model_dir=model_dir, segmenter=segmenter)
    options = ClassifyOptions(include_masks=False, tta=views)
    labels: dict[str, list[int]] = {}
    probs: dict[str, np.ndarray] = {}
    per_cell: dict[str, list[dict[str, Any]]] = {}
    try:
        for root, lab in sets:
            for ref in find_fields(root, on_missing="warn"):
                if ref.id not in lab:
                    continue
                result = pipeline.run(load_field(ref), options)
                labels[ref.id] = lab[ref.id]
                probs[ref.id] = np.stack([c.probabilities for c in result.cells]) if result.cells else np.zeros((0, 19))
                per_cell[ref.id] = [
                    {
                        "id": c.record.id,
                        "top": CLASS_NAMES[int(np.argmax(c.probabilities))],
                        "called": [CLASS_NAMES[k] for k in c.labels],
                    }
                    for c in result.cells
                ]
        thresholds = pipeline.thresholds(options)  # the set for the views averaged
    finally:
        pipeline.close()
    if not labels:
        return None
    res = evaluate_image_level(labels, probs, thresholds)
    out = res.to_dict()
    out["table"] = res.table()
    out["cells"] = per_cell
    return out


def _real_at_1_and_8(model_dir: str | Path, segmenter: str) -> dict[str, Any] | None:
    """:func:`evaluate_real` with one view, with the 8-view result's summary under ``"views_8"``."""
    one = evaluate_real(model_dir, segmenter, views=1)
    eight = evaluate_real(model_dir, segmenter, views=8)
    if one is not None and eight is not None:
        keep = ("image_level_mAP", "labels_found", "labels_total", "fields_with_wrong_dominant", "fields")
        one["views_8"] = {k: eight[k] for k in keep}
    return one


def _better(
    new: dict[str, Any],
    old: dict[str, Any] | None,
    real: dict[str, Any] | None = None,
    old_real: dict[str, Any] | None = None,
) -> bool:
    """Whether the candidate replaces the installed model.

    On the held-out HPA-sim fields: a higher worst size and a mean over sizes no more than 0.005 lower. On the
    real validation fields, when both models were scored there: no fewer true labels found, no more fields
    with a wrong class on at least 40% of their cells and no lower :func:`net_cell_calls`, with one view (a CPU
    host's default) and, when both carry it, with 8 views (``"views_8"``, a GPU host's default). HPA-sim is where
    a candidate can be measured precisely, the real fields are what users send: a candidate that gains on the
    first and loses on the second, at either view count, stays out.

    Parameters
    ----------
    new, old : dict
        :func:`evaluate_sizes` of the candidate and of the installed model (None: nothing installed).
    real, old_real : dict, optional
        :func:`evaluate_real` of both with one view, each with the 8-view result under ``"views_8"`` when
        scored (None: not scored, no real-field condition).

    Returns
    -------
    bool
    """
    if old is None or old.get("worst_map") is None:
        return True
    if new.get("worst_map") is None:
        return False
    sim = new["worst_map"] > old["worst_map"] and new["mean_map"] >= old["mean_map"] - 0.005
    if not sim or not real or not old_real:
        return sim
    pairs = [(real, old_real)]
    if real.get("views_8") and old_real.get("views_8"):
        pairs.append((real["views_8"], old_real["views_8"]))

    def no_worse(a: dict[str, Any], b: dict[str, Any]) -> bool:
        net_a, net_b = net_cell_calls(a), net_cell_calls(b)
        return (
            a["labels_found"] >= b["labels_found"]
            and a["fields_with_wrong_dominant"] <= b["fields_with_wrong_dominant"]
            and (net_a is None or net_b is None or net_a >= net_b)
        )

    return all(no_worse(a, b) for a, b in pairs)


def net_cell_calls(real: dict[str, Any]) -> int | None:
    """Calls of a field's true labels minus calls of other classes, summed over the cells of the real fields.

    A finer count than the labels found and the fields with a wrong majority: a cell called with a true label
    counts +1 per such label, a cell called with a class the field does not carry -1 per class. Two models that
    find the same labels can still differ by many cells (HPA-sim 2.9's candidate 3.10.0: 62 true and 28 other calls
    on 74 cells with one view, against 69 and 22 for 3.6.0).

    Parameters
    ----------
    real : dict
        :func:`evaluate_real` (or its ``"views_8"`` summary): its ``"fields"``, each with ``"true_labels"`` and
        ``"called"`` (class name to the number of cells called with it).

    Returns
    -------
    int or None
        The net count, or None when the result carries no per-field calls.
    """
    fields = real.get("fields")
    if not fields:
        return None
    net = 0
    for f in fields:
        truth = set(f["true_labels"])
        net += sum(n if name in truth else -n for name, n in f["called"].items())
    return net


# ----------------------------------------------------------------------------------------------
# Report: manifest metrics, plots and model-card sections
# ----------------------------------------------------------------------------------------------


def _plot_sizes(
    path: Path,
    new: dict[str, Any],
    old: dict[str, Any] | None,
    names: tuple[str, str] = ("new model", "previous model"),
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from locus.service.classes import CLASS_NAMES

    sizes = sorted(int(s) for s in new["by_size"])
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    ax = axes[0]
    ax.plot(sizes, [new["by_size"][str(s)]["map"] for s in sizes], "o-", lw=2.5, label=names[0])
    if old:
        osz = [s for s in sizes if str(s) in old["by_size"]]
        ax.plot(osz, [old["by_size"][str(s)]["map"] for s in osz], "s--", lw=2, label=names[1])
    ax.axhline(0.85, color="grey", ls=":", label="goal: worst size 0.85")
    ax.set_xticks(sizes)
    ax.set_xlabel("field side (px); cells ~0.16 x side across")
    ax.set_ylabel("held-out competition mAP (IoU 0.6)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("mAP by field size")
    ax = axes[1]
    grid = np.array([[np.nan if v is None else v for v in new["by_size"][str(s)]["ap"]] for s in sizes], dtype=float).T
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(CLASS_NAMES)), [f"{i} {n[:28]}" for i, n in enumerate(CLASS_NAMES)], fontsize=7)
    ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    ax.set_title(f"{names[0]}: AP per class and field size")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_confusion(path: Path, ev: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from locus.service.classes import CLASS_NAMES

    conf = np.zeros((19, 19))
    n_true = np.zeros(19)
    for s in ev["by_size"].values():
        conf += np.asarray(s["confusion"], float)
        n_true += np.asarray(s["n_true"], float)
    rate = conf / np.maximum(n_true, 1)[:, None]
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(rate, vmin=0, vmax=1, cmap="magma")
    names = [f"{i} {n[:22]}" for i, n in enumerate(CLASS_NAMES)]
    ax.set_yticks(range(19), [f"{nm} (n={int(k)})" for nm, k in zip(names, n_true, strict=True)], fontsize=7)
    ax.set_xticks(range(19), [str(i) for i in range(19)], fontsize=7)
    ax.set_xlabel("class called (per-class threshold)")
    ax.set_ylabel("true class of the matched cell")
    for i in range(19):
        for j in range(19):
            if rate[i, j] >= 0.05:
                ax.text(j, i, f"{rate[i, j]:.2f}", ha="center", va="center", fontsize=5, color="c")
    ax.set_title("Cell calls by true class, all held-out sizes")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _weakest(ev: dict[str, Any], k: int = 3) -> list[tuple[int, float]]:
    ap = np.array([[np.nan if v is None else v for v in s["ap"]] for s in ev["by_size"].values()], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class without held-out cells is all NaN
        mean = np.nanmean(ap, axis=0)
    order = [int(i) for i in np.argsort(np.where(np.isnan(mean), np.inf, mean)) if not np.isnan(mean[i])]
    return [(i, float(mean[i])) for i in order[:k]]


def _alone_and_mixed(ev: dict[str, Any]) -> np.ndarray | None:
    """``[class, (alone, mixed), (cells, called)]`` summed over sizes; None for an evaluation without the split."""
    sizes = list(ev["by_size"].values())
    if not sizes or any("alone" not in s for s in sizes):
        return None
    return np.stack(
        [np.asarray([s["alone"] for s in sizes]).sum(0), np.asarray([s["mixed"] for s in sizes]).sum(0)], axis=1
    )


def _rate(hits: int, n: int) -> str:
    return "n/a (0 cells)" if n == 0 else f"{100.0 * hits / n:.0f}% of {n}"


def _card_sections(
    ev: dict[str, Any],
    old: dict[str, Any] | None,
    real: dict | None,
    old_real: dict | None,
    names: tuple[str, str] = ("new model", "previous model"),
) -> str:
    from locus.service.classes import CLASS_NAMES, NUM_CLASSES

    sizes = sorted(int(s) for s in ev["by_size"])
    lines = ["", "## Accuracy at every field size", ""]
    lines.append(
        "Held-out HPA-sim fields on a seed never used in training, through the service's own pipeline "
        "(classical segmentation, competition mAP at IoU 0.6). The magnification follows the field size "
        "(cells about 0.16 x the field side across: ~80 px at 512², ~320 px at 2048², ~480 px at 3072²). "
        f"Test-time augmentation: {ev.get('tta', 1)} view(s) per crop (the service's default where this ran: "
        "`LOCUS_TTA=auto` averages 8 on a GPU and uses 1 on a CPU)."
    )
    head = f"| field | fields | cells | {names[0]} mAP | 90% interval over fields | {names[1]} mAP | {names[0]} top-1 |"
    lines += ["", head, "|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sizes:
        n = ev["by_size"][str(s)]
        o = (old or {}).get("by_size", {}).get(str(s))
        top1 = "n/a" if n["top1"] is None else f"{n['top1']:.2f}"
        band = n.get("map_interval")
        band_text = "n/a" if not band else f"{band[0]:.3f}-{band[1]:.3f}"
        lines.append(
            f"| {s}² | {n['fields']} | {n['cells']} | **{n['map']:.3f}** | {band_text} | "
            f"{_num(None if o is None else o['map'])} | {top1} |"
        )
    old_worst = f"{_num(old['worst_map'])} ({old['worst_size']}²)" if old else "n/a"
    lines.append(f"| worst | | | **{ev['worst_map']:.3f}** ({ev['worst_size']}²) | | {old_worst} | |")
    lines += [
        "",
        "The interval resamples the held-out fields with replacement (1,000 times) and scores each resample with "
        "the competition metric: how far the mAP could move on other fields drawn the same way.",
    ]
    lines += _paired_lines(ev.get("paired"), names)
    lines += ["", "![mAP by field size](per_size_map.png)", "", "Per class (AP; n/a: class absent at that size):", ""]
    lines.append("| id | class | " + " | ".join(f"{s}²" for s in sizes) + " |")
    lines.append("|---:|---|" + "---:|" * len(sizes))
    for i, name in enumerate(CLASS_NAMES):
        vals = [ev["by_size"][str(s)]["ap"][i] for s in sizes]
        lines.append(f"| {i} | {name} | " + " | ".join("n/a" if v is None else f"{v:.2f}" for v in vals) + " |")
    lines += ["", "## Where it fails", "", "![cell calls by true class](confusion.png)", ""]
    weak = _weakest(ev)
    lines.append(
        "Weakest classes (mean AP over sizes): " + ", ".join(f"{CLASS_NAMES[i]} {v:.2f}" for i, v in weak) + "."
    )
    split = _alone_and_mixed(ev)
    if split is not None:
        lines += [
            "",
            "How often a class is called on its matched cells (all sizes), when it is the cell's only "
            "label and when it lies under another pattern:",
            "",
        ]
        lines += ["| class | alone | in a mixture |", "|---|---:|---:|"]
        for i, _ in _weakest(ev, NUM_CLASSES):  # weakest first
            (na, ha), (nm, hm) = split[i]
            if na + nm:
                lines.append(f"| {CLASS_NAMES[i]} | {_rate(ha, na)} | {_rate(hm, nm)} |")
    if real:
        lines += ["", "## Real validation fields (image labels only; never trained on)", ""]
        lines.append(
            "Five real HPA fields (`../shared/hpa-samples` 89_B5_1 and the four Kaggle fields of "
            "`../shared/hpa-real`), through the same pipeline. A call: probability at or above the class's "
            "threshold. `locus eval --image-level` gives the same table from a `locus predict` CSV."
        )
        lines += ["", "```", real["table"], "```"]
        if old_real:
            lines += ["", f"{names[1].capitalize()} on the same fields:", "", "```", old_real["table"], "```"]
    return "\n".join(lines) + "\n"


def _paired_lines(paired: dict[str, Any] | None, names: tuple[str, str]) -> list[str]:
    """Card lines for :func:`compare_sizes`'s result (none without one)."""
    if not paired or not paired.get("by_size"):
        return []
    pct = f"{paired.get('level', 0.9):.0%}"
    lines = [
        "",
        f"Against the {names[1]} on the same fields (paired bootstrap: both models scored on the same "
        f"{paired.get('n_boot', 1000):,} resamples of each size's fields, so how hard the fields are cancels out; "
        f"a difference whose {pct} interval excludes 0 is one these fields can tell):",
        "",
        f"| field | {names[0]} - {names[1]} | {pct} paired interval | {names[0]} higher in |",
        "|---:|---:|---:|---:|",
    ]
    rows = [(f"{s}²", d) for s, d in sorted(paired["by_size"].items(), key=lambda kv: int(kv[0]))]
    rows += [(label, paired[key]) for key, label in (("worst", "worst size"), ("mean", "mean over sizes"))]
    for label, d in rows:
        lo, hi = d["interval"]
        share = "n/a" if d.get("a_better") is None else f"{d['a_better']:.0%} of resamples"
        lines.append(f"| {label} | {d['difference']:+.3f} | {lo:+.3f} to {hi:+.3f} | {share} |")
    return lines


def record_evaluation(
    model_dir: str | Path,
    ev: dict[str, Any],
    old: dict[str, Any] | None,
    real: dict[str, Any] | None,
    old_real: dict[str, Any] | None,
    pixel_size: float | None,
    names: tuple[str, str] = ("new model", "previous model"),
):
    """Write the evaluation into a model folder's manifest, card and plots.

    Parameters
    ----------
    model_dir : str or Path
        The model folder.
    ev, old : dict
        :func:`evaluate_sizes` of this model and of the previous one (or None).
    real, old_real : dict or None
        :func:`evaluate_real` of both.
    pixel_size : float or None
        The pixel size (um) the model was trained at (centre of the mix), recorded in the manifest.
    names : tuple of str
        How the card and plot name this model and the other one.

    Returns
    -------
    Manifest
        The updated manifest, re-validated with its ONNX hashes.
    """
    from locus.service.manifest import load_manifest
    from locus.training.export import write_manifest, write_model_card

    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    training = dict(manifest.training)
    by_size = {
        s: {
            "map": v["map"],
            "map_interval": v.get("map_interval"),
            "ap": v["ap"],
            "fields": v["fields"],
            "cells": v["cells"],
            "top1": v["top1"],
        }
        for s, v in ev["by_size"].items()
    }
    metrics = {
        **training.get("metrics", {}),
        "heldout_map": ev["mean_map"],
        "heldout_worst_map": ev["worst_map"],
        "heldout_worst_size": ev["worst_size"],
        "heldout_fields": sum(v["fields"] for v in ev["by_size"].values()),
        "heldout_segmenter": "classical",
        "heldout_by_size": by_size,
        "heldout_seconds": ev["seconds"],
    }
    if old:
        metrics["compared_model_by_size"] = {"model": names[1], **{s: v["map"] for s, v in old["by_size"].items()}}
    if ev.get("paired"):
        metrics["compared_model_paired"] = ev["paired"]
    if real:
        metrics["real_validation"] = {k: v for k, v in real.items() if k not in ("table",)}
    training["metrics"] = metrics
    update: dict[str, Any] = {"training": training}
    if pixel_size is not None and "pixel_size" in type(manifest).model_fields:
        update["pixel_size"] = pixel_size
    manifest = manifest.model_copy(update=update)
    write_manifest(model_dir, manifest)
    write_model_card(model_dir, manifest)
    _plot_sizes(model_dir / "per_size_map.png", ev, old, names)
    _plot_confusion(model_dir / "confusion.png", ev)
    card = model_dir / "MODEL_CARD.md"
    extra = _card_sections(ev, old, real, old_real, names)
    notes = model_dir / "CARD_NOTES.md"
    if notes.is_file():
        extra += "\n" + notes.read_text(encoding="utf-8")
    card.write_text(card.read_text(encoding="utf-8") + extra, encoding="utf-8")
    return load_manifest(model_dir)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def build_default_model(args: argparse.Namespace) -> dict[str, Any]:
    """Generate HPA-sim, train, export, evaluate against the current model, and replace it when better.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed ``locus default-model`` options.

    Returns
    -------
    dict
        Timings, data sizes, per-size metrics of both models, the decision.
    """
    from locus.training.config import TrainConfig
    from locus.training.export import export_model_folder
    from locus.training.train import train

    progress = not args.quiet
    t0 = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    eval_only = bool(getattr(args, "eval_only", False))
    # --eval-only measures a candidate already trained: the training sets are neither needed nor drawn.
    train_dirs = (
        []
        if eval_only
        else _train_sets(
            work,
            args.fields,
            args.seed,
            args.workers,
            args.keep_data,
            progress,
            args.extra_label_rate,
            args.diffuse_partner_rate,
        )
    )
    heldout = _heldout_sets(work, sizes, args.heldout_scale, args.seed + 1, args.workers, args.keep_data, progress)
    t_sim = time.time() - t0
    config = TrainConfig(
        train_dirs=[str(d) for d in train_dirs],
        label_source=args.label_source,
        use_truth_masks=args.masks == "truth",
        segmenter=args.segmenter,
        architecture="b0",
        input_size=args.input_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        schedule="cosine",
        warmup_epochs=1 if args.epochs > 2 else 0,
        patience=max(3, args.epochs // 3),
        max_steps_per_epoch=args.max_steps_per_epoch,
        seed=args.seed,
        workers=args.workers,
        out=str(work / "run"),
        name=args.name,
        version=args.version,
        export=False,
        with_grad=not args.no_grad,
        verbose=2 if progress else 0,
    )
    candidate = work / "candidate"
    if eval_only:
        if not (candidate / "manifest.json").is_file():
            raise ValueError(f"--eval-only: no candidate model in {candidate}")
        return _evaluate_and_install(args, candidate, heldout, {"seconds_sim": round(t_sim, 1)}, t0, progress)
    result = train(config, progress=progress)
    summary = dict(result.summary)
    lo = min(r[0] for _, r, _ in TRAIN_MIX)
    hi = max(r[1] for _, r, _ in TRAIN_MIX)
    from locus.training.sim.generator import REF_CELL_DIAMETER_PX

    centre_d = math.sqrt(lo * hi)
    pixel_size = round(_REF_PIXEL_SIZE_UM * REF_CELL_DIAMETER_PX / centre_d, 4)
    mix = "; ".join(f"{size}² fields, cells {r[0]:.0f}-{r[1]:.0f} px ({share:.0%})" for size, r, share in TRAIN_MIX)
    summary["notes"] = [
        f"label_source '{config.label_source}': "
        + (
            "HPA-sim provides per-cell ground truth (truth/cells.csv), so each crop is trained on its own cell's "
            "labels. With real Kaggle data only image-level labels exist: use label_source 'image' (weak labels, "
            "each cell inherits its image's labels), also available here with --label-source image."
            if config.label_source == "cell"
            else "weak labels: each cell inherits its image's labels (the Kaggle setting)."
        ),
        f"built by `locus default-model` with {args.fields} HPA-sim training fields mixing sizes and "
        f"magnifications ({mix}; seed {args.seed}; HPA-sim diffuse_partner_rate "
        f"{args.diffuse_partner_rate}, extra_label_rate {args.extra_label_rate}); data generation "
        f"{t_sim:.0f} s.",
        f"pixel_size {pixel_size} um: the centre (geometric mean) of the trained cell sizes, {lo:.0f}-{hi:.0f} px "
        f"(HPA-sim cells are {REF_CELL_DIAMETER_PX:.0f} px across at {_REF_PIXEL_SIZE_UM} um per pixel).",
    ]
    parity = np.load(result.run_dir / "parity_batch.npy").astype(np.float32)
    if candidate.exists():
        shutil.rmtree(candidate)
    export_model_folder(
        result.model,
        candidate,
        config,
        result.thresholds,
        summary,
        parity,
        with_grad=not args.no_grad,
        view_thresholds=result.view_thresholds,
    )
    for plot in sorted((result.run_dir / "plots").glob("*.png")):  # the training plots the card shows
        shutil.copy2(plot, candidate / plot.name)
    t_export = time.time()
    report: dict[str, Any] = {
        "seconds_sim": round(t_sim, 1),
        "seconds_train": summary.get("seconds"),
        "train_samples_per_s": summary.get("train_samples_per_s"),
        "cells": summary["data"]["cells"],
        "val_cell_map": summary["metrics"]["val_cell_map"],
    }
    report["seconds_export"] = round(t_export - t0 - t_sim - (summary.get("seconds") or 0), 1)
    return _evaluate_and_install(args, candidate, heldout, report, t0, progress)


def _evaluate_and_install(
    args: argparse.Namespace,
    candidate: Path,
    heldout: dict[int, Path],
    report: dict[str, Any],
    t0: float,
    progress: bool,
) -> dict[str, Any]:
    from locus.service.manifest import load_manifest
    from locus.training.sim.generator import REF_CELL_DIAMETER_PX

    work = Path(args.work)
    out = Path(args.out)
    report["model_dir"] = str(out)
    lo = min(r[0] for _, r, _ in TRAIN_MIX)
    hi = max(r[1] for _, r, _ in TRAIN_MIX)
    pixel_size = round(_REF_PIXEL_SIZE_UM * REF_CELL_DIAMETER_PX / math.sqrt(lo * hi), 4)
    report["pixel_size"] = pixel_size
    t_export = time.time()
    load_manifest(candidate)
    if args.skip_eval:
        replace = True
        ev = old = real = old_real = None
    else:
        kept_new: dict[str, dict[str, Any]] = {}
        kept_old: dict[str, dict[str, Any]] = {}
        ev = evaluate_sizes(candidate, heldout, args.segmenter, progress, keep=kept_new)
        has_old = (out / "manifest.json").is_file() and not args.no_compare
        old = evaluate_sizes(out, heldout, args.segmenter, progress, keep=kept_old) if has_old else None
        if old is not None:
            ev["paired"] = compare_sizes(kept_new, kept_old)
            old["paired"] = _swap(ev["paired"])
            report["paired"] = ev["paired"]
            if progress:
                w = ev["paired"]["worst"]
                print(
                    f"candidate - installed, worst size: {w['difference']:+.3f} (90% paired interval "
                    f"{w['interval'][0]:+.3f} to {w['interval'][1]:+.3f}; candidate higher in {w['a_better']:.0%})",
                    flush=True,
                )
        kept_new.clear()
        kept_old.clear()
        real = None if args.no_real else _real_at_1_and_8(candidate, args.segmenter)
        old_real = None if (args.no_real or not has_old) else _real_at_1_and_8(out, args.segmenter)
        if progress and real:
            print(real["table"], flush=True)
        replace = args.force or _better(ev, old, real, old_real)
        report["new_by_size"] = {s: v["map"] for s, v in ev["by_size"].items()}
        report["previous_by_size"] = None if old is None else {s: v["map"] for s, v in old["by_size"].items()}
        report["new_worst"] = ev["worst_map"]
        report["previous_worst"] = None if old is None else old["worst_map"]
        report["seconds_eval"] = round(time.time() - t_export, 1)
    report["replaced"] = bool(replace)
    if ev is not None:
        # The full measurements, named by role (the card of each model names them from its own side).
        (work / "evaluation.json").write_text(
            json.dumps(
                {
                    "replaced": bool(replace),
                    "candidate": ev,
                    "installed": old,
                    "candidate_real": real,
                    "installed_real": old_real,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    if replace:
        notes = out / "CARD_NOTES.md"
        saved_notes = notes.read_text(encoding="utf-8") if notes.is_file() else None
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(candidate, out)
        if saved_notes is not None:
            notes.write_text(saved_notes, encoding="utf-8")
        if ev is not None:
            record_evaluation(out, ev, old, real, old_real, pixel_size)
    elif ev is not None:
        record_evaluation(candidate, ev, old, real, old_real, pixel_size)
        if old is not None:
            # the installed model keeps its weights; its card and manifest get the same measurements
            record_evaluation(out, old, ev, old_real, real, None, names=("installed model", "retrained candidate"))
        if progress:
            print(f"kept {out}: the candidate (in {candidate}) is not measured better", flush=True)
    if replace:
        report["bioimageio"] = _bioimageio_package(out)
    report["seconds_total"] = round(time.time() - t0, 1)
    text = json.dumps(report, indent=2) + "\n"
    (work / "default_model_report.json").write_text(text, encoding="utf-8")
    if replace:
        (out / "default_model_report.json").write_text(text, encoding="utf-8")
    return report


def _bioimageio_package(out: Path) -> str:
    """Write the installed model's BioImage.IO package (weights referenced) into ``out/bioimageio``, if possible."""
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        return "skipped: bioimageio.spec is not installed (the [bioimageio] extra)"
    from locus.training.bioimageio_export import BioimageioExportError, export_bioimageio

    try:
        export_bioimageio(out, out / "bioimageio", weights="reference")
    except BioimageioExportError as exc:
        return f"failed: {exc}"
    return str(out / "bioimageio")


def run(args: argparse.Namespace) -> int:
    """Run ``locus default-model``.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options.

    Returns
    -------
    int
        0 on success, 1 on failure.
    """
    try:
        report = build_default_model(args)
    except (OSError, ValueError, RuntimeError) as exc:
        sys.stderr.write(f"locus default-model: {exc}\n")
        return 1
    print(json.dumps(report, indent=2))
    return 0
