"""Answers in the formats the field's tools read: per-cell tables, AnnData, GeoJSON and label images.

Every format is built from one field's answer, :class:`FieldAnswer`: the
:class:`~locus.service.schemas.ClassifyResponse` that the JSON API returns (built by
:func:`locus.service.response.classify_response`, with all 19 scores) plus the
:class:`~locus.service.pipeline.FieldResult` it came from, whose label images are
the pixels the RLE masks encode. No format computes anything the JSON answer does
not say: same cells, same ids, same labels, same scores.

Formats
-------
``csv``, ``parquet``
    One row per cell: ``image_id, cell_id, row0, col0, row1, col1, area, centroid_row,
    centroid_col, touches_border, nucleus_area, labels, label_ids`` and one column of
    scores per class, named by the class (``Nucleoplasm`` ... ``Negative``).
    ``labels`` and ``label_ids`` are ``|``-joined, most confident first (as in the JSON);
    ``nucleus_area`` is empty where the cell has no nucleus. Parquet carries the model,
    segmenter and thresholds as JSON in its schema metadata (key ``locus``).
``h5ad``
    AnnData: one observation per cell; ``X`` the 19 scores (``var_names`` the class
    names, ``var["threshold"]`` the decision thresholds); the other table columns in
    ``obs``; ``layers["called"]`` the labels as 0/1; ``obsm["spatial"]`` the centroids
    as (x = column, y = row) pixels; ``uns["locus"]`` the model's name and version, the
    thresholds, the segmenter and the image sizes.
``geojson``
    A FeatureCollection in the form QuPath imports (*File > Import objects*): one
    ``"objectType": "cell"`` Feature per cell whose ``geometry`` is the cell outline and
    whose ``nucleusGeometry`` is its nucleus, ``classification`` the labels (a QuPath
    derived class ``"A: B"`` for several, in class order), ``measurements`` areas and
    scores, and the full JSON cell under ``properties.locus``. Coordinates are pixels
    with x = column, y = row and (0, 0) the top-left corner of the top-left pixel; the
    outline runs along pixel edges with corners cut (marching squares at 0.5), so its
    area is within a fraction of a percent of the pixel count.
``labels``
    One OME-TIFF, axes ``CYX``: channel 0 ``cells``, channel 1 ``nuclei``; cell ``k`` and
    its nucleus both carry id ``k`` (the JSON cell id). ``uint16`` when every id fits,
    else ``uint32``; zlib-compressed. Fiji/Bio-Formats, napari, CellProfiler and
    ``tifffile.imread`` (array of shape (2, H, W)) read it.

``csv`` and ``geojson`` need nothing beyond Locus's own dependencies; ``parquet``
(pyarrow), ``h5ad`` (anndata) and ``labels`` (tifffile) come with the ``formats`` extra.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import json
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from locus.service.classes import CLASS_NAMES, NUM_CLASSES
from locus.service.pipeline import ClassifyOptions, FieldResult
from locus.service.response import classify_response
from locus.service.schemas import ClassifyResponse

__all__ = [
    "FORMATS",
    "TABLE_FORMATS",
    "MEDIA_TYPES",
    "EXTENSIONS",
    "REQUIREMENTS",
    "FormatUnavailableError",
    "FormatOptionError",
    "FieldAnswer",
    "FileAnswer",
    "FormatWriter",
    "TABLE_COLUMNS",
    "check_format",
    "parse_formats",
    "field_answer",
    "table_rows",
    "write_csv",
    "write_parquet",
    "to_anndata",
    "write_h5ad",
    "to_geojson",
    "mask_geometry",
    "label_stack",
    "write_labels",
    "render_field",
    "answer_field",
]

FORMATS: tuple[str, ...] = ("csv", "parquet", "h5ad", "geojson", "labels")
"""Every file format, in the order ``--format`` lists them."""

TABLE_FORMATS: tuple[str, ...] = ("csv", "parquet", "h5ad")
"""Formats holding one row per cell (``locus predict`` writes one file for all fields)."""

MEDIA_TYPES: dict[str, str] = {
    "csv": "text/csv",
    "parquet": "application/vnd.apache.parquet",
    "h5ad": "application/x-hdf5",
    "geojson": "application/geo+json",
    "labels": "image/tiff",
}
"""The media type each format is served with (and asked for with ``Accept``)."""

EXTENSIONS: dict[str, str] = {
    "csv": ".csv",
    "parquet": ".parquet",
    "h5ad": ".h5ad",
    "geojson": ".geojson",
    "labels": ".ome.tif",
}

REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "csv": (),
    "parquet": ("pyarrow",),
    "h5ad": ("anndata",),
    "geojson": (),
    "labels": ("tifffile",),
}
"""Python packages (import names) each format needs; all are in the ``formats`` extra."""

BASE_COLUMNS: tuple[str, ...] = (
    "image_id",
    "cell_id",
    "row0",
    "col0",
    "row1",
    "col1",
    "area",
    "centroid_row",
    "centroid_col",
    "touches_border",
    "nucleus_area",
    "labels",
    "label_ids",
)
TABLE_COLUMNS: tuple[str, ...] = BASE_COLUMNS + tuple(CLASS_NAMES)
"""The per-cell table's columns: cell description, labels, then one score column per class."""

