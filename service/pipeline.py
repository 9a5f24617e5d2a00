"""The classification pipeline over one field: segment -> crop -> classify -> [attribute] -> encode.

Every stage is a plain function over numpy arrays; this module strings them
together, times them, and returns a :class:`FieldResult`. A pipeline is built by
:func:`locus.service.factory.build_pipeline` only; the HTTP service, ``locus predict``,
``locus overlay`` and the default model's evaluation all call :meth:`Pipeline.run`,
so what is measured is what is served.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from locus.service.cells import CellRecord
from locus.service.classes import CLASS_NAMES, NUM_CLASSES
from locus.service.config import (
    IG_BASELINE,
    IG_BUDGET,
    IG_MAX_CELLS,
    IG_MAX_STEPS,
    IG_STEPS,
    IG_TOLERANCE,
    MAX_MAP_BYTES,
)
from locus.service.crop import crop_cells
from locus.service.encoding import encode_label_masks, format_prediction_string, rle_to_kaggle
from locus.service.field_context import blend_field_context, check_weight
from locus.service.inference import Classifier
from locus.service.labelgrid import LabelGrid
from locus.service.problems import InputError, WorkLimitError
from locus.service.segmentation.base import Segmenter
from locus.service.tta import average_views, check_views, stack_views

__all__ = ["ClassifyOptions", "CellAttribution", "CellResult", "FieldResult", "Pipeline"]


@dataclass(frozen=True)
class ClassifyOptions:
    """What a caller asks of one field.

    Parameters
    ----------
    threshold : float, optional
        One decision threshold for every class; default: the manifest's per-class thresholds.
    include_masks : bool
        Encode each cell's mask as COCO RLE.
    include_scores : bool
        Return all 19 scores per cell.
    attributions : bool
        Compute integrated-gradient maps for each cell's predicted labels (or ``attribution_classes``).
    attribution_classes : tuple of int, optional
        Classes to explain in every cell instead of its predicted labels.
    ig_steps : int
        Integrated-gradient steps.
    ig_tolerance : float, optional
        Relative completeness error each map must meet: maps over it are refined to 2x, 4x ... the
        steps, up to ``ig_max_steps`` and within ``ig_budget``. None or 0: no refinement.
    ig_max_steps : int
        The most steps a map is refined to.
    ig_baseline : str
        ``"black"`` or ``"blur"``.
    ig_max_cells : int
        Attributions for at most this many cells (in cell id order).
    ig_budget : int, optional
        Most gradient-model evaluations (cells x classes x (steps + 1)) the attributions of one
        field may cost; more is refused with :class:`~locus.service.problems.WorkLimitError`
        before any is computed, and refinement (``ig_tolerance``) stays within it. None: no bound.
    max_map_bytes : int, optional
        Most bytes the encoded attribution maps of one field may take in the answer (each map is a
        16-bit PNG of the cell's box, base64: at most about 2.7 bytes per box pixel); more is refused
        before any map is computed. None: no bound.
    attribute_top : bool
        Explain only each cell's most probable class (its top label, or its highest score when no
        class passes its threshold) instead of all its labels; ignored with ``attribution_classes``.
    pixel_size : float, optional
        The image's pixel size in micrometres. When given (and different from the model manifest's
        ``pixel_size``), the field is resampled to the model's training scale for segmentation and
        cropping; masks, boxes, areas and maps still come back at the image's full resolution.
        None (default): no resampling.
    hpa_compat : bool, optional
        With the ``hpa`` segmenter: reproduce HPA's official post-processing step by step (True) or
        use Locus's default with the two defect fixes (False); None: the segmenter's setting
        (``LOCUS_HPA_COMPAT``). Other segmenters refuse it.
    tta : int, optional
        Test-time augmentation: average each cell's scores over this many flipped/transposed views of
        its crop (1, 2, 4 or 8; :mod:`locus.service.tta`). None: the pipeline's default (``LOCUS_TTA``).
        Attributions explain the crop as it is (one view).
    field_context : float, optional
        Weight in [0, 1] of the field's mean scores in each cell's scores (:mod:`locus.service.field_context`);
        labels are read from the blended scores. None: the pipeline's default (``LOCUS_FIELD_CONTEXT``); 0: each
        cell's own scores.
    """

    threshold: float | None = None
    include_masks: bool = True
    include_scores: bool = False
    attributions: bool = False
    attribution_classes: tuple[int, ...] | None = None
    ig_steps: int = IG_STEPS
    ig_tolerance: float | None = IG_TOLERANCE
    ig_max_steps: int = IG_MAX_STEPS
    ig_baseline: str = IG_BASELINE
    ig_max_cells: int = IG_MAX_CELLS
    attribute_top: bool = False
    ig_budget: int | None = IG_BUDGET
    max_map_bytes: int | None = MAX_MAP_BYTES
    pixel_size: float | None = None
    hpa_compat: bool | None = None
    tta: int | None = None
    field_context: float | None = None


@dataclass
class CellAttribution:
    """One integrated-gradient map of one class over one cell, placed on the cell's bounding box.

    Parameters
    ----------
    result : AttributionMap
        The map over the model's crop, with its completeness check.
    box : tuple of int
        (row0, col0, row1, col1) in the field, end-exclusive.
    map : numpy.ndarray
        (row1 - row0, col1 - col0) ``float32`` map over the box.
    """

    result: Any
    box: tuple[int, int, int, int]
    map: np.ndarray


@dataclass
class CellResult:
    """One cell's answer."""

    record: CellRecord
    probabilities: np.ndarray
    labels: list[int]
    mask: dict | None = None
    attributions: list[CellAttribution] = field(default_factory=list)
    nucleus_area: int | None = None
    """Pixels of the cell's nucleus (label ``record.id`` in the nuclei image); ``None`` when it has none."""
    nucleus_mask: dict | None = None
    """The nucleus as COCO RLE (with ``include_masks``), when the cell has one."""


