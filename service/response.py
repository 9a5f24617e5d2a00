"""The one place where an answer is built: a :class:`~locus.service.pipeline.FieldResult` -> response models.

The HTTP API and ``locus predict --json-dir`` both call :func:`classify_response`;
``output=kaggle`` and the submission writer both use :func:`kaggle_row`.
"""

from __future__ import annotations

from typing import Any

from locus.service.classes import CHANNELS, CLASS_NAMES
from locus.service.pipeline import CellAttribution, CellResult, ClassifyOptions, FieldResult
from locus.service.schemas import (
    Attribution,
    AttributionMapData,
    BBox,
    CellOut,
    ClassifyResponse,
    ClassSummary,
    ImageInfo,
    KaggleResponse,
    LabelOut,
    MaskRLE,
    ModelRef,
    NucleusOut,
)

__all__ = ["classify_response", "kaggle_row", "bbox"]


def bbox(box: tuple[int, int, int, int] | Any) -> BBox:
    """The answer's bounding box from ``(row0, col0, row1, col1)``.

    Parameters
    ----------
    box : tuple of int
        End-exclusive rows and columns.

    Returns
    -------
    BBox
        The same box, named.
    """
    r0, c0, r1, c1 = (int(v) for v in box)
    return BBox(row0=r0, col0=c0, row1=r1, col1=c1)


def _attribution(att: CellAttribution) -> Attribution:
    from locus.service.attribution import encode_map

    a = att.result
    return Attribution(
        class_id=int(a.class_id),
        name=CLASS_NAMES[a.class_id],
        bbox=bbox(att.box),
        map=AttributionMapData(**encode_map(att.map)),
        channel_totals={c: float(v) for c, v in zip(CHANNELS, a.channel_totals, strict=True)},
        completeness_error=float(a.completeness_rel),
        completeness_abs=float(a.completeness_abs),
        score=float(a.f_input),
        baseline_score=float(a.f_baseline),
        steps=int(a.steps),
        baseline=a.baseline,
    )


def _cell(c: CellResult, options: ClassifyOptions) -> CellOut:
    r = c.record
    labels = sorted(c.labels, key=lambda k: -float(c.probabilities[k]))
    return CellOut(
        id=r.id,
        bbox=bbox(r.bbox),
        area=int(r.area),
        centroid=[round(float(r.centroid[0]), 2), round(float(r.centroid[1]), 2)],
        touches_border=bool(r.touches_border),
        labels=[
            LabelOut(class_id=k, name=CLASS_NAMES[k], confidence=round(float(c.probabilities[k]), 6)) for k in labels
        ],
        scores=[round(float(p), 6) for p in c.probabilities] if options.include_scores else None,
        mask=MaskRLE(**c.mask) if options.include_masks and c.mask is not None else None,
        nucleus=None
        if c.nucleus_area is None
        else NucleusOut(
            area=int(c.nucleus_area),
            mask=MaskRLE(**c.nucleus_mask) if options.include_masks and c.nucleus_mask is not None else None,
        ),
        attributions=[_attribution(a) for a in c.attributions] if options.attributions else None,
    )


def classify_response(
    result: FieldResult, options: ClassifyOptions, pipeline: Any, *, request_id: str = ""
) -> ClassifyResponse:
    """The answer for one field.

    Parameters
    ----------
    result : FieldResult
        The pipeline's answer.
    options : ClassifyOptions
        What was asked (masks, scores, attributions).
    pipeline : Pipeline
        The pipeline that answered (model, segmenter and provider are reported).
    request_id : str
        Reported with the answer.

    Returns
    -------
    ClassifyResponse
        The answer; ``model_dump(exclude_none=True)`` is the JSON body.
    """
    m = pipeline.classifier.manifest
    return ClassifyResponse(
        request_id=request_id,
        image=ImageInfo(height=result.height, width=result.width),
        model=ModelRef(name=m.name, version=m.version),
        segmenter=pipeline.segmenter_name,
        provider=pipeline.classifier.provider.primary,
        threshold="manifest" if options.threshold is None else options.threshold,
        tta=pipeline.views(options),
        field_context=pipeline.context_weight(options),
        cell_count=len(result.cells),
        cells=[_cell(c, options) for c in result.cells],
        summary=[ClassSummary(**s) for s in result.summary()],
        timings_ms={k: round(v, 2) for k, v in result.timings_ms.items()},
    )


def kaggle_row(result: FieldResult, image_id: str, min_confidence: float = 0.0) -> KaggleResponse:
    """The field as one competition submission row.

    Parameters
    ----------
    result : FieldResult
        The pipeline's answer.
    image_id : str
        The row's ``ID``.
    min_confidence : float
        (cell, class) pairs below it are left out.

    Returns
    -------
    KaggleResponse
        ``ID, ImageWidth, ImageHeight, PredictionString``.
    """
    return KaggleResponse(
        ID=image_id,
        ImageWidth=result.width,
        ImageHeight=result.height,
        PredictionString=result.prediction_string(min_confidence),
    )