LABEL_SEPARATOR = "|"

# A colour per class for QuPath (tab20-like, distinct on a dark background).
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44),
    (152, 223, 138), (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213),
    (140, 86, 75), (196, 156, 148), (227, 119, 194), (247, 182, 210), (188, 189, 34),
    (219, 219, 141), (23, 190, 207), (158, 218, 229), (127, 127, 127),
)  # fmt: skip
_UUID_NAMESPACE = uuid.UUID("6b1d8a52-5f0e-4c43-9d43-4c6f63757300")


class FormatUnavailableError(ImportError):
    """A format whose Python package is not installed on this host.

    Parameters
    ----------
    fmt : str
        The format asked for.
    package : str
        The missing package (import name).
    """

    def __init__(self, fmt: str, package: str) -> None:
        self.format = fmt
        self.package = package
        super().__init__(
            f"the {fmt} format needs the Python package '{package}', which is not installed here; "
            "install it with: pip install 'locus[formats]'"
        )


class FormatOptionError(ValueError):
    """A bad format option (an unknown name, an output file that clashes)."""


def check_format(fmt: str) -> None:
    """Check that a format is known and its libraries import.

    Parameters
    ----------
    fmt : str
        One of :data:`FORMATS`.

    Raises
    ------
    FormatOptionError
        Unknown format (the message lists the known ones).
    FormatUnavailableError
        A package the format needs is missing.
    """
    if fmt not in REQUIREMENTS:
        raise FormatOptionError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    for package in REQUIREMENTS[fmt]:
        try:
            importlib.import_module(package)
        except ImportError as exc:
            raise FormatUnavailableError(fmt, package) from exc