@dataclass
class FieldResult:
    """One field's answer."""

    height: int
    width: int
    cells: list[CellResult]
    timings_ms: dict[str, float]
    cell_labels: np.ndarray
    nuclei_grid: LabelGrid | None = None
    """The nuclei labels as the segmenter left them (:attr:`nuclei_labels` builds the full-resolution image)."""

    @property
    def nuclei_labels(self) -> np.ndarray | None:
        """(H, W) nuclei label image, nucleus ``k`` inside cell ``k`` (pixels outside their cell are dropped)."""
        return None if self.nuclei_grid is None else self.nuclei_grid.full()

    def summary(self) -> list[dict]:
        """Per class: cells called and the highest confidence over all cells, sorted by cells called.

        Returns
        -------
        list of dict
            ``{"class_id", "name", "cells", "max_confidence"}`` for every class called in at least one cell.
        """
        out = []
        if not self.cells:
            return out
        probs = np.stack([c.probabilities for c in self.cells])
        for k in range(NUM_CLASSES):
            called = sum(1 for c in self.cells if k in c.labels)
            if called:
                out.append(
                    {"class_id": k, "name": CLASS_NAMES[k], "cells": called, "max_confidence": float(probs[:, k].max())}
                )
        out.sort(key=lambda d: (-d["cells"], -d["max_confidence"]))
        return out

    def prediction_string(self, min_confidence: float = 0.0) -> str:
        """The Kaggle ``PredictionString``: one ``class confidence mask`` triple per (cell, class).

        Every class with a confidence of at least ``min_confidence`` is listed for every
        cell (the competition metric ranks confidences, so listing all classes never
        lowers AP).

        Parameters
        ----------
        min_confidence : float
            Classes below this confidence are left out.

        Returns
        -------
        str
            Space-separated triples.
        """
        return format_prediction_string(self.predictions(min_confidence))

    def predictions(self, min_confidence: float = 0.0) -> list[tuple[int, float, str]]:
        """The (class, confidence, Kaggle mask string) triples of :meth:`prediction_string`."""
        masks = {c.record.id: c.mask for c in self.cells if c.mask is not None}
        missing = [c.record.id for c in self.cells if c.mask is None]
        if missing:
            masks.update(encode_label_masks(self.cell_labels, missing))
        out: list[tuple[int, float, str]] = []
        for cell in self.cells:
            mask_str = rle_to_kaggle(masks[cell.record.id])
            for k in range(NUM_CLASSES):
                p = float(cell.probabilities[k])
                if p >= min_confidence:
                    out.append((k, p, mask_str))
        return out


