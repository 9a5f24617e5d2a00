"""``locus predict --engine ray``: a whole collection of fields on Ray Data, the service's pipeline in every actor.

The fields (a folder, or a CSV/Parquet list of field paths) become a Ray Dataset of
small rows (ID and file paths, never pixels). ``Dataset.map_batches`` runs
:class:`FieldPredictor` in an actor pool (``compute=ray.data.ActorPoolStrategy``):
each actor builds the pipeline once with :func:`locus.service.factory.build_pipeline`
and classifies one field per call with :meth:`~locus.service.pipeline.Pipeline.run`,
exactly as ``locus predict`` and the HTTP service do; its answer is turned into the
submission row by :func:`locus.service.response.kaggle_row` and into per-cell rows by
:func:`locus.service.response.classify_response`. Actors read their fields from storage
themselves, so every node needs the same paths (a shared file system or a mounted bucket).

The driver streams the results and writes three outputs:

* ``OUT.csv``: the competition submission (:class:`locus.service.submission.SubmissionWriter`),
  the same rows as single-process ``locus predict``;
* ``OUT.cells.parquet/``: a Parquet dataset (a folder of parts) with one row per cell:
  image id, cell id, bounding box, area, centroid, the 19 scores, the labels and the COCO RLE
  mask (read it with ``pandas.read_parquet`` or ``pyarrow.parquet.read_table``);
* ``OUT.errors.csv``: ``ID,stage,reason`` for every field that failed in this run (a corrupt
  file, a missing channel); the job goes on without them.

Resuming: fields already in the CSV are skipped. Results are flushed in groups: the
group's cell part is written first (atomically), then its CSV rows, so after a crash a
resumed run drops cell rows whose field never reached the CSV and classifies it again.
Fields that failed are not in the CSV and are retried by the next run.

Ray is the optional ``[ray]`` extra (``pip install 'locus[ray]'``); this module imports
it only when a job starts.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from locus.service.classes import CHANNELS, NUM_CLASSES
from locus.service.config import PipelineSettings
from locus.service.factory import build_pipeline
from locus.service.pipeline import ClassifyOptions, Pipeline
from locus.service.readers import EXTENSIONS, FieldRef, IncompleteFieldError, find_fields, load_field
from locus.service.response import classify_response, kaggle_row
from locus.service.submission import SubmissionRow, SubmissionWriter

__all__ = [
    "RayUnavailableError",
    "FieldError",
    "FormattedRow",
    "ROW_KEYS",
    "ERRORS_HEADER",
    "cell_schema",
    "output_paths",
    "read_field_list",
    "list_fields",
    "resolve_field",
    "classify_field",
    "FieldPredictor",
    "CellTableWriter",
    "ErrorLog",
    "plan_actors",
    "predict_ray",
    "run_ray",
]

ROW_KEYS: tuple[str, ...] = ("id", "prefix", *CHANNELS)
"""Columns of the Ray Dataset's input rows: the field ID, a path prefix (``{prefix}_{channel}.{ext}``)
and/or one path per channel ("" when not given)."""

ERRORS_HEADER: tuple[str, ...] = ("ID", "stage", "reason")
"""Columns of the errors sidecar CSV."""

LIST_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".parquet", ".pq")
"""File name endings read as a list of fields instead of a folder."""

_PREFIX_COLUMNS = ("prefix", "path", "image")
_CHANNEL_FILE = re.compile(r"^(?P<id>.+)_(?:red|green|blue|yellow)\.(?:png|tiff?|jpe?g)$", re.IGNORECASE)
_PART_GLOB = "part-*.parquet"


class RayUnavailableError(ImportError):
    """Ray (or pyarrow) is not installed: the ``[ray]`` extra is needed."""


class FieldError(Exception):
    """A field that cannot be classified, with the stage where it failed.

    Parameters
    ----------
    stage : str
        ``"list"`` (its files), ``"read"`` (opening or decoding) or ``"classify"`` (the pipeline).
    reason : str
        What went wrong, for a person to read.
    """

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


def _import_ray() -> Any:
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayUnavailableError(
            f"--engine ray needs the [ray] extra ({exc.name or exc} is not installed): pip install 'locus[ray]'"
        ) from exc
    return ray


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise RayUnavailableError(
            "the per-cell table needs pyarrow (the [ray] extra): pip install 'locus[ray]'"
        ) from exc
    return pa, pq


def cell_schema() -> Any:
    """The per-cell table's Arrow schema.

    Returns
    -------
    pyarrow.Schema
        ``image_id``, ``cell_id``, ``row0``/``col0``/``row1``/``col1`` (end-exclusive box), ``area``,
        ``centroid_row``/``centroid_col``, ``touches_border``, ``scores`` (19 float32 in class order),
        ``labels`` (class ids at or above their threshold, most confident first), ``image_height``,
        ``image_width`` and ``rle_counts`` (COCO compressed RLE of the cell's mask; its size is
        ``[image_height, image_width]``).
    """
    pa, _ = _pyarrow()
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("cell_id", pa.int32()),
            ("row0", pa.int32()),
            ("col0", pa.int32()),
            ("row1", pa.int32()),
            ("col1", pa.int32()),
            ("area", pa.int64()),
            ("centroid_row", pa.float64()),
            ("centroid_col", pa.float64()),
            ("touches_border", pa.bool_()),
            ("scores", pa.list_(pa.float32(), NUM_CLASSES)),
            ("labels", pa.list_(pa.int16())),
            ("image_height", pa.int32()),
            ("image_width", pa.int32()),
            ("rle_counts", pa.string()),
        ]
    )


def output_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """Default sidecar paths of a submission CSV.

    Parameters
    ----------
    out : path-like
        The submission CSV, e.g. ``run/submission.csv``.

    Returns
    -------
    cells : Path
        ``run/submission.cells.parquet`` (a folder of Parquet parts).
    errors : Path
        ``run/submission.errors.csv``.
    """
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{stem}.cells.parquet"), out.with_name(f"{stem}.errors.csv")


# ----------------------------------------------------------------------------- listing the fields
def _empty_row(ident: str) -> dict[str, str]:
    return {"id": ident, "prefix": "", **dict.fromkeys(CHANNELS, "")}


def _list_records(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        _, pq = _pyarrow()
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))


def read_field_list(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a list of fields (CSV, TSV or Parquet).

    Each row names one field by a path prefix (column ``prefix``, ``path`` or ``Image``:
    ``{prefix}_{red,green,blue,yellow}.{png,tif,tiff,jpg,jpeg}``) and/or by one column per
    channel (``red``, ``green``, ``blue``, ``yellow``). The ``ID`` column is optional: by default
    the prefix's file name, or the channel file's name before ``_red``. Relative paths are taken
    from the list's folder. Column names are case-insensitive.

    Parameters
    ----------
    path : path-like
        The list file.

    Returns
    -------
    list of dict
        Rows with the keys of :data:`ROW_KEYS`, in file order.

    Raises
    ------
    ValueError
        No usable column, a row without an ID or paths, a URL, or a duplicate ID (with the row number).
    """
    path = Path(path)
    base = path.resolve().parent
    records = _list_records(path)
    out: list[dict[str, str]] = []
    seen: set[str] = set()

    def absolute(value: Any) -> str:
        text = str(value).strip() if value is not None else ""
        if not text:
            return ""
        if "://" in text:
            raise ValueError(f"{text!r} is a URL; download the fields first and list local or mounted paths")
        return str(base / text) if not os.path.isabs(text) else text

    for line, record in enumerate(records, start=2):
        rec = {str(k).strip().lower(): v for k, v in record.items() if k is not None}
        if line == 2 and not (any(c in rec for c in _PREFIX_COLUMNS) or all(c in rec for c in CHANNELS)):
            raise ValueError(
                f"{path}: needs a prefix column ({', '.join(_PREFIX_COLUMNS)}) or the four channel columns "
                f"({', '.join(CHANNELS)}); found {sorted(rec)}"
            )
        try:
            prefix = next((absolute(rec[c]) for c in _PREFIX_COLUMNS if rec.get(c)), "")
            channels = {c: absolute(rec.get(c)) for c in CHANNELS}
        except ValueError as exc:
            raise ValueError(f"{path}:{line}: {exc}") from exc
        ident = str(rec.get("id") or "").strip()
        if not ident and prefix:
            ident = Path(prefix).name
        if not ident:
            named = next((Path(p).name for p in channels.values() if p), "")
            m = _CHANNEL_FILE.match(named)
            ident = m["id"] if m else ""
        if not ident:
            raise ValueError(f"{path}:{line}: no ID (give an ID column, a prefix, or files named ID_red.png ...)")
        if not prefix and not any(channels.values()):
            raise ValueError(f"{path}:{line} ({ident}): no paths")
        if ident in seen:
            raise ValueError(f"{path}:{line}: duplicate ID {ident!r}")
        seen.add(ident)
        out.append({"id": ident, "prefix": prefix, **channels})
    return out