def parse_formats(text: str | Iterable[str]) -> tuple[str, ...]:
    """Parse ``csv,parquet,...`` into known formats (order kept, duplicates dropped).

    Parameters
    ----------
    text : str or iterable of str
        Comma-separated names, or names.

    Returns
    -------
    tuple of str
        The formats.

    Raises
    ------
    FormatOptionError
        An empty list or an unknown name (named in the message).
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    names = [p.strip().lower() for p in parts if p.strip()]
    bad = [n for n in names if n not in FORMATS]
    if bad:
        raise FormatOptionError(
            f"unknown format(s) {', '.join(repr(b) for b in bad)}; choose from {', '.join(FORMATS)}"
        )
    if not names:
        raise FormatOptionError(f"no format given; choose from {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(names))


@dataclass
class FieldAnswer:
    """One field's answer, everything a format is built from.

    Parameters
    ----------
    image_id : str
        The field's ID (Kaggle ``ID``, the file stem).
    body : ClassifyResponse
        The JSON answer, with all 19 scores per cell.
    result : FieldResult
        The pipeline's result (cell and nuclei label images).
    thresholds : list of float
        The 19 decision thresholds the labels were called with.
    """

    image_id: str
    body: ClassifyResponse
    result: FieldResult
    thresholds: list[float]

    def meta(self) -> dict[str, Any]:
        """Model, segmenter, thresholds and image size (JSON-serialisable)."""
        b = self.body
        return {
            "model": {"name": b.model.name, "version": b.model.version},
            "segmenter": b.segmenter,
            "threshold": b.threshold,
            "thresholds": [float(t) for t in self.thresholds],
            "class_names": list(CLASS_NAMES),
            "images": {self.image_id: [b.image.height, b.image.width]},
        }


@dataclass(frozen=True)
class FileAnswer:
    """A file-format answer of the HTTP API.

    Parameters
    ----------
    content : bytes
        The file.
    media_type : str
        Its media type.
    filename : str
        A file name for ``Content-Disposition``.
    """

    content: bytes
    media_type: str
    filename: str


def field_answer(
    result: FieldResult,
    options: ClassifyOptions,
    pipeline: Any,
    *,
    image_id: str,
    request_id: str = "",
    body: ClassifyResponse | None = None,
) -> FieldAnswer:
    """Build a field's :class:`FieldAnswer` from the pipeline's result.

    Parameters
    ----------
    result : FieldResult
        The pipeline's result.
    options : ClassifyOptions
        What was asked; the answer always carries all scores.
    pipeline : Pipeline
        The pipeline that answered (model, thresholds, segmenter).
    image_id : str
        The field's ID.
    request_id : str
        Reported in the JSON body.
    body : ClassifyResponse, optional
        The JSON answer when the caller already built it with ``include_scores``.

    Returns
    -------
    FieldAnswer
        The answer every format is written from.
    """
    if body is None or any(c.scores is None for c in body.cells):
        body = classify_response(
            result, dataclasses.replace(options, include_scores=True), pipeline, request_id=request_id
        )
    thresholds = [float(t) for t in pipeline.thresholds(options)]
    return FieldAnswer(image_id=image_id, body=body, result=result, thresholds=thresholds)


# ---------------------------------------------------------------------------------------------------------------------
# Per-cell tables


def table_rows(answer: FieldAnswer) -> list[dict[str, Any]]:
    """One row per cell of a field, in :data:`TABLE_COLUMNS` order.

    Parameters
    ----------
    answer : FieldAnswer
        The field.

    Returns
    -------
    list of dict
        Column -> value; ``nucleus_area`` is ``None`` where the cell has no nucleus.
    """
    rows = []
    for cell in answer.body.cells:
        scores = cell.scores or [float("nan")] * NUM_CLASSES
        row: dict[str, Any] = {
            "image_id": answer.image_id,
            "cell_id": cell.id,
            "row0": cell.bbox.row0,
            "col0": cell.bbox.col0,
            "row1": cell.bbox.row1,
            "col1": cell.bbox.col1,
            "area": cell.area,
            "centroid_row": cell.centroid[0],
            "centroid_col": cell.centroid[1],
            "touches_border": cell.touches_border,
            "nucleus_area": cell.nucleus.area if cell.nucleus is not None else None,
            "labels": LABEL_SEPARATOR.join(lab.name for lab in cell.labels),
            "label_ids": LABEL_SEPARATOR.join(str(lab.class_id) for lab in cell.labels),
        }
        row.update({name: float(s) for name, s in zip(CLASS_NAMES, scores, strict=True)})
        rows.append(row)
    return rows


def _dest(dest: str | Path | io.IOBase | None) -> tuple[Any, bool]:
    """A writable target: the path or buffer given, or a new BytesIO (returned as bytes by the caller)."""
    if dest is None:
        return io.BytesIO(), True
    return dest, False


def write_csv(rows: Sequence[dict[str, Any]], dest: str | Path | None = None) -> bytes | None:
    """Write the per-cell table as CSV (UTF-8, header row, ``.`` decimals).

    Parameters
    ----------
    rows : sequence of dict
        From :func:`table_rows`.
    dest : str or Path, optional
        File to write; default: return the bytes.

    Returns
    -------
    bytes or None
        The CSV when ``dest`` is None.
    """
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    data = text.getvalue().encode("utf-8")
    if dest is None:
        return data
    Path(dest).write_bytes(data)
    return None


def _arrow_table(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Any:
    import pyarrow as pa

    types = {
        "image_id": pa.string(),
        "cell_id": pa.int64(),
        "row0": pa.int64(),
        "col0": pa.int64(),
        "row1": pa.int64(),
        "col1": pa.int64(),
        "area": pa.int64(),
        "centroid_row": pa.float64(),
        "centroid_col": pa.float64(),
        "touches_border": pa.bool_(),
        "nucleus_area": pa.int64(),
        "labels": pa.string(),
        "label_ids": pa.string(),
        **{name: pa.float32() for name in CLASS_NAMES},
    }
    schema = pa.schema([(c, types[c]) for c in TABLE_COLUMNS], metadata={"locus": json.dumps(meta)})
    columns = {c: [r[c] for r in rows] for c in TABLE_COLUMNS}
    return pa.Table.from_pydict(columns, schema=schema)


def write_parquet(rows: Sequence[dict[str, Any]], meta: dict[str, Any], dest: str | Path | None = None) -> bytes | None:
    """Write the per-cell table as Parquet (scores float32, ``nucleus_area`` nullable int64).

    Parameters
    ----------
    rows : sequence of dict
        From :func:`table_rows`.
    meta : dict
        Model, segmenter, thresholds (:meth:`FieldAnswer.meta`), stored as JSON in the schema metadata ``locus``.
    dest : str or Path, optional
        File to write; default: return the bytes.

    Returns
    -------
    bytes or None
        The Parquet file when ``dest`` is None.
    """
    import pyarrow.parquet as pq

    target, to_bytes = _dest(dest)
    pq.write_table(_arrow_table(rows, meta), target if to_bytes else str(target))
    return target.getvalue() if to_bytes else None


def to_anndata(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Any:
    """The per-cell table as AnnData: scores in ``X``, cells in ``obs``, centroids in ``obsm["spatial"]``.

    Parameters
    ----------
    rows : sequence of dict
        From :func:`table_rows` (one or many fields).
    meta : dict
        Model, segmenter, thresholds and image sizes (:meth:`FieldAnswer.meta`).

    Returns
    -------
    anndata.AnnData
        ``n_obs`` cells x 19 classes.
    """
    import anndata as ad
    import pandas as pd

    n = len(rows)
    x = np.array([[r[name] for name in CLASS_NAMES] for r in rows], dtype=np.float32).reshape(n, NUM_CLASSES)
    obs = pd.DataFrame({c: [r[c] for r in rows] for c in BASE_COLUMNS})
    obs["image_id"] = obs["image_id"].astype(str)
    obs["nucleus_area"] = pd.array([r["nucleus_area"] for r in rows], dtype="Int64")
    for c in ("cell_id", "row0", "col0", "row1", "col1", "area"):
        obs[c] = obs[c].astype(np.int64)
    obs["touches_border"] = obs["touches_border"].astype(bool)
    for c in ("labels", "label_ids"):
        obs[c] = obs[c].astype(str)
    obs.index = pd.Index([f"{r['image_id']}/{r['cell_id']}" for r in rows], dtype=str)
    thresholds = np.asarray(meta["thresholds"], dtype=np.float32)
    var = pd.DataFrame({"class_id": np.arange(NUM_CLASSES), "threshold": thresholds}, index=list(CLASS_NAMES))
    called = np.zeros((n, NUM_CLASSES), dtype=np.uint8)
    for i, r in enumerate(rows):
        for k in filter(None, str(r["label_ids"]).split(LABEL_SEPARATOR)):
            called[i, int(k)] = 1
    spatial = np.array([[r["centroid_col"], r["centroid_row"]] for r in rows], dtype=np.float64).reshape(n, 2)
    uns_meta = {
        "model": dict(meta["model"]),
        "segmenter": str(meta["segmenter"]),
        "threshold": str(meta["threshold"]),
        "thresholds": thresholds,
        "class_names": np.array(CLASS_NAMES, dtype=object),
        "images": {k: np.asarray(v, dtype=np.int64) for k, v in meta["images"].items()},
        "spatial": "obsm['spatial'] holds cell centroids as (x = column, y = row) in pixels",
    }
    return ad.AnnData(
        X=x, obs=obs, var=var, layers={"called": called}, obsm={"spatial": spatial}, uns={"locus": uns_meta}
    )


def write_h5ad(rows: Sequence[dict[str, Any]], meta: dict[str, Any], dest: str | Path | None = None) -> bytes | None:
    """Write the per-cell table as an AnnData ``.h5ad`` (see :func:`to_anndata`).

    Parameters
    ----------
    rows : sequence of dict
        From :func:`table_rows`.
    meta : dict
        See :func:`to_anndata`.
    dest : str or Path, optional
        File to write; default: return the bytes.

    Returns
    -------
    bytes or None
        The file when ``dest`` is None.
    """
    adata = to_anndata(rows, meta)
    if dest is not None:
        adata.write_h5ad(str(dest))
        return None
    # anndata writes to paths only: go through a temporary file.
    with tempfile.TemporaryDirectory(prefix="locus-h5ad-") as tmp:
        path = Path(tmp) / "cells.h5ad"
        adata.write_h5ad(str(path))
        return path.read_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# GeoJSON


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Remove vertices that lie on the straight line through their neighbours (the ring stays closed)."""
    pts = ring[:-1]
    if len(pts) < 4:
        return ring
    prev = np.roll(pts, 1, axis=0)
    nxt = np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
    keep = np.abs(cross) > 1e-9
    if keep.sum() < 3:
        return ring
    pts = pts[keep]
    return np.vstack([pts, pts[:1]])