class Pipeline:
    """Segmentation, crops, classification and attributions for one field at a time.

    Build it with :func:`locus.service.factory.build_pipeline`.

    Parameters
    ----------
    classifier : Classifier
        The loaded model folder.
    segmenter : Segmenter
        The segmentation backend.
    segmenter_name : str
        The backend's name as reported in answers.
    batcher : callable, optional
        ``batcher(batch) -> probabilities`` with a ``close()``; the service's dynamic batcher, so
        cells of concurrent requests share model batches. Default: ``classifier.predict``.
    tta : int
        Default test-time augmentation views (1, 2, 4 or 8) when a request does not choose.
    field_context : float
        Default weight of the field's mean scores in each cell's scores when a request does not choose.
    """

    def __init__(
        self,
        classifier: Classifier,
        segmenter: Segmenter,
        segmenter_name: str | None = None,
        batcher: Callable[[np.ndarray], np.ndarray | None] | None = None,
        tta: int = 1,
        field_context: float = 0.0,
    ) -> None:
        self.classifier = classifier
        self.segmenter = segmenter
        self.segmenter_name = segmenter_name or getattr(segmenter, "name", "custom")
        self.batcher = batcher
        self.tta = check_views(tta)
        self.field_context = check_weight(field_context)
        self._predict = batcher or classifier.predict

    def check_options(self, options: ClassifyOptions) -> None:
        """Refuse options this pipeline cannot honour, before any work (the HTTP layer calls it up front too).

        Parameters
        ----------
        options : ClassifyOptions
            What a caller asks.

        Raises
        ------
        InputError
            422 ``invalid_parameter``: ``hpa_compat`` with a segmenter other than ``hpa``; ``field_context``
            outside [0, 1]; ``tta`` not 1, 2, 4 or 8.
        """
        if options.tta is not None:
            try:
                check_views(options.tta)
            except ValueError:
                raise InputError(
                    f"tta: {options.tta} views; choose 1 (none), 2, 4 or 8 (the flips and transposes of each crop)",
                    field="tta",
                    code="invalid_parameter",
                ) from None
        if options.field_context is not None:
            try:
                check_weight(options.field_context)
            except ValueError:
                raise InputError(
                    f"field_context: {options.field_context}; choose a weight from 0 (each cell's own scores) to 1 "
                    "(the field's mean scores for every cell)",
                    field="field_context",
                    code="invalid_parameter",
                ) from None
        if options.hpa_compat is not None and getattr(self.segmenter, "name", "") != "hpa":
            raise InputError(
                f"hpa_compat: only the hpa segmenter has HPA's post-processing; this service runs "
                f"{self.segmenter_name!r} (LOCUS_SEGMENTER): leave hpa_compat out",
                field="hpa_compat",
                code="invalid_parameter",
            )

    def views(self, options: ClassifyOptions) -> int:
        """Test-time augmentation views a request gets: its own ``tta``, else the pipeline's default."""
        return self.tta if options.tta is None else options.tta

    def thresholds(self, options: ClassifyOptions) -> np.ndarray:
        """The per-class decision thresholds a request's labels are called with.

        Parameters
        ----------
        options : ClassifyOptions
            The request's options.

        Returns
        -------
        numpy.ndarray
            (19,) ``float32``: the request's single ``threshold`` for every class, else the model's
            per-class thresholds for the views the request gets (:meth:`views`), tuned on the same
            mean of views.
        """
        if options.threshold is not None:
            return np.full(NUM_CLASSES, options.threshold, dtype=np.float32)
        return self.classifier.thresholds_for(self.views(options))

    def context_weight(self, options: ClassifyOptions) -> float:
        """Field-context weight a request gets: its own ``field_context``, else the pipeline's default."""
        return self.field_context if options.field_context is None else float(options.field_context)

    def close(self) -> None:
        """Stop the batcher, if any."""
        close = getattr(self.batcher, "close", None)
        if close is not None:
            close()

    def run(
        self, image: np.ndarray, options: ClassifyOptions | None = None, stop: Callable[[], bool] | None = None
    ) -> FieldResult:
        """Classify every cell of one field.

        Parameters
        ----------
        image : numpy.ndarray
            (H, W, 4) R, G, B, Y, ``uint8`` or ``uint16``.
        options : ClassifyOptions, optional
            What to compute.
        stop : callable, optional
            Checked between stages and between batches of integrated gradients; when it returns
            True the work stops with :class:`locus.service.attribution.Cancelled`.

        Returns
        -------
        FieldResult
            Cells with labels, probabilities, masks and attributions, plus stage timings.
        """
        options = options or ClassifyOptions()
        self.check_options(options)
        timings: dict[str, float] = {}
        check = _checker(stop)

        t = time.perf_counter()
        work = resample_to_model(image, options.pixel_size, self.classifier.manifest.pixel_size)
        cells_grid, nuclei_grid = self._segment(work, options)
        crop_labels = None
        if work is not image:
            # Resampled to the model's scale: crops are cut at that scale, masks come back at the image's.
            crop_labels = cells_grid.full()
            cells_grid = LabelGrid.identity(labels_to_shape(crop_labels, image.shape[:2]))
            nuclei_grid = LabelGrid.identity(labels_to_shape(nuclei_grid.full(), image.shape[:2]))
        # The contract: nucleus k lies inside cell k; keep only what honours it, so ids are shared (on the working-size
        # labels when both share their nearest-neighbour maps; skipped for backends that guarantee it).
        if not getattr(self.segmenter, "nuclei_in_cells", False):
            nuclei_grid = nuclei_grid.where_equal(cells_grid)
        cell_labels = cells_grid.full()
        timings["segment"] = (time.perf_counter() - t) * 1e3

        check()
        t = time.perf_counter()
        records = cells_grid.records()  # boxes, areas, centroids read from the working-size labels when there are any
        ids = [r.id for r in records]
        rule = self.classifier.crop_rule
        if crop_labels is None:
            _, batch = crop_cells(work, cell_labels, rule, ids, {r.id: r.bbox for r in records})
        else:
            _, batch = crop_cells(work, crop_labels, rule, ids)
        timings["crop"] = (time.perf_counter() - t) * 1e3

        check()
        t = time.perf_counter()
        views = self.views(options)
        if batch.shape[0]:
            probs = average_views(self._predict(stack_views(batch, views)), views)
            probs = blend_field_context(probs, self.context_weight(options))
        else:
            probs = np.zeros((0, NUM_CLASSES), dtype=np.float32)
        timings["classify"] = (time.perf_counter() - t) * 1e3

        thresholds = self.thresholds(options)
        cells = [
            CellResult(
                record=r, probabilities=probs[i], labels=[int(k) for k in np.flatnonzero(probs[i] >= thresholds)]
            )
            for i, r in enumerate(records)
        ]
        nucleus_areas = nuclei_grid.areas(minlength=max(ids, default=0) + 1)
        for cell in cells:
            area = int(nucleus_areas[cell.record.id])
            cell.nucleus_area = area if area > 0 else None

        if options.attributions and cells:
            t = time.perf_counter()
            self._attribute(batch, cells, options, stop)
            timings["attribute"] = (time.perf_counter() - t) * 1e3

        check()
        t = time.perf_counter()
        if options.include_masks and cells:
            rles = cells_grid.encode(ids)
            with_nucleus = [c.record.id for c in cells if c.nucleus_area is not None]
            nuclei_rles = nuclei_grid.encode(with_nucleus) if with_nucleus else {}
            for cell in cells:
                cell.mask = rles[cell.record.id]
                cell.nucleus_mask = nuclei_rles.get(cell.record.id)
        timings["encode"] = (time.perf_counter() - t) * 1e3
        h, w = cell_labels.shape
        return FieldResult(
            height=h, width=w, cells=cells, timings_ms=timings, cell_labels=cell_labels, nuclei_grid=nuclei_grid
        )

    def _attribute(
        self, batch: np.ndarray, cells: list[CellResult], options: ClassifyOptions, stop: Callable[[], bool] | None
    ) -> None:
        from locus.service.attribution import gradient_evaluations, integrated_gradients, map_to_box

        grad = self.classifier.manifest.grad
        if grad is None:
            raise ValueError("this model folder has no gradient model (grad.onnx)")
        chosen = list(range(min(len(cells), options.ig_max_cells)))
        targets = [self._targets(cells[i], options) for i in chosen]
        cost = sum(gradient_evaluations(1, len(tg), options.ig_steps) for tg in targets)
        if options.ig_budget is not None and cost > options.ig_budget:
            pairs = sum(len(tg) for tg in targets)
            raise WorkLimitError(
                f"attributions: {pairs} maps ({len(chosen)} cells x classes) at {options.ig_steps} steps cost {cost} "
                f"gradient evaluations, over the budget of {options.ig_budget} per field (LOCUS_IG_BUDGET); ask for "
                "fewer classes (attribution_classes), fewer steps (ig_steps) or a smaller field",
                field="attributions",
                code="attribution_budget",
            )
        size = sum(len(tg) * _map_bytes(cells[i].record.bbox) for i, tg in zip(chosen, targets, strict=True))
        if options.max_map_bytes is not None and size > options.max_map_bytes:
            raise WorkLimitError(
                f"attributions: the maps would take about {size / 1e6:.0f} MB of the answer, over the limit of "
                f"{options.max_map_bytes / 1e6:.0f} MB (LOCUS_MAX_MAP_BYTES); ask for fewer classes "
                "(attribution_classes) or send a smaller field",
                field="attributions",
                code="answer_too_large",
            )
        maps = integrated_gradients(
            self.classifier.grad_session(),
            grad.batch,
            batch[chosen],
            targets,
            steps=options.ig_steps,
            baseline=options.ig_baseline,
            max_steps=max(options.ig_steps, options.ig_max_steps),
            tolerance=options.ig_tolerance or None,
            max_evaluations=options.ig_budget,
            stop=stop,
        )
        rule = self.classifier.crop_rule
        for i, cell_maps in zip(chosen, maps, strict=True):
            cell = cells[i]
            box = tuple(int(v) for v in cell.record.bbox)
            for amap in cell_maps:
                cell.attributions.append(CellAttribution(amap, box, map_to_box(amap.attribution, box, rule)))

    def _segment(self, work: np.ndarray, options: ClassifyOptions) -> tuple[LabelGrid, LabelGrid]:
        """Cell and nucleus labels of the field, as grids (kept at the backend's working size when it has one)."""
        kwargs = {} if options.hpa_compat is None else {"hpa_compat": options.hpa_compat}
        grids = getattr(self.segmenter, "segment_grids", None)
        if grids is not None:
            return grids(work, **kwargs)
        cells, nuclei = self.segmenter.segment(work, **kwargs)
        return LabelGrid.identity(cells), LabelGrid.identity(nuclei)

    @staticmethod
    def _targets(cell: CellResult, options: ClassifyOptions) -> list[int]:
        if options.attribution_classes is not None:
            return list(options.attribution_classes)
        if options.attribute_top:
            probs = cell.probabilities
            return [max(cell.labels, key=lambda k: probs[k]) if cell.labels else int(np.argmax(probs))]
        return list(cell.labels)


