"""``locus predict``: the service's pipeline over a folder, in-process, writing a competition CSV.

Resumes where it stopped: fields already in the output CSV are skipped. ``--format`` also
writes the answers in the formats of :mod:`locus.service.formats` (per-cell tables,
AnnData, QuPath GeoJSON, label images).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from tqdm import tqdm

from locus.service.config import DEFAULT_MODEL_DIR, PipelineSettings, add_hpa_compat_argument, apply_hpa_compat
from locus.service.factory import build_pipeline
from locus.service.formats import (
    FORMATS,
    FormatOptionError,
    FormatUnavailableError,
    FormatWriter,
    field_answer,
    parse_formats,
)
from locus.service.pipeline import ClassifyOptions
from locus.service.readers import find_fields, load_field
from locus.service.response import classify_response
from locus.service.submission import SubmissionRow, SubmissionWriter

__all__ = ["configure_parser", "run", "predict_folder"]


def _formats_arg(text: str) -> tuple[str, ...]:
    try:
        return parse_formats(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``predict`` options."""
    parser.add_argument(
        "folder", help="folder of fields: Kaggle layout ({ID}_{red,green,blue,yellow}.png), HPA website JPEGs or TIFF"
    )
    parser.add_argument("--out", required=True, help="submission CSV to write (resumed when it exists)")
    parser.add_argument("--model", default=None, help=f"model folder (default {DEFAULT_MODEL_DIR})")
    parser.add_argument("--segmenter", default="classical", help="classical, hpa or hpacellseg")
    add_hpa_compat_argument(parser)
    parser.add_argument("--json-dir", default=None, help="also write one JSON answer per field here")
    parser.add_argument(
        "--format",
        type=_formats_arg,
        default=(),
        metavar="LIST",
        help=f"also write these formats, comma-separated: {','.join(FORMATS)}; tables cells.csv, cells.parquet, "
        "cells.h5ad hold every field, geojson/{ID}.geojson and labels/{ID}.ome.tif one field each",
    )
    parser.add_argument(
        "--format-dir", default=None, help="folder for the --format files (default: the folder of --out)"
    )
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=0.0,
        help="leave (cell, class) pairs below this confidence out of the CSV (default: keep all)",
    )
    parser.add_argument("--no-resume", action="store_true", help="overwrite the output instead of resuming")
    parser.add_argument("--limit", type=int, default=None, help="process at most this many fields")
    parser.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        metavar="UM",
        help="pixel size of the images in micrometres: fields are resampled to the model's training scale for "
        "segmentation and cropping (masks stay at full resolution); default: no resampling",
    )
    parser.add_argument(
        "--tta",
        choices=["auto", "1", "2", "4", "8"],
        default=None,
        help="test-time augmentation: average each cell's scores over 1, 2, 4 or 8 flipped/transposed views of its "
        "crop (default LOCUS_TTA, auto: 8 on a GPU, 1 on a CPU)",
    )
    parser.add_argument(
        "--field-context",
        type=float,
        default=None,
        metavar="W",
        help="weight from 0 to 1 of the field's mean scores in each cell's scores (0: each cell's own); "
        "default LOCUS_FIELD_CONTEXT",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    ray = parser.add_argument_group("Ray (--engine ray: whole collections on a Ray cluster, the [ray] extra)")
    ray.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process (default); ray: an actor pool on Ray Data, FOLDER may also be a CSV/Parquet "
        "list of fields, and a per-cell Parquet table and an errors CSV are written beside --out",
    )
    ray.add_argument("--address", default=None, help="Ray cluster: auto or ray://HEAD:10001 (default: a local Ray)")
    ray.add_argument("--actors", type=int, default=None, help="actors (default: one per GPU, else one per CPU)")
    ray.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per actor (default 1)")
    ray.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per actor (default 1 with GPUs)")


