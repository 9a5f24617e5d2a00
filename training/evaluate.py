"""``locus eval``: score a submission CSV against ground truth with the competition metric.

Usage::

    locus eval --truth DIR --predictions submission.csv [--json out.json] [--iou 0.6]

``DIR`` is a dataset folder with ``truth/`` (``{ID}_cells.png``, ``cells.csv``)
or the ``truth/`` folder itself. Prints a per-class table (id, name, n GT,
n pred, AP; "n/a" for classes without ground truth, which are excluded from
the mean) and a final line ``mAP: 0.xxx``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from locus.service.metric import IOU_THRESHOLD, evaluate_folder

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
    try:
        result = evaluate_folder(args.truth, args.predictions, iou_threshold=args.iou)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"locus eval: {exc}\n")
        return 2
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0