def _inside(point: np.ndarray, ring: np.ndarray) -> bool:
    """Even-odd rule: is ``point`` (x, y) inside the closed ``ring``."""
    x, y = point
    x0, y0, x1, y1 = ring[:-1, 0], ring[:-1, 1], ring[1:, 0], ring[1:, 1]
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return bool(np.count_nonzero(crosses & (x < xs)) % 2)


def mask_geometry(labels: np.ndarray, label: int, box: tuple[int, int, int, int] | None = None) -> dict | None:
    """The outline of one label as a GeoJSON Polygon or MultiPolygon (x = column, y = row, pixel corners).

    Marching squares at 0.5 over the label's binary mask traces the outline along
    pixel edges, cutting each corner by a triangle of 1/8 pixel. Exteriors run
    counter-clockwise and holes clockwise in (x, y) (RFC 7946's right-hand rule).

    Parameters
    ----------
    labels : numpy.ndarray
        (H, W) integer label image.
    label : int
        The label to outline.
    box : tuple of int, optional
        Its bounding box (row0, col0, row1, col1), end-exclusive; found when not given.

    Returns
    -------
    dict or None
        The geometry, or None when the label has no pixels.
    """
    from skimage.measure import find_contours

    if box is None:
        rows, cols = np.nonzero(labels == label)
        if rows.size == 0:
            return None
        box = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
    r0, c0, r1, c1 = box
    mask = np.pad((labels[r0:r1, c0:c1] == label).astype(np.float32), 1)
    if not mask.any():
        return None
    shells: list[np.ndarray] = []
    holes: list[np.ndarray] = []
    for contour in find_contours(mask, 0.5):
        # (row, col) in the padded crop -> (x, y) in field pixel-corner coordinates.
        ring = np.stack([contour[:, 1] + c0 - 0.5, contour[:, 0] + r0 - 0.5], axis=1)
        if not np.array_equal(ring[0], ring[-1]):
            ring = np.vstack([ring, ring[:1]])
        ring = _drop_collinear(ring)
        area = _signed_area(ring)
        if area > 0:
            shells.append(ring)
        elif area < 0:
            holes.append(ring)
    if not shells:
        return None
    polygons: list[list[np.ndarray]] = [[s] for s in shells]
    for hole in holes:
        candidates = [i for i, s in enumerate(shells) if _inside(hole[0] + (hole[1] - hole[0]) * 0.5, s)]
        if candidates:
            smallest = min(candidates, key=lambda i: _signed_area(shells[i]))
            polygons[smallest].append(hole)

    def coords(rings: list[np.ndarray]) -> list:
        return [np.round(r, 3).tolist() for r in rings]

    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": coords(polygons[0])}
    return {"type": "MultiPolygon", "coordinates": [coords(p) for p in polygons]}


