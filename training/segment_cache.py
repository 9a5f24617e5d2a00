"""``locus segment DIR``: segment every field once, store the label images next to it.

Training on tens of thousands of real fields should not run the segmenter again for
every new crop size or config. ``locus segment`` runs the backend the service would
run (built by :func:`locus.service.factory.build_segmenter` from the same ``LOCUS_*``
settings) over each field of a folder and writes, in a ``segments/`` folder beside its
channel files:

* ``segments/{ID}_cells.png`` and ``segments/{ID}_nuclei.png``: 16-bit label images
  (0 background, nucleus ``k`` inside cell ``k``), the segmenter's output unchanged;
* ``segments/segments.json``: which backend (and HPA network files) made them, and the
  size and modification time of the channel files each field was segmented from.

They live in a subfolder, not beside the channels, because a dataset's own
``{ID}_cells.png`` there is read as ground truth (:func:`locus.service.readers.load_truth`).

``locus train`` (:func:`locus.training.dataset._crop_field`) uses a field's stored cells
when ``segments.json`` says they came from the config's segmenter and the channel
files have not changed since; otherwise it segments as before. Runs resume: fields
already stored and current are skipped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = [
    "SEGMENTS_DIR",
    "SEGMENTS_FILE",
    "label_paths",
    "segmenter_key",
    "stored_cells",
    "segment_folder",
    "configure_parser",
    "run",
]

SEGMENTS_DIR = "segments"
"""Subfolder (beside the channel files) holding the label images and :data:`SEGMENTS_FILE`."""
SEGMENTS_FILE = "segments.json"
"""In :data:`SEGMENTS_DIR`: ``{"version", "segmenter", "fields": {ID: {"cells", "nuclei", "shape", "sources"}}}``."""
VERSION = 1
_MODEL_OPTIONS = ("nuclei_model", "cell_model")


def label_paths(folder: str | os.PathLike, field_id: str) -> tuple[Path, Path]:
    """Where a field's stored label images live.

    Parameters
    ----------
    folder : path-like
        The folder holding the field's channel files.
    field_id : str
        Field ID.

    Returns
    -------
    cells, nuclei : Path
        ``{folder}/segments/{ID}_cells.png`` and ``{folder}/segments/{ID}_nuclei.png``.
    """
    folder = Path(folder) / SEGMENTS_DIR
    return folder / f"{field_id}_cells.png", folder / f"{field_id}_nuclei.png"


@lru_cache(maxsize=8)
def segmenter_key(name: str) -> dict[str, str]:
    """What identifies a segmenter's output: its name, its options and, for ``hpa``, its network files.

    Parameters
    ----------
    name : str
        Backend name.

    Returns
    -------
    dict
        ``{"name": name}`` plus ``nuclei_model``/``cell_model`` paths where the backend has them, ``hpa_compat``
        for ``hpa``, and for ``classical`` its whole configuration (``config``, JSON), so labels stored before an
        option or a default changed (e.g. ``LOCUS_CELL_PER_NUCLEUS``, the nucleus merge) are not reused. Read from
        the ``LOCUS_*`` settings, as the service reads them.
    """
    from locus.service.config import PipelineSettings

    options = PipelineSettings().segmenter_options(name)
    key = {"name": name}
    for opt in _MODEL_OPTIONS:
        if options.get(opt) is not None:
            key[opt] = str(Path(options[opt]).resolve())
    if name == "hpa":
        key["hpa_compat"] = str(bool(options.get("hpa_compat")))
    elif name == "classical":
        from locus.service.segmentation.classical import ClassicalSegmenter

        key["config"] = json.dumps(ClassicalSegmenter(**options).config.to_dict(), sort_keys=True)
    return key


def _sources(paths: Mapping[str, str]) -> dict[str, list[int]]:
    out = {}
    for color, p in sorted(paths.items()):
        st = os.stat(p)
        out[color] = [int(st.st_size), int(st.st_mtime_ns)]
    return out


_META_CACHE: dict[str, tuple[int, dict]] = {}
_META_LOCK = threading.Lock()


def _read_meta(folder: Path) -> dict | None:
    """``segments.json`` of a folder (cached per process while its mtime is unchanged)."""
    path = folder / SEGMENTS_DIR / SEGMENTS_FILE
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    key = str(path.resolve())
    with _META_LOCK:
        hit = _META_CACHE.get(key)
        if hit is not None and hit[0] == mtime:
            return hit[1]
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != VERSION or not isinstance(meta.get("fields"), dict):
        return None
    with _META_LOCK:
        _META_CACHE[key] = (mtime, meta)
    return meta


def _read_label(path: Path) -> np.ndarray | None:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim != 2 or img.dtype not in (np.uint8, np.uint16):
        return None
    return img


def stored_cells(paths: Mapping[str, str], field_id: str, segmenter: str) -> np.ndarray | None:
    """A field's stored cell label image, when it is current for this segmenter.

    Parameters
    ----------
    paths : mapping
        The field's channel files (``{"red": ..., ...}``); the labels are looked for beside them.
    field_id : str
        Field ID.
    segmenter : str
        The backend the caller would run.

    Returns
    -------
    numpy.ndarray or None
        (H, W) ``int32`` cell labels, or None when there are none, they came from another
        backend (or other HPA network files), or a channel file changed since.
    """
    folder = Path(next(iter(paths.values()))).parent
    meta = _read_meta(folder)
    if meta is None or meta.get("segmenter") != segmenter_key(segmenter):
        return None
    entry = meta["fields"].get(field_id)
    if not entry:
        return None
    try:
        if entry.get("sources") != _sources(paths):
            return None
    except OSError:
        return None
    cells = _read_label(label_paths(folder, field_id)[0])
    if cells is None or list(cells.shape) != list(entry.get("shape", [])):
        return None
    return cells.astype(np.int32)


def _encode_labels(labels: np.ndarray) -> bytes:
    top = int(labels.max()) if labels.size else 0
    if top > np.iinfo(np.uint16).max:
        raise ValueError(f"{top} labels do not fit a 16-bit PNG")
    ok, buf = cv2.imencode(".png", labels.astype(np.uint16), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.locus-tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass(frozen=True)
class _Job:
    id: str
    paths: dict[str, str]
    segmenter: str
    max_pixels: int | None


_SEGMENTERS: dict[str, Any] = {}


def _segment_one(job: _Job) -> tuple[str, dict | None, str | None, float]:
    """Worker: segment one field and write its label images. Returns (id, entry, error, seconds)."""
    from locus.service.config import PipelineSettings
    from locus.service.factory import build_segmenter
    from locus.service.imaging import load_field

    t0 = time.perf_counter()
    try:
        sources = _sources(job.paths)
        image = load_field(job.paths, max_pixels=job.max_pixels)
        if job.segmenter not in _SEGMENTERS:
            seg, actual = build_segmenter(PipelineSettings(), job.segmenter)
            if actual != job.segmenter:
                raise RuntimeError(f"segmenter {job.segmenter!r} did not start (fell back to {actual!r})")
            _SEGMENTERS[job.segmenter] = seg
        cells, nuclei = _SEGMENTERS[job.segmenter].segment(image)
        folder = Path(job.paths["red"]).parent
        cells_path, nuclei_path = label_paths(folder, job.id)
        cells_path.parent.mkdir(exist_ok=True)
        _write_atomic(cells_path, _encode_labels(cells))
        _write_atomic(nuclei_path, _encode_labels(nuclei))
        entry = {
            "cells": int(len(np.unique(cells[cells > 0]))),
            "nuclei": int(len(np.unique(nuclei[nuclei > 0]))),
            "shape": [int(cells.shape[0]), int(cells.shape[1])],
            "sources": sources,
        }
        return job.id, entry, None, time.perf_counter() - t0
    except Exception as exc:
        return job.id, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0


def _write_meta(folder: Path, key: dict, fields: dict) -> None:
    meta = {"version": VERSION, "segmenter": key, "fields": dict(sorted(fields.items()))}
    (folder / SEGMENTS_DIR).mkdir(exist_ok=True)
    _write_atomic(folder / SEGMENTS_DIR / SEGMENTS_FILE, (json.dumps(meta, indent=1) + "\n").encode("utf-8"))


def segment_folder(
    root: str | os.PathLike,
    *,
    segmenter: str = "classical",
    workers: int = 1,
    overwrite: bool = False,
    limit: int | None = None,
    progress: bool = True,
    flush_every: int = 100,
) -> dict[str, Any]:
    """Segment every field of a folder and store the label images beside the channels.

    Parameters
    ----------
    root : path-like
        A folder of fields (see :func:`locus.service.readers.find_fields`; incomplete fields are skipped).
    segmenter : str
        Backend name (``classical``, ``hpa``, ``hpacellseg``), built with the ``LOCUS_*`` settings.
    workers : int
        Processes (each builds its own segmenter; use 1 for a GPU backend).
    overwrite : bool
        Segment again even where current labels are stored.
    limit : int, optional
        Segment at most this many fields.
    progress : bool
        Show a progress bar.
    flush_every : int
        Rewrite ``segments.json`` after this many fields (an interrupted run keeps its work).

    Returns
    -------
    dict
        ``fields`` found, ``segmented``, ``skipped``, ``failed`` (``{ID: reason}``), ``cells``
        (stored now), ``seconds``, ``seconds_per_field`` (mean worker time per segmented field).
    """
    from tqdm import tqdm

    from locus.service.config import PipelineSettings
    from locus.service.readers import find_fields

    refs = find_fields(root, on_missing="warn")
    key = segmenter_key(segmenter)
    max_pixels = PipelineSettings().max_image_pixels
    by_folder: dict[Path, dict[str, dict]] = {}
    changed: set[Path] = set()
    jobs: list[_Job] = []
    skipped = 0
    for ref in refs:
        folder = Path(ref.paths["red"]).parent
        if folder not in by_folder:
            meta = _read_meta(folder)
            same = meta is not None and meta.get("segmenter") == key
            by_folder[folder] = dict(meta["fields"]) if same else {}
            if meta is not None and not same:
                changed.add(folder)  # another backend's labels: forget them
        entry = by_folder[folder].get(ref.id)
        current = (
            entry is not None
            and entry.get("sources") == _sources(ref.paths)
            and all(p.is_file() for p in label_paths(folder, ref.id))
        )
        if current and not overwrite:
            skipped += 1
        elif limit is None or len(jobs) < limit:
            jobs.append(_Job(ref.id, dict(ref.paths), segmenter, max_pixels))
    for job in jobs:  # their stored labels are stale or about to be replaced
        folder = Path(job.paths["red"]).parent
        if by_folder[folder].pop(job.id, None) is not None:
            changed.add(folder)
    for folder in changed:
        _write_meta(folder, key, by_folder[folder])

    failed: dict[str, str] = {}
    cells = 0
    work_seconds = 0.0
    done = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="segment", unit="field", disable=not progress)
    workers = max(1, min(int(workers), len(jobs) or 1))

    def collect(job: _Job, result: tuple[str, dict | None, str | None, float]) -> None:
        nonlocal cells, work_seconds, done
        ident, entry, error, seconds = result
        folder = Path(job.paths["red"]).parent
        if error is not None:
            failed[ident] = error
        else:
            by_folder[folder][ident] = entry
            changed.add(folder)
            cells += entry["cells"]
            work_seconds += seconds
            done += 1
            if done % flush_every == 0:
                _write_meta(folder, key, by_folder[folder])
        bar.update()

    try:
        if workers == 1:
            for job in jobs:
                collect(job, _segment_one(job))
        else:
            with mp.get_context("spawn").Pool(workers) as pool:
                for job, result in zip(jobs, pool.imap(_segment_one, jobs, chunksize=1), strict=True):
                    collect(job, result)
    finally:
        bar.close()
        for folder in changed:
            _write_meta(folder, key, by_folder[folder])
    return {
        "fields": len(refs),
        "segmented": done,
        "skipped": skipped,
        "failed": failed,
        "cells": cells,
        "seconds": round(time.perf_counter() - t0, 3),
        "seconds_per_field": round(work_seconds / done, 4) if done else None,
    }


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``segment`` options."""
    parser.add_argument("folder", nargs="+", help="folder(s) of fields ({ID}_{red,green,blue,yellow}.png ...)")
    parser.add_argument(
        "--segmenter", default="classical", help="classical, hpa or hpacellseg (LOCUS_* settings apply)"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1; 1 for a GPU backend)")
    parser.add_argument("--overwrite", action="store_true", help="segment again where labels are stored")
    parser.add_argument("--limit", type=int, default=None, help="segment at most this many fields per folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``locus segment``."""
    if args.workers < 1:
        sys.stderr.write("locus segment: --workers must be at least 1\n")
        return 2
    status = 0
    for folder in args.folder:
        try:
            stats = segment_folder(
                folder,
                segmenter=args.segmenter,
                workers=args.workers,
                overwrite=args.overwrite,
                limit=args.limit,
                progress=not args.quiet,
            )
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"locus segment: {folder}: {exc}\n")
            return 2
        per = stats["seconds_per_field"]
        print(
            f"{folder}: {stats['segmented']} fields segmented ({stats['cells']} cells), {stats['skipped']} already "
            f"stored, {len(stats['failed'])} failed, of {stats['fields']}; {stats['seconds']:.1f} s"
            + (f" ({per:.2f} s per field per worker)" if per else "")
        )
        for ident, reason in sorted(stats["failed"].items())[:20]:
            print(f"  {ident}: {reason}")
        if stats["failed"]:
            status = 1
    return status