def resample_to_model(image: np.ndarray, pixel_size: float | None, model_pixel_size: float | None) -> np.ndarray:
    """The field at the model's training scale (the input itself when no resampling is asked or needed).

    Parameters
    ----------
    image : numpy.ndarray
        (H, W, C) field.
    pixel_size : float, optional
        The image's pixel size in micrometres; None: no resampling.
    model_pixel_size : float, optional
        The pixel size the model was trained at (manifest ``pixel_size``).

    Returns
    -------
    numpy.ndarray
        (round(H * f), round(W * f), C) with ``f = pixel_size / model_pixel_size``, area interpolation
        when shrinking and linear when enlarging; same dtype.

    Raises
    ------
    InputError
        A pixel size is given but the model folder records none, or the resampled field would be
        under 16 or over 16384 pixels on a side.
    """
    if pixel_size is None:
        return image
    if model_pixel_size is None:
        raise InputError(
            "pixel_size: this model folder records no training pixel size (manifest pixel_size), so the image "
            "cannot be brought to its scale; leave pixel_size out",
            field="pixel_size",
        )
    f = float(pixel_size) / float(model_pixel_size)
    h, w = image.shape[:2]
    nh, nw = int(round(h * f)), int(round(w * f))
    if (nh, nw) == (h, w):
        return image
    if min(nh, nw) < 16 or max(nh, nw) > 16384:
        raise InputError(
            f"pixel_size: at {pixel_size} um per pixel this {w}x{h} image would be {nw}x{nh} at the model's "
            f"{model_pixel_size} um per pixel, outside 16-16384 px",
            field="pixel_size",
        )
    import cv2

    interp = cv2.INTER_AREA if f < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(image, (nw, nh), interpolation=interp).reshape(nh, nw, *image.shape[2:])


def labels_to_shape(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A label image brought to ``shape`` (nearest neighbour; the input itself when it already fits).

    Parameters
    ----------
    labels : numpy.ndarray
        (h, w) integer label image.
    shape : tuple of int
        (H, W) wanted.

    Returns
    -------
    numpy.ndarray
        (H, W) ``int32`` label image.
    """
    if labels.shape[:2] == tuple(shape):
        return labels
    import cv2

    out = cv2.resize(labels.astype(np.int32), (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_NEAREST)
    return out.astype(np.int32, copy=False)


def _map_bytes(box: tuple[int, int, int, int]) -> int:
    """Upper bound of one encoded map's size: 16-bit PNG of the box (2 bytes a pixel + row filters), base64."""
    r0, c0, r1, c1 = box
    return int(((r1 - r0) * (2 * (c1 - c0) + 1) + 1024) * 4 / 3)


def _checker(stop: Callable[[], bool] | None) -> Callable[[], None]:
    """A function that raises :class:`~locus.service.attribution.Cancelled` once ``stop()`` is True."""

    def check() -> None:
        if stop is not None and stop():
            from locus.service.attribution import Cancelled

            raise Cancelled("the pipeline stopped: the request ran past its time limit")

    return check
