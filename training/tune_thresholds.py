"""``locus tune-thresholds``: tune a model folder's thresholds again on its run's validation cells.

Training tunes one threshold per class for one view and one set each for scores averaged over
2, 4 and 8 test-time views (:func:`locus.training.thresholds.tune_view_thresholds`), with the
config's ``threshold_rule``. This command does the same for a model folder trained before
either existed, or with another rule: it rebuilds the run's validation crops (from the run's
crop cache when it is current; the split is the run's own), scores them with the folder's ONNX
model in all eight views and tunes every set for F1, as training does. The weights are not
touched.

Usage::

    locus tune-thresholds --run RUN_DIR [--model MODEL_DIR] [--rule one-se|argmax] [--write]

Without ``--write`` it prints the thresholds and leaves the folder as it is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from locus.training.thresholds import THRESHOLD_RULES

__all__ = ["configure_parser", "run", "tune_folder"]


def tune_folder(
    run_dir: str | Path, model_dir: str | Path, rule: str = "one-se", progress: bool = True
) -> dict[int, list[float]]:
    """Thresholds of a model folder for 1, 2, 4 and 8 views, tuned on its training run's validation cells.

    Parameters
    ----------
    run_dir : str or Path
        The training run (its ``config.json`` names the data, crop rule, split seed and cache).
    model_dir : str or Path
        The model folder whose ``model.onnx`` scores the cells.
    rule : {"one-se", "argmax"}
        How each set is tuned (:func:`locus.training.thresholds.tune_thresholds`).
    progress : bool
        Show the crop-extraction progress bar.

    Returns
    -------
    dict of int to list of float
        ``{1: [...], 2: [...], 4: [...], 8: [...]}``, 19 thresholds each; 1 is the manifest's
        ``thresholds``, the others its ``view_thresholds``.

    Raises
    ------
    ValueError
        The run has no config, or its crops do not fit the model's input.
    """
    from locus.service.inference import Classifier
    from locus.service.tta import TTA_VIEWS
    from locus.training.config import load_config
    from locus.training.dataset import build_crops, split_by_image
    from locus.training.thresholds import tune_view_thresholds

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{run_dir}: no config.json (is it a `locus train` run folder?)")
    config = load_config(cfg_path)
    classifier = Classifier(model_dir)
    if config.input_size != classifier.input_size:
        raise ValueError(
            f"the run crops {config.input_size} px but {model_dir} takes {classifier.input_size} px: "
            "the model was not trained by this run"
        )
    crops = build_crops(config, progress=progress)
    _, va_idx = split_by_image(crops, config.val_fraction, config.seed)
    if len(va_idx) == 0:
        raise ValueError(f"{run_dir}: the run has no validation cells (val_fraction {config.val_fraction})")
    return tune_view_thresholds(
        lambda b: classifier.predict(b.astype(np.float32)),
        crops.images[va_idx],
        crops.labels[va_idx],
        views=TTA_VIEWS,
        rule=rule,
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``locus tune-thresholds`` options.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The subcommand's parser.
    """
    parser.add_argument("--run", required=True, help="the training run folder (config.json, crop cache)")
    parser.add_argument("--model", default=None, help="the model folder (default RUN/model)")
    parser.add_argument(
        "--rule",
        choices=THRESHOLD_RULES,
        default="one-se",
        help="one-se (default): the middle of the thresholds within one bootstrap standard error of the best F1; "
        "argmax: the best F1's own",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="store them in the folder's manifest.json (thresholds and view_thresholds)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _table(before: list[float], sets: dict[int, list[float]]) -> str:
    from locus.service.classes import CLASS_NAMES

    views = sorted(sets)
    head = "class".ljust(42) + "in folder".rjust(10) + "".join(f"{n} view{'s' * (n > 1)}".rjust(9) for n in views)
    rows = [head + "   (in folder: its one-view thresholds now)"]
    for c, name in enumerate(CLASS_NAMES):
        rows.append(name.ljust(42) + f"{before[c]:10.3f}" + "".join(f"{sets[n][c]:9.3f}" for n in views))
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    """Run ``locus tune-thresholds``.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options.

    Returns
    -------
    int
        0 on success, 1 when the run or the folder does not fit.
    """
    from locus.service.manifest import ModelFolderError, load_manifest
    from locus.training.export import write_manifest

    model_dir = Path(args.model) if args.model else Path(args.run) / "model"
    t0 = time.time()
    try:
        manifest = load_manifest(model_dir)
        sets = tune_folder(args.run, model_dir, rule=args.rule, progress=not args.quiet)
    except (ValueError, ModelFolderError, FileNotFoundError) as exc:
        sys.stderr.write(f"locus tune-thresholds: {exc}\n")
        return 1
    print(_table(manifest.thresholds, sets))
    print(f"tuned on the run's validation cells in {time.time() - t0:.1f} s")
    if args.write:
        training = dict(manifest.training)
        training["thresholds"] = {"rule": args.rule, "views": sorted(sets), "tuned_by": "locus tune-thresholds"}
        update: dict[str, Any] = {
            "thresholds": sets[1],
            "view_thresholds": {n: v for n, v in sets.items() if n > 1},
            "training": training,
        }
        write_manifest(model_dir, manifest.model_copy(update=update))
        load_manifest(model_dir)  # re-validated with its hashes
        print(f"wrote thresholds ({args.rule}) and view_thresholds into {model_dir / 'manifest.json'}")
    return 0
