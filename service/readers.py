"""Readers for the dataset layouts Locus users have.

Layouts (see docs/CONTRACTS.md)
-------------------------------
* Kaggle 2021: ``{ID}_{red,green,blue,yellow}.png`` (8- or 16-bit grayscale)
  with ``train.csv`` (``ID,Label``, ``|``-separated class ids). The Kaggle
  download puts the images in ``train/`` next to ``train.csv``; both the
  folder itself and its parent work as ``root``.
* HPA website: ``{ID}_{red,green,blue,yellow}.jpg`` tinted colour JPEGs
  (decoded by :func:`locus.service.imaging.decode_channel`), usually without labels.
* TIFF: ``.tif`` / ``.tiff``.
* Locus ground truth (HPA-sim writes it): ``truth/{ID}_cells.png``,
  ``truth/{ID}_nuclei.png`` (uint16 label images) and ``truth/cells.csv``
  (``ID,cell_id,Label``).
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from locus.service import imaging
from locus.service.classes import CHANNELS, parse_label

__all__ = [
    "EXTENSIONS",
    "IncompleteFieldError",
    "FieldRef",
    "Truth",
    "read_labels_csv",
    "find_fields",
    "load_field",
    "truth_dir",
    "truth_ids",
    "read_cell_labels",
    "load_truth",
]

EXTENSIONS: tuple[str, ...] = ("png", "tif", "tiff", "jpg", "jpeg")
"""Accepted channel file extensions, in order of preference when one channel exists in several formats."""

_CHANNEL_RE = re.compile(r"^(?P<id>.+)_(?P<ch>red|green|blue|yellow)\.(?P<ext>png|tiff?|jpe?g)$", re.IGNORECASE)


class IncompleteFieldError(ValueError):
    """Fields of view that lack one or more channel files.

    Attributes
    ----------
    missing : dict of str to list of str
        Field ID -> the channels it lacks.
    """

    def __init__(self, message: str, missing: dict[str, list[str]]):
        super().__init__(message)
        self.missing = missing


@dataclass
class FieldRef:
    """One field of view on disk.

    Attributes
    ----------
    id : str
        Field ID (the file name before ``_red``/``_green``/...).
    paths : dict of str to str
        Channel name -> file path, for all four channels.
    labels : list of int or None
        Image-level labels from ``train.csv``, or None when there is none.
    """

    id: str
    paths: dict[str, str]
    labels: list[int] | None = None


@dataclass
class Truth:
    """Per-cell ground truth of one field.

    Attributes
    ----------
    id : str
        Field ID.
    cells : numpy.ndarray
        (H, W) ``uint16`` cell label image, 0 = background.
    nuclei : numpy.ndarray or None
        (H, W) ``uint16`` nucleus label image (nucleus k inside cell k), None if the file is absent.
    cell_labels : dict of int to list of int
        Cell id -> class ids.
    """

    id: str
    cells: np.ndarray
    nuclei: np.ndarray | None
    cell_labels: dict[int, list[int]]


def read_labels_csv(path: str | os.PathLike) -> dict[str, list[int]]:
    """Read a Kaggle ``train.csv`` (``ID,Label``).

    Parameters
    ----------
    path : path-like
        The CSV file.

    Returns
    -------
    dict of str to list of int
        Field ID -> sorted class ids.

    Raises
    ------
    ValueError
        Missing ``ID``/``Label`` columns, an empty ID, a duplicate ID or a bad
        class id (with the line number).
    """
    out: dict[str, list[int]] = {}
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "ID" not in fields or "Label" not in fields:
            raise ValueError(f"{path}: needs columns ID and Label; found {fields}")
        reader.fieldnames = fields
        for row in reader:
            line = reader.line_num
            ident = (row.get("ID") or "").strip()
            if not ident:
                raise ValueError(f"{path}:{line}: empty ID")
            if ident in out:
                raise ValueError(f"{path}:{line}: duplicate ID {ident!r}")
            try:
                out[ident] = parse_label(row.get("Label") or "")
            except ValueError as exc:
                raise ValueError(f"{path}:{line} ({ident}): {exc}") from exc
    return out


def _scan(folder: Path) -> dict[str, dict[str, list[Path]]]:
    found: dict[str, dict[str, list[Path]]] = {}
    if not folder.is_dir():
        return found
    for entry in folder.iterdir():
        m = _CHANNEL_RE.match(entry.name)
        if m and entry.is_file():
            found.setdefault(m["id"], {}).setdefault(m["ch"].lower(), []).append(entry)
    return found


def _preference(path: Path) -> int:
    ext = path.suffix.lower().lstrip(".")
    return EXTENSIONS.index(ext) if ext in EXTENSIONS else len(EXTENSIONS)


def find_fields(
    root: str | os.PathLike,
    *,
    labels_csv: str | os.PathLike | None = None,
    on_missing: str = "raise",
) -> list[FieldRef]:
    """Find the fields of view in a folder.

    Parameters
    ----------
    root : path-like
        Folder with ``{ID}_{red,green,blue,yellow}.{png,jpg,jpeg,tif,tiff}``
        files, or a folder whose ``train/`` subfolder holds them (Kaggle download).
    labels_csv : path-like, optional
        ``train.csv`` to attach labels from; default: ``train.csv`` in
        ``root`` or next to the image folder, if present.
    on_missing : {"raise", "warn"}
        What to do with fields lacking a channel: raise
        :class:`IncompleteFieldError` naming every such ID and its missing
        channels, or warn with the same list and skip them.

    Returns
    -------
    list of FieldRef
        Sorted by ID. When one channel exists in several formats the first
        of :data:`EXTENSIONS` is used (with a warning).

    Raises
    ------
    FileNotFoundError
        ``root`` is not a folder.
    IncompleteFieldError
        Fields with missing channels and ``on_missing="raise"``.
    """
    if on_missing not in ("raise", "warn"):
        raise ValueError(f"on_missing must be 'raise' or 'warn', not {on_missing!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    folder = root
    found = _scan(root)
    if not found and (root / "train").is_dir():
        folder = root / "train"
        found = _scan(folder)
    if labels_csv is None:
        for cand in (root / "train.csv", folder / "train.csv", folder.parent / "train.csv"):
            if cand.is_file():
                labels_csv = cand
                break
    labels = read_labels_csv(labels_csv) if labels_csv is not None else None

    missing: dict[str, list[str]] = {}
    refs: list[FieldRef] = []
    for ident in sorted(found):
        chans = found[ident]
        lacking = [c for c in CHANNELS if c not in chans]
        if lacking:
            missing[ident] = lacking
            continue
        paths: dict[str, str] = {}
        for c in CHANNELS:
            options = sorted(chans[c], key=_preference)
            if len(options) > 1:
                warnings.warn(
                    f"{ident}: {c} channel in several files {[p.name for p in options]}; using {options[0].name}",
                    stacklevel=2,
                )
            paths[c] = str(options[0])
        field_labels = None
        if labels is not None:
            field_labels = labels.get(ident)
        refs.append(FieldRef(ident, paths, field_labels))
    if missing:
        desc = "; ".join(f"{i} (missing {', '.join(ch)})" for i, ch in sorted(missing.items()))
        message = f"{folder}: {len(missing)} field(s) lack channel files: {desc}"
        if on_missing == "raise":
            raise IncompleteFieldError(message + " (pass on_missing='warn' to skip them)", missing)
        warnings.warn(message + "; skipped", stacklevel=2)
    if labels is not None:
        unlabelled = [r.id for r in refs if r.labels is None]
        if unlabelled:
            warnings.warn(f"{len(unlabelled)} field(s) have no row in {labels_csv}: {unlabelled[:10]}", stacklevel=2)
        absent = sorted(set(labels) - set(found))
        if absent:
            warnings.warn(
                f"{len(absent)} ID(s) of {labels_csv} have no image files in {folder}: {absent[:10]}", stacklevel=2
            )
    return refs


def load_field(ref: FieldRef, max_pixels: int | None = None) -> np.ndarray:
    """Read one field's four channels (via :func:`locus.service.imaging.load_field`).

    Parameters
    ----------
    ref : FieldRef
        The field.
    max_pixels : int, optional
        Largest accepted height x width.

    Returns
    -------
    numpy.ndarray
        (H, W, 4) in R, G, B, Y order, ``uint8`` or ``uint16``.
    """
    return imaging.load_field(ref.paths, max_pixels=max_pixels)


def truth_dir(root: str | os.PathLike) -> Path:
    """Locate the ``truth/`` folder of a dataset.

    Parameters
    ----------
    root : path-like
        The dataset folder (containing ``truth/``) or the truth folder itself.

    Returns
    -------
    pathlib.Path
    """
    root = Path(root)
    if (root / "truth").is_dir():
        return root / "truth"
    return root


def truth_ids(root: str | os.PathLike) -> list[str]:
    """IDs with a ``truth/{ID}_cells.png``, sorted.

    Parameters
    ----------
    root : path-like
        Dataset folder or its ``truth/`` folder.

    Returns
    -------
    list of str
    """
    folder = truth_dir(root)
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len("_cells.png")] for p in folder.iterdir() if p.name.endswith("_cells.png"))


def read_cell_labels(root: str | os.PathLike) -> dict[str, dict[int, list[int]]]:
    """Read ``truth/cells.csv`` (``ID,cell_id,Label``).

    Parameters
    ----------
    root : path-like
        Dataset folder, its ``truth/`` folder, or the CSV file itself.

    Returns
    -------
    dict of str to dict of int to list of int
        Field ID -> cell id -> sorted class ids.

    Raises
    ------
    FileNotFoundError
        No ``cells.csv``.
    ValueError
        Missing columns, a bad cell id or class id, or a duplicate (ID, cell_id).
    """
    path = Path(root)
    if path.is_dir():
        path = truth_dir(path) / "cells.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-cell labels file (truth/cells.csv with ID,cell_id,Label)")
    out: dict[str, dict[int, list[int]]] = {}
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if not {"ID", "cell_id", "Label"} <= set(fields):
            raise ValueError(f"{path}: needs columns ID, cell_id and Label; found {fields}")
        reader.fieldnames = fields
        for row in reader:
            line = reader.line_num
            ident = (row["ID"] or "").strip()
            try:
                cell = int(row["cell_id"])
                if cell <= 0:
                    raise ValueError(f"cell_id must be >= 1, got {cell}")
                labels = parse_label(row["Label"] or "")
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line} ({ident}): {exc}") from exc
            cells = out.setdefault(ident, {})
            if cell in cells:
                raise ValueError(f"{path}:{line}: duplicate cell {ident} {cell}")
            cells[cell] = labels
    return out


def _read_label_image(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path}: cannot be read as an image")
    if img.ndim != 2:
        raise ValueError(f"{path}: a label image must be single-channel; got shape {img.shape}")
    if img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: label images must be 8- or 16-bit; got {img.dtype}")
    return img.astype(np.uint16, copy=False)


def load_truth(root: str | os.PathLike, id: str, *, cell_labels: dict[int, list[int]] | None = None) -> Truth:
    """Load one field's ground truth.

    Parameters
    ----------
    root : path-like
        Dataset folder or its ``truth/`` folder.
    id : str
        Field ID.
    cell_labels : dict of int to list of int, optional
        The field's per-cell labels if already read; default: read ``cells.csv``.

    Returns
    -------
    Truth

    Raises
    ------
    FileNotFoundError
        No ``truth/{id}_cells.png``.
    ValueError
        Cells and nuclei differ in size, or an unreadable label image.
    """
    folder = truth_dir(root)
    cells_path = folder / f"{id}_cells.png"
    if not cells_path.is_file():
        raise FileNotFoundError(f"{cells_path}: no cell label image for {id}")
    cells = _read_label_image(cells_path)
    nuclei_path = folder / f"{id}_nuclei.png"
    nuclei = _read_label_image(nuclei_path) if nuclei_path.is_file() else None
    if nuclei is not None and nuclei.shape != cells.shape:
        raise ValueError(f"{id}: nuclei {nuclei.shape} and cells {cells.shape} label images differ in size")
    if cell_labels is None:
        csv_path = folder / "cells.csv"
        cell_labels = read_cell_labels(csv_path).get(id, {}) if csv_path.is_file() else {}
    return Truth(id=id, cells=cells, nuclei=nuclei, cell_labels=dict(cell_labels))