@dataclass
class FormattedRow(SubmissionRow):
    """A submission row whose ``PredictionString`` was already formatted (and checked) by the actor.

    The driver writes every field's row; re-parsing and re-formatting a 2048² field's string (hundreds
    of KiB) there would make the one driver the job's bottleneck.
    """

    prediction_string: str = ""

    def to_csv_fields(self) -> list[str]:
        """The four CSV fields; the ID and size are checked as for any row."""
        fields = SubmissionRow(self.id, self.width, self.height).to_csv_fields()
        fields[3] = self.prediction_string
        return fields


@dataclass
class _Failure:
    id: str
    stage: str
    reason: str


def list_fields(source: str | os.PathLike) -> tuple[list[dict[str, str]], list[_Failure]]:
    """The fields of a folder or a list file, and those that cannot be read (missing channels).

    Parameters
    ----------
    source : path-like
        A folder (see :func:`locus.service.readers.find_fields`) or a list file (:func:`read_field_list`).

    Returns
    -------
    rows : list of dict
        One row per complete field (keys :data:`ROW_KEYS`), sorted by ID for a folder.
    failures : list
        Fields of a folder that lack a channel file (``stage="list"``), for the errors file.

    Raises
    ------
    FileNotFoundError
        ``source`` does not exist.
    """
    source = Path(source)
    if source.is_file() and source.suffix.lower() in LIST_SUFFIXES:
        return read_field_list(source), []
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: neither a folder of fields nor a list file ({', '.join(LIST_SUFFIXES)})")
    failures: list[_Failure] = []
    try:
        refs = find_fields(source)
    except IncompleteFieldError as exc:
        failures = [_Failure(i, "list", f"missing channel file(s): {', '.join(ch)}") for i, ch in exc.missing.items()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            refs = find_fields(source, on_missing="warn")
    rows = []
    for ref in refs:
        row = _empty_row(ref.id)
        row.update(ref.paths)
        rows.append(row)
    return rows, sorted(failures, key=lambda f: f.id)


def resolve_field(row: Mapping[str, Any]) -> FieldRef:
    """The four channel files of one input row (a prefix is completed by the extensions found on disk).

    Parameters
    ----------
    row : mapping
        Keys of :data:`ROW_KEYS`.

    Returns
    -------
    FieldRef

    Raises
    ------
    FieldError
        A channel file that is missing (``stage="read"``).
    """
    paths = {c: str(row.get(c) or "") for c in CHANNELS}
    prefix = str(row.get("prefix") or "")
    if prefix:
        for c in CHANNELS:
            if not paths[c]:
                found = (f"{prefix}_{c}.{ext}" for ext in EXTENSIONS)
                paths[c] = next((p for p in found if os.path.isfile(p)), "")
    missing = [c for c in CHANNELS if not paths[c] or not os.path.isfile(paths[c])]
    if missing:
        where = f" ({prefix}_*)" if prefix else ""
        raise FieldError("read", f"missing channel file(s): {', '.join(missing)}{where}")
    return FieldRef(str(row["id"]), paths)


# ----------------------------------------------------------------------------- one field, inside an actor
def _cell_table_bytes(image_id: str, body: Any) -> bytes:
    pa, _ = _pyarrow()
    cells = body.cells
    h, w = body.image.height, body.image.width
    table = pa.table(
        {
            "image_id": [image_id] * len(cells),
            "cell_id": [c.id for c in cells],
            "row0": [c.bbox.row0 for c in cells],
            "col0": [c.bbox.col0 for c in cells],
            "row1": [c.bbox.row1 for c in cells],
            "col1": [c.bbox.col1 for c in cells],
            "area": [c.area for c in cells],
            "centroid_row": [c.centroid[0] for c in cells],
            "centroid_col": [c.centroid[1] for c in cells],
            "touches_border": [c.touches_border for c in cells],
            "scores": [c.scores for c in cells],
            "labels": [[lab.class_id for lab in c.labels] for c in cells],
            "image_height": [h] * len(cells),
            "image_width": [w] * len(cells),
            "rle_counts": [c.mask.counts if c.mask is not None else None for c in cells],
        },
        schema=cell_schema(),
    )
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def classify_field(
    pipeline: Pipeline,
    row: Mapping[str, Any],
    *,
    max_pixels: int | None = None,
    min_confidence: float = 0.0,
    json_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Classify one field and return its outputs; a failure becomes an error record, never an exception.

    Parameters
    ----------
    pipeline : Pipeline
        Built by :func:`locus.service.factory.build_pipeline`.
    row : mapping
        The input row (keys :data:`ROW_KEYS`).
    max_pixels : int, optional
        Pixel limit checked before decoding.
    min_confidence : float
        (cell, class) pairs below it are left out of the submission row.
    json_dir : path-like, optional
        Also write the HTTP answer as ``{ID}.json`` there.

    Returns
    -------
    dict
        ``id``, ``ok``, ``stage`` and ``reason`` (failures), ``width``, ``height``,
        ``prediction_string`` (:func:`~locus.service.response.kaggle_row`), ``cells`` (the per-cell
        rows as Arrow IPC bytes), ``n_cells``, ``t_start`` and ``t_end`` (epoch seconds).
    """
    ident = str(row["id"])
    out: dict[str, Any] = {
        "id": ident,
        "ok": False,
        "stage": "",
        "reason": "",
        "width": 0,
        "height": 0,
        "prediction_string": "",
        "cells": b"",
        "n_cells": 0,
        "t_start": time.time(),
        "t_end": 0.0,
    }
    stage = "read"
    try:
        ref = resolve_field(row)
        image = load_field(ref, max_pixels=max_pixels)
        stage = "classify"
        options = ClassifyOptions(include_masks=True, include_scores=True)
        result = pipeline.run(image, options)
        submission = kaggle_row(result, ident, min_confidence)
        body = classify_response(result, options, pipeline, request_id=ident)
        if json_dir is not None:
            Path(json_dir, f"{ident}.json").write_text(body.model_dump_json(exclude_none=True), encoding="utf-8")
        out.update(
            ok=True,
            width=submission.ImageWidth,
            height=submission.ImageHeight,
            prediction_string=submission.PredictionString,
            cells=_cell_table_bytes(ident, body),
            n_cells=len(result.cells),
        )
    except FieldError as exc:
        out.update(stage=exc.stage, reason=exc.reason)
    except Exception as exc:  # one bad field must not stop the job: it becomes an error row
        reason = str(exc) or type(exc).__name__
        out.update(stage=stage, reason=f"{type(exc).__name__}: {reason}")
    out["t_end"] = time.time()
    return out


_OUTPUT_KEYS = (
    "id",
    "ok",
    "stage",
    "reason",
    "width",
    "height",
    "prediction_string",
    "cells",
    "n_cells",
    "t_start",
    "t_end",
    "actor",
    "actor_ready",
)


class FieldPredictor:
    """The Ray Data map class: one pipeline per actor, built once in ``__init__``.

    Parameters
    ----------
    settings : dict
        ``PipelineSettings.model_dump()`` of the driver, so every actor uses the driver's settings.
    model_dir : str, optional
        Model folder (a path every node can read).
    segmenter : str, optional
        Segmentation backend.
    min_confidence : float
        See :func:`classify_field`.
    json_dir : str, optional
        See :func:`classify_field`.
    threads : int
        CPU threads of this actor (ONNX Runtime intra-op threads unless set in the settings, OpenCV).
    """

    def __init__(
        self,
        settings: dict,
        model_dir: str | None = None,
        segmenter: str | None = None,
        min_confidence: float = 0.0,
        json_dir: str | None = None,
        threads: int = 1,
    ) -> None:
        import cv2

        cv2.setNumThreads(max(1, threads))
        self.settings = PipelineSettings(**settings)
        if not self.settings.intra_op_threads:
            self.settings = self.settings.model_copy(update={"intra_op_threads": max(1, threads)})
        self.pipeline = build_pipeline(self.settings, model_dir=model_dir, segmenter=segmenter)
        self.min_confidence = min_confidence
        self.json_dir = json_dir
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        self.ready = time.time()

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, list]:
        """Classify the fields of one batch.

        Parameters
        ----------
        batch : mapping of str to array
            Columns :data:`ROW_KEYS`.

        Returns
        -------
        dict of str to list
            One entry per field for every output column of :func:`classify_field`, plus ``actor``
            (host:pid) and ``actor_ready`` (when its pipeline was built).
        """
        n = len(batch["id"])
        records = []
        for i in range(n):
            row = {k: str(batch[k][i]) if k in batch else "" for k in ROW_KEYS}
            rec = classify_field(
                self.pipeline,
                row,
                max_pixels=self.settings.max_image_pixels,
                min_confidence=self.min_confidence,
                json_dir=self.json_dir,
            )
            rec["actor"] = self.actor
            rec["actor_ready"] = self.ready
            records.append(rec)
        return {k: [r[k] for r in records] for k in _OUTPUT_KEYS}


# ----------------------------------------------------------------------------- outputs, on the driver
class CellTableWriter:
    """The per-cell Parquet dataset: a folder of ``part-*.parquet`` files, each written atomically.

    Parameters
    ----------
    folder : path-like
        The dataset folder (created).
    done : set of str
        Fields already in the submission CSV (resume): rows of any other field are dropped from
        existing parts, since their field will be classified again.
    resume : bool
        Keep existing parts (reconciled with ``done``); with False they are deleted.
    """

    def __init__(self, folder: str | os.PathLike, *, done: set[str], resume: bool = True) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for tmp in self.folder.glob("*.parquet.tmp"):
            tmp.unlink()
        self.dropped = 0
        if resume:
            self.dropped = self._reconcile(done)
        else:
            for part in self.folder.glob(_PART_GLOB):
                part.unlink()
        self._run = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        self._seq = 0
        self.rows = 0

    def _reconcile(self, done: set[str]) -> int:
        pa, pq = _pyarrow()
        import pyarrow.compute as pc

        dropped = 0
        for part in sorted(self.folder.glob(_PART_GLOB)):
            ids = pq.read_table(part, columns=["image_id"]).column(0)
            keep = pc.is_in(ids, value_set=pa.array(sorted(done), pa.string()))
            n_keep = pc.sum(keep).as_py() or 0
            if n_keep == len(ids):
                continue
            dropped += len(ids) - n_keep
            if n_keep == 0:
                part.unlink()
                continue
            self._write_atomic(pq.read_table(part).filter(keep), part)
        return dropped

    @staticmethod
    def _write_atomic(table: Any, path: Path) -> None:
        _, pq = _pyarrow()
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    def write(self, tables: Sequence[Any]) -> None:
        """Write one part holding the given per-field tables (nothing when they have no rows).

        Parameters
        ----------
        tables : sequence of pyarrow.Table
            Tables with :func:`cell_schema`.
        """
        pa, _ = _pyarrow()
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return
        table = pa.concat_tables(tables)
        self._write_atomic(table, self.folder / f"part-{self._run}-{self._seq:05d}.parquet")
        self._seq += 1
        self.rows += table.num_rows


class ErrorLog:
    """The errors sidecar CSV (``ID,stage,reason``), rewritten by every run and flushed per row.

    Parameters
    ----------
    path : path-like
        The CSV file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.count = 0
        self._fh = open(self.path, "w", encoding="utf-8", newline="")  # noqa: SIM115 - closed in close()
        self._csv = csv.writer(self._fh, lineterminator="\n")
        self._csv.writerow(ERRORS_HEADER)
        self._fh.flush()

    def write(self, ident: str, stage: str, reason: str) -> None:
        """Append one failed field."""
        self._csv.writerow([ident, stage, " ".join(str(reason).split())])
        self._fh.flush()
        self.count += 1

    def close(self) -> None:
        """Close the file."""
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> ErrorLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def plan_actors(
    resources: Mapping[str, float],
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = None,
) -> tuple[int, float, float]:
    """Size the actor pool from the cluster's resources.

    Parameters
    ----------
    resources : mapping
        ``ray.cluster_resources()``.
    actors : int, optional
        Pool size; default one per GPU when the cluster has GPUs, else one per ``cpus_per_actor`` CPUs.
    cpus_per_actor : float
        CPUs reserved by each actor (decode and segmentation run on them).
    gpus_per_actor : float, optional
        GPUs per actor; default 1 when the cluster has GPUs, else 0.

    Returns
    -------
    actors : int
    cpus_per_actor : float
    gpus_per_actor : float
    """
    if cpus_per_actor <= 0:
        raise ValueError(f"cpus_per_actor must be positive, got {cpus_per_actor}")
    gpus = float(resources.get("GPU", 0.0))
    cpus = float(resources.get("CPU", 1.0))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if actors is None:
        actors = int(gpus // gpus_per_actor) if gpus_per_actor > 0 else int(cpus // cpus_per_actor)
    if actors < 1:
        actors = 1
    return int(actors), float(cpus_per_actor), float(gpus_per_actor)


def _blocks(n: int, cap: int = 10_000) -> int:
    """Input blocks: one field per block (results stream back field by field) up to ``cap`` blocks."""
    return max(1, n if n <= cap else math.ceil(n / math.ceil(n / cap)))


WORKER_RETRIES = 2
"""Times a field is retried on a restarted actor when its worker process dies (out of memory, a crash)."""


def _iter_results(
    ray: Any,
    rows: list[dict[str, str]],
    predictor: type,
    predictor_kwargs: dict,
    actors: int,
    cpus: float,
    gpus: float,
    batch_size: int,
) -> Iterator[dict[str, Any]]:
    ds = ray.data.from_items(rows, override_num_blocks=_blocks(len(rows)))
    # Ray retries an actor task forever by default: a field that kills its worker would stall the job.
    remote_args: dict[str, Any] = {"num_cpus": cpus, "max_task_retries": WORKER_RETRIES}
    if gpus > 0:
        remote_args["num_gpus"] = gpus
    mapped = ds.map_batches(
        predictor,
        fn_constructor_kwargs=predictor_kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        # one field in flight per actor: a field that kills its worker takes no queued neighbour with it (the
        # rows are paths, so queueing more would overlap nothing worth having)
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        **remote_args,
    )
    for batch in mapped.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()


def predict_ray(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    cells_out: str | os.PathLike | None = None,
    errors_out: str | os.PathLike | None = None,
    address: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = None,
    model_dir: str | os.PathLike | None = None,
    segmenter: str = "classical",
    json_dir: str | os.PathLike | None = None,
    min_confidence: float = 0.0,
    resume: bool = True,
    limit: int | None = None,
    progress: bool = True,
    batch_size: int = 1,
    flush_every: int = 16,
    flush_seconds: float = 30.0,
    settings: PipelineSettings | None = None,
    predictor: type = FieldPredictor,
) -> dict[str, Any]:
    """Classify every field of a folder or list on Ray Data and write the CSV, cell table and errors.

    Parameters
    ----------
    source : path-like
        A folder of fields or a CSV/TSV/Parquet list (:func:`read_field_list`).
    out : path-like
        Submission CSV (resumed when it exists and ``resume``).
    cells_out, errors_out : path-like, optional
        Per-cell Parquet folder and errors CSV; default :func:`output_paths`.
    address : str, optional
        Ray cluster to join (``auto``, ``ray://head:10001``); default a local Ray on this machine.
        When Ray is already initialised in this process it is used as is.
    actors : int, optional
        Actor pool size (:func:`plan_actors`).
    cpus_per_actor : float
        CPUs per actor.
    gpus_per_actor : float, optional
        GPUs per actor (default 1 on a cluster with GPUs).
    model_dir : path-like, optional
        Model folder (default the settings' model, the shipped one); every node must read it.
    segmenter : str
        Segmentation backend.
    json_dir : path-like, optional
        Also write the HTTP answer per field there (from the actors: shared storage).
    min_confidence : float
        Pairs below it are left out of the CSV.
    resume : bool
        Skip fields already in the CSV.
    limit : int, optional
        At most this many fields of the source.
    progress : bool
        Show a progress bar.
    batch_size : int
        Fields per ``map_batches`` call.
    flush_every, flush_seconds : int, float
        Write results after this many fields or seconds, whichever first.
    settings : PipelineSettings, optional
        Default: read from the ``LOCUS_*`` environment of the driver; sent to every actor.
    predictor : type
        The map class, :class:`FieldPredictor` or a subclass of it.

    Returns
    -------
    dict
        ``fields`` (found), ``done`` (classified now), ``skipped`` (already in the CSV), ``errors``,
        ``cells``, ``actors``, ``startup_s`` (Ray start or connect), ``run_s`` (the Ray job, actors'
        start included), ``ready_s`` (until the first actor had its pipeline), ``busy_s`` (from then
        to the last field's end), ``field_seconds`` (each field's time inside its actor), ``per_actor``
        (fields per actor), and the output paths.
    """
    from tqdm import tqdm

    ray = _import_ray()
    pa, _ = _pyarrow()
    settings = settings or PipelineSettings()
    default_cells, default_errors = output_paths(out)
    cells_path = Path(cells_out) if cells_out is not None else default_cells
    errors_path = Path(errors_out) if errors_out is not None else default_errors

    rows, failures = list_fields(source)
    if limit is not None:
        keep = {r["id"] for r in rows[:limit]}
        rows = rows[:limit]
        failures = [f for f in failures if f.id in keep]
    stats: dict[str, Any] = {
        "fields": len(rows) + len(failures),
        "done": 0,
        "skipped": 0,
        "errors": 0,
        "cells": 0,
        "actors": 0,
        "startup_s": 0.0,
        "run_s": 0.0,
        "ready_s": None,
        "busy_s": None,
        "field_seconds": [],
        "per_actor": {},
        "out": str(out),
        "cells_out": str(cells_path),
        "errors_out": str(errors_path),
    }
    if json_dir is not None:
        Path(json_dir).mkdir(parents=True, exist_ok=True)
        json_dir = str(Path(json_dir).resolve())

    with (
        SubmissionWriter(out, resume=resume) as writer,
        ErrorLog(errors_path) as errors,
    ):
        cell_writer = CellTableWriter(cells_path, done=writer.done, resume=resume)
        if resume and writer.done and not any(cells_path.glob(_PART_GLOB)):
            warnings.warn(
                f"{out} already has {len(writer.done)} field(s) but {cells_path} has no cells: "
                "the per-cell table will hold only the fields classified from now on",
                stacklevel=2,
            )
        todo = [r for r in rows if r["id"] not in writer.done]
        stats["skipped"] = len(rows) - len(todo)
        for f in failures:
            if f.id not in writer.done:
                errors.write(f.id, f.stage, f.reason)
        if todo:
            started_here = not ray.is_initialized()
            t0 = time.perf_counter()
            if started_here:
                kwargs: dict[str, Any] = {"address": address}
                if address is None:
                    kwargs["include_dashboard"] = False
                ray.init(**kwargs)
            stats["startup_s"] = time.perf_counter() - t0
            try:
                n_actors, cpus, gpus = plan_actors(ray.cluster_resources(), actors, cpus_per_actor, gpus_per_actor)
                stats["actors"] = n_actors
                context = ray.data.DataContext.get_current()
                saved_context = (context.enable_progress_bars, context.max_errored_blocks)
                # Ray Data's bars are replaced by one per field; a field whose worker died after the retries
                # fails alone (it becomes an error row below) instead of the whole job.
                context.enable_progress_bars = False
                context.max_errored_blocks = -1
                seen: set[str] = set()
                predictor_kwargs = {
                    "settings": settings.model_dump(mode="json"),
                    "model_dir": str(Path(model_dir).resolve()) if model_dir is not None else None,
                    "segmenter": segmenter,
                    "min_confidence": float(min_confidence),
                    "json_dir": json_dir,
                    "threads": max(1, int(cpus)),
                }
                pending_rows: list[SubmissionRow] = []
                pending_cells: list[Any] = []
                last_flush = time.perf_counter()
                first_ready: float | None = None
                last_end = 0.0
                t_job = time.time()

                def flush() -> None:
                    cell_writer.write(pending_cells)
                    writer.write_many(pending_rows)  # one fsync per group, not per row
                    pending_rows.clear()
                    pending_cells.clear()

                bar = tqdm(total=len(todo), desc="predict (ray)", unit="field", disable=not progress)
                t1 = time.perf_counter()
                try:
                    results = _iter_results(ray, todo, predictor, predictor_kwargs, n_actors, cpus, gpus, batch_size)
                    for rec in results:
                        seen.add(rec["id"])
                        ready = rec["actor_ready"]
                        first_ready = ready if first_ready is None else min(first_ready, ready)
                        last_end = max(last_end, rec["t_end"])
                        stats["field_seconds"].append(rec["t_end"] - rec["t_start"])
                        stats["per_actor"][rec["actor"]] = stats["per_actor"].get(rec["actor"], 0) + 1
                        if rec["ok"]:
                            pending_rows.append(
                                FormattedRow(
                                    rec["id"], rec["width"], rec["height"], prediction_string=rec["prediction_string"]
                                )
                            )
                            pending_cells.append(pa.ipc.open_stream(rec["cells"]).read_all())
                            stats["done"] += 1
                            stats["cells"] += rec["n_cells"]
                        else:
                            errors.write(rec["id"], rec["stage"], rec["reason"])
                            stats["errors"] += 1
                            bar.set_postfix(errors=stats["errors"])
                        bar.update(1)
                        if len(pending_rows) >= flush_every or time.perf_counter() - last_flush >= flush_seconds:
                            flush()
                            last_flush = time.perf_counter()
                    for row in todo:
                        if row["id"] not in seen:
                            reason = (
                                "its Ray worker died while classifying it (out of memory or a crash; see the Ray logs)"
                            )
                            errors.write(row["id"], "worker", reason)
                            bar.update(1)
                finally:
                    flush()
                    bar.close()
                    context.enable_progress_bars, context.max_errored_blocks = saved_context
                stats["run_s"] = time.perf_counter() - t1
                if first_ready is not None:
                    stats["ready_s"] = max(0.0, first_ready - t_job)
                    stats["busy_s"] = max(0.0, last_end - first_ready)
            finally:
                if started_here:
                    ray.shutdown()
        stats["errors"] = errors.count
    return stats


def run_ray(args: argparse.Namespace) -> int:
    """Run ``locus predict --engine ray`` from the parsed ``predict`` arguments."""
    if getattr(args, "format", None):
        print(
            "locus predict: --format is not supported with --engine ray, which writes the CSV, a per-cell "
            "Parquet table (OUT.cells.parquet) and an errors CSV",
            file=sys.stderr,
        )
        return 2
    try:
        stats = predict_ray(
            args.folder,
            args.out,
            address=args.address,
            actors=args.actors,
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor,
            model_dir=args.model,
            segmenter=args.segmenter,
            json_dir=args.json_dir,
            min_confidence=args.min_confidence,
            resume=not args.no_resume,
            limit=args.limit,
            progress=not args.quiet,
        )
    except RayUnavailableError as exc:
        print(f"locus predict: {exc}", file=sys.stderr)
        return 2
    print(
        f"{stats['done']} fields classified ({stats['cells']} cells) on {stats['actors']} Ray actor(s), "
        f"{stats['skipped']} already in {stats['out']}, {stats['errors']} failed (see {stats['errors_out']}), "
        f"{stats['fields']} found; cells in {stats['cells_out']}; "
        f"Ray start {stats['startup_s']:.1f} s, job {stats['run_s']:.1f} s",
        file=sys.stderr,
    )
    return 0