def to_geojson(answer: FieldAnswer) -> dict[str, Any]:
    """The field as a GeoJSON FeatureCollection of cells (with nuclei), as QuPath imports it.

    Parameters
    ----------
    answer : FieldAnswer
        The field.

    Returns
    -------
    dict
        ``{"type": "FeatureCollection", "features": [...], "locus": {...}}``; see the module docstring.
    """
    result = answer.result
    features = []
    for cell in answer.body.cells:
        box = (cell.bbox.row0, cell.bbox.col0, cell.bbox.row1, cell.bbox.col1)
        geometry = mask_geometry(result.cell_labels, cell.id, box)
        if geometry is None:  # pragma: no cover - every answered cell has pixels
            continue
        scores = cell.scores or []
        measurements: dict[str, float] = {"Area px": float(cell.area)}
        if cell.nucleus is not None:
            measurements["Nucleus area px"] = float(cell.nucleus.area)
        measurements.update({f"Score: {name}": float(s) for name, s in zip(CLASS_NAMES, scores, strict=False)})
        props: dict[str, Any] = {
            "objectType": "cell",
            "name": f"{answer.image_id} cell {cell.id}",
            "measurements": measurements,
            "locus": cell.model_dump(
                exclude={"mask": True, "attributions": True, "nucleus": {"mask"}}, exclude_none=True
            )
            | {"image_id": answer.image_id},
        }
        if cell.labels:
            ids = sorted(lab.class_id for lab in cell.labels)
            top = cell.labels[0].class_id
            props["classification"] = {
                "name": ": ".join(CLASS_NAMES[k] for k in ids),
                "color": list(_PALETTE[top]),
            }
        feature: dict[str, Any] = {
            "type": "Feature",
            "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{answer.image_id}/{cell.id}")),
            "geometry": geometry,
            "properties": props,
        }
        if cell.nucleus is not None and result.nuclei_labels is not None:
            nucleus = mask_geometry(result.nuclei_labels, cell.id, box)
            if nucleus is not None:
                feature["nucleusGeometry"] = nucleus
        features.append(feature)
    return {"type": "FeatureCollection", "features": features, "locus": answer.meta()}


