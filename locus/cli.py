"""The ``locus`` console script: one entry point, one subcommand per job.

Each subcommand lives in its own module, which provides
``configure_parser(parser)`` and ``run(args) -> int``; modules are imported
only when their subcommand runs, so ``locus serve`` never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: subcommand -> (module, one-line help, extra needed when the module's imports fail)
SUBCOMMANDS: dict[str, tuple[str, str, str | None]] = {
    "serve": ("locus.service.serve", "start the HTTP service (uvicorn)", None),
    "predict": (
        "locus.service.predict",
        "classify every field of a folder in-process and write a submission CSV",
        None,
    ),
    "sim": ("locus.training.sim.cli", "generate HPA-sim fields of view with per-cell ground truth", None),
    "eval": ("locus.training.evaluate", "score a submission CSV against ground truth (competition mAP)", None),
    "train": ("locus.training.train", "train the 4-channel EfficientNet on per-cell crops", "train"),
    "export": ("locus.training.export", "export a trained Keras model to a model folder (ONNX)", "train"),
    "tune-thresholds": (
        "locus.training.tune_thresholds",
        "tune a model folder's thresholds for 2, 4 and 8 test-time views on its run's validation cells",
        "train",
    ),
    "default-model": (
        "locus.training.default_model",
        "generate HPA-sim, train, export and evaluate the default model",
        "train",
    ),
    "overlay": ("locus.service.overlay", "render a field with cell outlines, labels and IG heatmaps as PNG", None),
    "hpa-export": ("locus.training.hpa_export", "convert the official HPA segmentation weights to ONNX", "hpa"),
    "hpa-download": ("locus.training.hpa_download", "download public HPA images into the Kaggle layout", None),
    "segment": ("locus.training.segment_cache", "segment every field once and store its label images", None),
}


def _load(name: str):
    module_name, _, extra = SUBCOMMANDS[name]
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        if (
            extra
            and missing
            and missing.split(".")[0] in {"tensorflow", "keras", "tf2onnx", "onnx", "matplotlib", "iterstrat"}
        ):
            sys.stderr.write(
                f"locus {name}: needs the [{extra}] extra ({missing} is not installed).\n"
                f"Install it with:  pip install -e '.[{extra}]'\n"
            )
            raise SystemExit(2) from exc
        raise


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser; only the chosen subcommand's module is imported.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments, used to find which subcommand to configure.

    Returns
    -------
    argparse.ArgumentParser
        The parser.
    """
    parser = argparse.ArgumentParser(prog="locus", description="Locus: where does the protein sit, cell by cell.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text, _) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _load(name).configure_parser(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``locus`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        Command-line arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    return int(_load(args.command).run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
