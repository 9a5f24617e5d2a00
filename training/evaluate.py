"""``locus eval``: score a submission CSV against ground truth with the competition metric.

Usage::

    locus eval --truth DIR --predictions submission.csv [--json out.json] [--iou 0.6] [--against other.csv]

``DIR`` is a dataset folder with ``truth/`` (``{ID}_cells.png``, ``cells.csv``)
or the ``truth/`` folder itself. Prints a per-class table (id, name, n GT,
n pred, AP; "n/a" for classes without ground truth, which are excluded from
the mean) and a final line ``mAP: 0.xxx``. With ``--against`` (a second model's
CSV for the same fields) it also prints the mAP difference with its paired
bootstrap interval over the fields: which model is better, and how sure that is.

Image-level mode, for fields with image labels only (real HPA / Kaggle fields)::

    locus eval --truth DIR --predictions submission.csv --image-level [--model MODEL_DIR | --threshold 0.5]

``DIR`` holds ``train.csv`` (``ID,Label``). Per class: AP over images, an image's
score being its highest cell score. Per field: which true labels are called on at
least one cell (a call: probability at or above the model manifest's per-class
threshold, or ``--threshold``), and which wrong classes are called on at least 40%
of its cells; also each cell's top label.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from locus.service.metric import (
    IOU_THRESHOLD,
    evaluate,
    evaluate_image_level_csv,
    map_difference,
    read_truth_folder,
)
from locus.service.tta import TTA_VIEWS

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``locus eval`` options.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The subcommand's parser.
    """
    parser.add_argument(
        "--truth",
        required=True,
        metavar="DIR",
        help="dataset folder with truth/ ({ID}_cells.png, cells.csv), or the truth folder",
    )
    parser.add_argument(
        "--predictions", required=True, metavar="CSV", help="submission CSV: ID,ImageWidth,ImageHeight,PredictionString"
    )
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the result as JSON here")
    parser.add_argument(
        "--iou",
        type=float,
        default=IOU_THRESHOLD,
        help=f"IoU threshold of a match (default {IOU_THRESHOLD}, the competition's)",
    )
    parser.add_argument(
        "--against",
        metavar="CSV",
        default=None,
        help="a second submission CSV for the same fields (another model): also print the mAP difference "
        "predictions - against with its 90%% paired bootstrap interval over the fields",
    )
    image = parser.add_argument_group("image-level mode (fields with image labels only)")
    image.add_argument(
        "--image-level",
        action="store_true",
        help="score against DIR/train.csv image labels: per-class AP over images (image score = highest cell "
        "score), true labels called per field, wrong classes on >= 40%% of a field's cells",
    )
    image.add_argument("--model", default=None, help="model folder whose per-class thresholds decide a call")
    image.add_argument("--threshold", type=float, default=None, help="one threshold for every class instead")
    image.add_argument(
        "--tta",
        type=int,
        choices=TTA_VIEWS,
        default=1,
        help="the views the predictions averaged (locus predict's LOCUS_TTA): the model's thresholds for that many "
        "views decide a call (default 1)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``locus eval``.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options.

    Returns
    -------
    int
        0 on success, 2 on bad input (message on stderr).
    """
    if getattr(args, "image_level", False):
        return _run_image_level(args)
    from locus.service.submission import read_submission

    try:
        truth, sizes = read_truth_folder(args.truth)
        predictions = read_submission(args.predictions)
        result = evaluate(truth, predictions, args.iou, sizes=sizes)
        against = None
        if args.against:
            other = read_submission(args.against)
            against = map_difference(truth, predictions, other, args.iou, sizes=sizes)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"locus eval: {exc}\n")
        return 2
    print(result.table())
    out = result.to_dict()
    if against is not None:
        names = (Path(args.predictions).name, Path(args.against).name)
        if names[0] == names[1]:
            names = ("predictions", "against")
        print(against.text(*names))
        out["against"] = {"predictions": str(args.against), "mAP": result.mAP - against.difference}
        out["against"].update(against.to_dict())
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


def _run_image_level(args: argparse.Namespace) -> int:
    import numpy as np

    from locus.service.classes import NUM_CLASSES

    root = Path(args.truth)
    labels_csv = root if root.is_file() else root / "train.csv"
    try:
        if args.threshold is not None:
            thresholds = np.full(NUM_CLASSES, float(args.threshold))
        else:
            from locus.service.manifest import load_manifest
            from locus.service.predict import DEFAULT_MODEL_DIR

            manifest = load_manifest(args.model or DEFAULT_MODEL_DIR, verify_hashes=False)
            thresholds = np.asarray(manifest.thresholds_for(args.tta))
        result = evaluate_image_level_csv(labels_csv, args.predictions, thresholds)
    except (OSError, ValueError, RuntimeError) as exc:
        sys.stderr.write(f"locus eval: {exc}\n")
        return 2
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0