# ---------------------------------------------------------------------------------------------------------------------
# Label images


def label_stack(answer: FieldAnswer) -> np.ndarray:
    """Cells and nuclei as one (2, H, W) label array, cell ``k`` and its nucleus both ``k``.

    Parameters
    ----------
    answer : FieldAnswer
        The field.

    Returns
    -------
    numpy.ndarray
        ``uint16`` when every id fits, else ``uint32``.
    """
    cells = np.asarray(answer.result.cell_labels)
    nuclei = answer.result.nuclei_labels
    nuclei = np.zeros_like(cells) if nuclei is None else np.asarray(nuclei)
    top = int(max(cells.max(initial=0), nuclei.max(initial=0)))
    dtype = np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32
    return np.stack([cells, nuclei]).astype(dtype)


def write_labels(answer: FieldAnswer, dest: str | Path | None = None) -> bytes | None:
    """Write the cell and nuclei label images as one OME-TIFF (axes CYX, channels ``cells``, ``nuclei``).

    Parameters
    ----------
    answer : FieldAnswer
        The field.
    dest : str or Path, optional
        File to write; default: return the bytes.

    Returns
    -------
    bytes or None
        The file when ``dest`` is None.
    """
    import tifffile

    stack = label_stack(answer)
    target, to_bytes = _dest(dest)
    tifffile.imwrite(
        target if to_bytes else str(target),
        stack,
        ome=True,
        photometric="minisblack",
        compression="zlib",
        metadata={"axes": "CYX", "Name": answer.image_id, "Channel": {"Name": ["cells", "nuclei"]}},
    )
    return target.getvalue() if to_bytes else None


# ---------------------------------------------------------------------------------------------------------------------
# One field, one format: the HTTP API's file answers


def render_field(fmt: str, answer: FieldAnswer) -> FileAnswer:
    """One field in one file format.

    Parameters
    ----------
    fmt : str
        One of :data:`FORMATS`.
    answer : FieldAnswer
        The field.

    Returns
    -------
    FileAnswer
        The bytes, media type and a file name.

    Raises
    ------
    ValueError
        Unknown format.
    FormatUnavailableError
        Its library is missing.
    """
    check_format(fmt)
    if fmt in TABLE_FORMATS:
        rows = table_rows(answer)
        meta = answer.meta()
        if fmt == "csv":
            data = write_csv(rows)
        elif fmt == "parquet":
            data = write_parquet(rows, meta)
        else:
            data = write_h5ad(rows, meta)
        name = f"{answer.image_id}.cells{EXTENSIONS[fmt]}"
    elif fmt == "geojson":
        data = json.dumps(to_geojson(answer), separators=(",", ":")).encode("utf-8")
        name = f"{answer.image_id}{EXTENSIONS[fmt]}"
    else:
        data = write_labels(answer)
        name = f"{answer.image_id}.labels{EXTENSIONS[fmt]}"
    assert data is not None
    return FileAnswer(content=data, media_type=MEDIA_TYPES[fmt], filename=name)


