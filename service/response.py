"""Turn a :class:`~service.pipeline.FieldResult` into the JSON answer (HTTP API and ``locus predict --json``)."""

from __future__ import annotations

from typing import Any

from service.classes import CLASS_NAMES
from service.pipeline import ClassifyOptions, FieldResult

__all__ = ["field_json"]


def field_json(
    result: FieldResult,
    options: ClassifyOptions,
    *,
    model_name: str,
    model_version: str,
    segmenter: str,
    provider: str,
    request_id: str = "",
) -> dict[str, Any]:
    """The ``ClassifyResponse`` body for one field.

    Parameters
    ----------
    result : FieldResult
        The pipeline's answer.
    options : ClassifyOptions
        What was asked (masks, scores, attributions).
    model_name, model_version, segmenter, provider, request_id : str
        Provenance reported with the answer.

    Returns
    -------
    dict
        JSON-serialisable, matching :class:`service.api.schemas.ClassifyResponse`.
    """
    cells = []
    for c in result.cells:
        r = c.record
        labels = sorted(c.labels, key=lambda k: -float(c.probabilities[k]))
        cell: dict[str, Any] = {
            "id": r.id,
            "bbox": {"row0": r.bbox[0], "col0": r.bbox[1], "row1": r.bbox[2], "col1": r.bbox[3]},
            "area": int(r.area),
            "centroid": [round(float(r.centroid[0]), 2), round(float(r.centroid[1]), 2)],
            "touches_border": bool(r.touches_border),
            "labels": [
                {"class_id": k, "name": CLASS_NAMES[k], "confidence": round(float(c.probabilities[k]), 6)}
                for k in labels
            ],
            "scores": [round(float(p), 6) for p in c.probabilities] if options.include_scores else None,
            "mask": c.mask if options.include_masks else None,
            "attributions": c.attributions if options.attributions else None,
        }
        cells.append(cell)
    return {
        "request_id": request_id,
        "image": {"height": result.height, "width": result.width},
        "model": {"name": model_name, "version": model_version},
        "segmenter": segmenter,
        "provider": provider,
        "threshold": "manifest" if options.threshold is None else options.threshold,
        "cell_count": len(cells),
        "cells": cells,
        "summary": result.summary(),
        "timings_ms": {k: round(v, 2) for k, v in result.timings_ms.items()},
    }
