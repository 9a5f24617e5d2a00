"""``locus default-model``: build the shipped default model from scratch, in one command.

Steps
-----
1. Generate a fresh HPA-sim training set and a separate held-out set (other seed, other IDs).
2. Train EfficientNet-B0 on per-cell crops at a modest input size. ``label_source``
   is ``"cell"`` by default because HPA-sim has per-cell ground truth;
   ``--label-source image`` trains on weak (image-level) labels as with the Kaggle data.
3. Export the model folder (``model.onnx``, ``grad.onnx`` when available, manifest, card).
4. Evaluate on the held-out fields through the service's own pipeline
   (``locus predict`` -> submission CSV -> competition metric) and write the
   held-out mAP into the manifest's training metrics and the model card.

The manifest hashes only the ONNX files, so adding the metrics afterwards keeps
the folder valid (checked with :func:`locus.service.manifest.load_manifest`).
"""

from __future__ import annotations

import argparse
import csv as csv_module
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["configure_parser", "run", "build_default_model", "evaluate_heldout", "record_heldout"]

DEFAULTS: dict[str, Any] = {
    "out": "models/locus-sim-b0",
    "work": "runs/default-model",
    "fields": 300,
    "heldout_fields": 40,
    "size": 512,
    "input_size": 96,
    "epochs": 16,
    "batch_size": 32,
    "learning_rate": 2e-3,
    "seed": 2021,
}


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
    parser.add_argument("--fields", type=int, default=d["fields"], help="HPA-sim training fields")
    parser.add_argument("--heldout-fields", type=int, default=d["heldout_fields"], help="HPA-sim held-out fields")
    parser.add_argument("--size", type=int, default=d["size"], help="field side in pixels (512 = HPA at 1/4)")
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
    parser.add_argument("--version", default="0.1.0")
    parser.add_argument("--no-grad", action="store_true", help="do not export grad.onnx")
    parser.add_argument("--skip-eval", action="store_true", help="do not evaluate on the held-out fields")
    parser.add_argument("--keep-data", action="store_true", help="reuse existing HPA-sim folders in --work")
    parser.add_argument("--quiet", action="store_true")


def _simulate(folder: Path, n: int, seed: int, size: int, start: int, workers: int, keep: bool, progress: bool) -> Path:
    from locus.training.sim.generator import SimConfig, write_dataset

    if keep and (folder / "train.csv").is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    return write_dataset(
        folder, n=n, seed=seed, config=SimConfig(size=size), workers=workers, progress=progress, start=start
    )