def answer_field(
    output: str, result: FieldResult, options: ClassifyOptions, pipeline: Any, *, request_id: str, image_id: str
) -> FileAnswer:
    """The HTTP API's file answer for one field (``output=csv|parquet|h5ad|geojson|labels``).

    Parameters
    ----------
    output : str
        The format.
    result : FieldResult
        The pipeline's result.
    options : ClassifyOptions
        What was asked (the threshold; scores are always included).
    pipeline : Pipeline
        The pipeline that answered.
    request_id, image_id : str
        Provenance and the field's ID (rows, file name).

    Returns
    -------
    FileAnswer
        The file.
    """
    answer = field_answer(result, options, pipeline, image_id=image_id, request_id=request_id)
    return render_field(output, answer)


# ---------------------------------------------------------------------------------------------------------------------
# Many fields: locus predict --format


class FormatWriter:
    """Write the asked formats for a folder of fields (``locus predict --format``).

    Per field, at once: ``geojson/{ID}.geojson`` and ``labels/{ID}.ome.tif``. The tables
    ``cells.csv``, ``cells.parquet`` and ``cells.h5ad`` hold every field; each field's
    rows are appended to the journal ``cells.jsonl`` as soon as it is done, and the
    tables are rebuilt from the journal on :meth:`close` (also after an interruption), so
    a resumed run keeps the rows of the fields classified before.

    Parameters
    ----------
    out_dir : str or Path
        Folder for the files (created).
    formats : sequence of str
        Formats to write (:data:`FORMATS`).
    resume : bool
        Keep the journal's rows of earlier runs (else start it afresh).

    Raises
    ------
    FormatUnavailableError
        A format's library is missing (checked before any field is classified).
    """

    JOURNAL = "cells.jsonl"

    def __init__(self, out_dir: str | Path, formats: Sequence[str], *, resume: bool = True) -> None:
        self.formats = parse_formats(formats)
        for fmt in self.formats:
            check_format(fmt)
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("geojson", "labels"):
            if sub in self.formats:
                (self.dir / sub).mkdir(exist_ok=True)
        self.tables = [f for f in self.formats if f in TABLE_FORMATS]
        self.journal = self.dir / self.JOURNAL
        if self.tables and not resume and self.journal.exists():
            self.journal.unlink()
        self.written = 0

    def __enter__(self) -> FormatWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def paths(self) -> dict[str, Path]:
        """The table files this writer produces (format -> path)."""
        return {f: self.dir / f"cells{EXTENSIONS[f]}" for f in self.tables}

    def add(self, answer: FieldAnswer) -> None:
        """Write one field's per-field files and journal its table rows.

        Parameters
        ----------
        answer : FieldAnswer
            The field.
        """
        if "geojson" in self.formats:
            data = json.dumps(to_geojson(answer), separators=(",", ":"))
            (self.dir / "geojson" / f"{answer.image_id}.geojson").write_text(data, encoding="utf-8")
        if "labels" in self.formats:
            write_labels(answer, self.dir / "labels" / f"{answer.image_id}.ome.tif")
        if self.tables:
            line = json.dumps({"meta": answer.meta(), "rows": table_rows(answer)}, separators=(",", ":"))
            with self.journal.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        self.written += 1

    def _journal(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        fields: dict[str, tuple[dict, list]] = {}
        if self.journal.exists():
            for line in self.journal.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interruption
                    continue
                (image_id,) = entry["meta"]["images"]
                fields[image_id] = (entry["meta"], entry["rows"])  # the last run of a field wins
        if not fields:
            return [], None
        metas = [m for m, _ in fields.values()]
        meta = dict(metas[-1])
        meta["images"] = {k: v for m in metas for k, v in m["images"].items()}
        rows = [r for _, rs in fields.values() for r in rs]
        return rows, meta

    def close(self) -> dict[str, Path]:
        """Build the tables from the journal.

        Returns
        -------
        dict
            Format -> written table file.
        """
        if not self.tables:
            return {}
        rows, meta = self._journal()
        if meta is None:
            meta = {"model": {}, "segmenter": "", "threshold": "", "thresholds": [0.0] * NUM_CLASSES, "images": {}}
        out = self.paths()
        for fmt, path in out.items():
            if fmt == "csv":
                write_csv(rows, path)
            elif fmt == "parquet":
                write_parquet(rows, meta, path)
            else:
                write_h5ad(rows, meta, path)
        return out