def predict_folder(
    folder: str | Path,
    out: str | Path,
    *,
    model_dir: str | Path | None = None,
    segmenter: str = "classical",
    json_dir: str | Path | None = None,
    min_confidence: float = 0.0,
    resume: bool = True,
    limit: int | None = None,
    progress: bool = True,
    formats: tuple[str, ...] | list[str] = (),
    format_dir: str | Path | None = None,
    pixel_size: float | None = None,
    tta: str | int | None = None,
    field_context: float | None = None,
) -> dict[str, int]:
    """Classify every field of a folder and write the submission CSV.

    Parameters
    ----------
    folder : str or Path
        The fields (see :func:`locus.service.readers.find_fields`).
    out : str or Path
        Submission CSV; rows already there are kept and their fields skipped when ``resume``.
    model_dir : str or Path, optional
        Model folder; default the shipped model.
    segmenter : str
        Segmentation backend.
    json_dir : str or Path, optional
        Also write ``{ID}.json`` (the HTTP answer) per field.
    min_confidence : float
        Pairs below it are left out of the CSV.
    resume : bool
        Resume an existing output.
    limit : int, optional
        Stop after this many fields.
    progress : bool
        Show a progress bar.
    formats : sequence of str
        Also write these formats (:data:`locus.service.formats.FORMATS`) with a
        :class:`~locus.service.formats.FormatWriter`.
    format_dir : str or Path, optional
        Their folder (default: the folder of ``out``).
    pixel_size : float, optional
        The images' pixel size in micrometres (:attr:`ClassifyOptions.pixel_size`); default no resampling.
    tta : str or int, optional
        Test-time augmentation: 1, 2, 4, 8 or ``"auto"``, in place of the ``LOCUS_TTA`` setting.
    field_context : float, optional
        Field-context weight in [0, 1], in place of the ``LOCUS_FIELD_CONTEXT`` setting.

    Returns
    -------
    dict
        ``{"fields": found, "done": written now, "skipped": already written, "cells": classified now}``.
    """
    overrides: dict[str, object] = {}
    if tta is not None:
        overrides["tta"] = tta
    if field_context is not None:
        overrides["field_context"] = field_context
    settings = PipelineSettings(**overrides)
    pipeline = build_pipeline(settings, model_dir=model_dir, segmenter=segmenter)
    refs = find_fields(folder)
    if limit is not None:
        refs = refs[:limit]
    options = ClassifyOptions(include_masks=True, include_scores=True, pixel_size=pixel_size)
    extra = None
    if formats:
        extra = FormatWriter(Path(format_dir) if format_dir else Path(out).parent, formats, resume=resume)
        if Path(out).resolve() in {p.resolve() for p in extra.paths().values()}:
            raise FormatOptionError(f"--out {out} is also a --format table; choose another name or --format-dir")
    stats = {"fields": len(refs), "done": 0, "skipped": 0, "cells": 0}
    if json_dir is not None:
        Path(json_dir).mkdir(parents=True, exist_ok=True)
    with SubmissionWriter(out, resume=resume) as writer, extra or nullcontext():
        todo = [r for r in refs if r.id not in writer.done]
        stats["skipped"] = len(refs) - len(todo)
        for ref in tqdm(todo, desc="predict", unit="field", disable=not progress):
            image = load_field(ref, max_pixels=settings.max_image_pixels)
            result = pipeline.run(image, options)
            body = None
            if json_dir is not None:
                body = classify_response(result, options, pipeline, request_id=ref.id)
                (Path(json_dir) / f"{ref.id}.json").write_text(
                    body.model_dump_json(exclude_none=True), encoding="utf-8"
                )
            if extra is not None:
                extra.add(field_answer(result, options, pipeline, image_id=ref.id, request_id=ref.id, body=body))
            writer.write(SubmissionRow(ref.id, result.width, result.height, result.predictions(min_confidence)))
            stats["done"] += 1
            stats["cells"] += len(result.cells)
    return stats


def run(args: argparse.Namespace) -> int:
    """Run ``locus predict``."""
    apply_hpa_compat(args)
    if getattr(args, "engine", "local") == "ray":
        from locus.service.batch_ray import run_ray

        if getattr(args, "pixel_size", None) is not None:
            print("locus predict: --pixel-size is not supported with --engine ray yet", file=sys.stderr)
            return 2
        if getattr(args, "tta", None) is not None:
            print("locus predict: with --engine ray set LOCUS_TTA on the cluster instead of --tta", file=sys.stderr)
            return 2
        if getattr(args, "field_context", None) is not None:
            print(
                "locus predict: with --engine ray set LOCUS_FIELD_CONTEXT on the cluster instead of --field-context",
                file=sys.stderr,
            )
            return 2
        return run_ray(args)
    try:
        stats = _run_local(args)
    except (FormatUnavailableError, FormatOptionError) as exc:
        print(f"locus predict: {exc}", file=sys.stderr)
        return 2
    if args.format:
        print(f"formats {','.join(args.format)} written to {args.format_dir or Path(args.out).parent}", file=sys.stderr)
    print(
        f"{stats['done']} fields classified ({stats['cells']} cells), {stats['skipped']} already in {args.out}, "
        f"{stats['fields']} found",
        file=sys.stderr,
    )
    return 0


def _run_local(args: argparse.Namespace) -> dict[str, int]:
    return predict_folder(
        args.folder,
        args.out,
        model_dir=args.model,
        segmenter=args.segmenter,
        json_dir=args.json_dir,
        min_confidence=args.min_confidence,
        resume=not args.no_resume,
        limit=args.limit,
        progress=not args.quiet,
        formats=args.format,
        format_dir=args.format_dir,
        pixel_size=getattr(args, "pixel_size", None),
        tta=getattr(args, "tta", None),
        field_context=getattr(args, "field_context", None),
    )