def evaluate_heldout(
    model_dir: str | Path,
    heldout_dir: str | Path,
    work: str | Path,
    segmenter: str = "classical",
    progress: bool = True,
) -> dict[str, Any]:
    """Score a model folder on held-out fields through the service's pipeline.

    Runs ``locus predict`` (``cli.main``) to write a submission CSV, then
    :func:`locus.service.metric.evaluate_folder` against the held-out ground truth.

    Parameters
    ----------
    model_dir : str or Path
        The model folder.
    heldout_dir : str or Path
        Held-out dataset with ``truth/``.
    work : str or Path
        Where the CSV and the JSON result go.
    segmenter : str
        Segmentation backend of the prediction.
    progress : bool
        Show the prediction progress bar.

    Returns
    -------
    dict
        ``{"heldout_map", "heldout_fields", "heldout_segmenter", "heldout_ap", "heldout_seconds"}``.
    """
    from locus.service.metric import evaluate_folder
    from locus.service.predict import predict_folder

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    csv = work / "heldout_predictions.csv"
    t = time.time()
    predict_folder(heldout_dir, csv, model_dir=model_dir, segmenter=segmenter, resume=False, progress=progress)
    # a field's PredictionString (19 classes x cells x RLE masks) exceeds csv's default 128 KiB field limit
    csv_module.field_size_limit(max(csv_module.field_size_limit(), 1 << 30))
    result = evaluate_folder(heldout_dir, csv)
    (work / "heldout_eval.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    if progress:
        print(result.table(), flush=True)
    d = result.to_dict()
    return {
        "heldout_map": d["mAP"],
        "heldout_fields": d["n_images"],
        "heldout_segmenter": segmenter,
        "heldout_ap": [c["ap"] for c in d["classes"]],
        "heldout_seconds": round(time.time() - t, 1),
    }


def record_heldout(model_dir: str | Path, metrics: dict[str, Any]):
    """Write held-out metrics into a model folder's manifest and card.

    Parameters
    ----------
    model_dir : str or Path
        The model folder.
    metrics : dict
        From :func:`evaluate_heldout`.

    Returns
    -------
    Manifest
        The updated manifest, re-validated with its ONNX hashes.
    """
    from locus.service.manifest import load_manifest
    from locus.training.export import write_manifest, write_model_card

    manifest = load_manifest(model_dir)
    training = dict(manifest.training)
    training["metrics"] = {**training.get("metrics", {}), **metrics}
    manifest = manifest.model_copy(update={"training": training})
    write_manifest(model_dir, manifest)
    write_model_card(model_dir, manifest)
    return load_manifest(model_dir)


def build_default_model(args: argparse.Namespace) -> dict[str, Any]:
    """Generate HPA-sim, train, export and evaluate; returns a summary.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed ``locus default-model`` options.

    Returns
    -------
    dict
        Timings, data sizes, validation and held-out metrics, the model folder.
    """
    from locus.training.config import TrainConfig
    from locus.training.export import export_model_folder
    from locus.training.train import train

    progress = not args.quiet
    t0 = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_dir = _simulate(
        work / "sim-train", args.fields, args.seed, args.size, 0, args.workers, args.keep_data, progress
    )
    heldout_dir = _simulate(
        work / "sim-heldout",
        args.heldout_fields,
        args.seed + 1,
        args.size,
        100_000,
        args.workers,
        args.keep_data,
        progress,
    )
    t_sim = time.time() - t0
    config = TrainConfig(
        train_dirs=[str(train_dir)],
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
    result = train(config, progress=progress)
    summary = dict(result.summary)
    summary["notes"] = [
        f"label_source '{config.label_source}': "
        + (
            "HPA-sim provides per-cell ground truth (truth/cells.csv), so each crop is trained on its own cell's "
            "labels. With real Kaggle data only image-level labels exist: use label_source 'image' (weak labels, "
            "each cell inherits its image's labels), also available here with --label-source image."
            if config.label_source == "cell"
            else "weak labels: each cell inherits its image's labels (the Kaggle setting)."
        ),
        f"built by `locus default-model` with {args.fields} training and {args.heldout_fields} held-out HPA-sim "
        f"fields of {args.size} px (seed {args.seed}); data generation {t_sim:.0f} s.",
    ]
    import numpy as np

    parity = np.load(result.run_dir / "parity_batch.npy").astype(np.float32)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    export_model_folder(result.model, out, config, result.thresholds, summary, parity, with_grad=not args.no_grad)
    t_export = time.time()
    report: dict[str, Any] = {
        "model_dir": str(out),
        "seconds_sim": round(t_sim, 1),
        "seconds_train": summary.get("seconds"),
        "train_samples_per_s": summary.get("train_samples_per_s"),
        "cells": summary["data"]["cells"],
        "val_cell_map": summary["metrics"]["val_cell_map"],
    }
    if not args.skip_eval:
        try:
            import locus.service.predict  # noqa: F401 - the service's batch prediction must exist
        except ImportError as exc:
            report["heldout"] = f"skipped: locus.service.predict unavailable ({exc})"
        else:
            metrics = evaluate_heldout(out, heldout_dir, work, args.segmenter, progress)
            record_heldout(out, metrics)
            report["heldout_map"] = metrics["heldout_map"]
            report["seconds_eval"] = metrics["heldout_seconds"]
    report["seconds_export"] = round(t_export - t0 - t_sim - (summary.get("seconds") or 0), 1)
    report["seconds_total"] = round(time.time() - t0, 1)
    (work / "default_model_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


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
