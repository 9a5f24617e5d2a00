"""The answer's schemas (HTTP API and ``locus predict --json-dir``), with examples for ``/docs``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AttributionMapData",
    "Attribution",
    "BBox",
    "CellOut",
    "ClassSummary",
    "ClassifyResponse",
    "ErrorBody",
    "ErrorResponse",
    "HealthResponse",
    "KaggleResponse",
    "LabelOut",
    "MaskRLE",
    "NucleusOut",
    "ImageInfo",
    "ModelRef",
    "ModelInfo",
    "ReadyResponse",
]


class LabelOut(BaseModel):
    """A class called for a cell."""

    class_id: int = Field(ge=0, le=18, examples=[6])
    name: str = Field(examples=["Endoplasmic reticulum"])
    confidence: float = Field(ge=0.0, le=1.0, examples=[0.93])


class MaskRLE(BaseModel):
    """A cell mask as COCO compressed RLE in full-image coordinates (column-major, as pycocotools).

    Decode with ``pycocotools.mask.decode({"size": size, "counts": counts.encode()})``.
    """

    size: list[int] = Field(min_length=2, max_length=2, description="[height, width]", examples=[[2048, 2048]])
    counts: str = Field(description="COCO compressed RLE counts (ASCII)", examples=["PWh0<Rm1..."])


class BBox(BaseModel):
    """Bounding box in pixels, rows and columns, end-exclusive."""

    row0: int = Field(examples=[120])
    col0: int = Field(examples=[310])
    row1: int = Field(examples=[402])
    col1: int = Field(examples=[598])


class AttributionMapData(BaseModel):
    """An attribution map in a compact form; see the README ("Attribution maps") for the two-line decode."""

    model_config = ConfigDict(extra="allow")

    encoding: str = Field(examples=["png16-signed"])
    shape: list[int] = Field(description="[height, width] of the map (the cell's bounding box)", examples=[[282, 288]])


class Attribution(BaseModel):
    """Integrated-gradient map of one class over one cell's bounding box."""

    class_id: int = Field(ge=0, le=18)
    name: str
    bbox: BBox = Field(description="The box the map covers (the cell's bounding box)")
    map: AttributionMapData
    channel_totals: dict[str, float] = Field(
        description="Attribution summed per input channel (red, green, blue, yellow)",
        examples=[{"red": 0.01, "green": 0.83, "blue": 0.05, "yellow": 0.02}],
    )
    completeness_error: float = Field(
        description="|sum(attributions) - (f(x) - f(baseline))| / |f(x) - f(baseline)|; small means converged",
        examples=[0.004],
    )
    completeness_abs: float = Field(description="|sum(attributions) - (f(x) - f(baseline))|", examples=[0.003])
    score: float = Field(description="Model output f(x) for the class", examples=[0.93])
    baseline_score: float = Field(description="Model output f(baseline) for the class", examples=[0.02])
    steps: int = Field(examples=[64])
    baseline: str = Field(examples=["black"])


class NucleusOut(BaseModel):
    """The nucleus of a cell: label ``k`` in the nuclei label image for cell ``k``, inside the cell."""

    area: int = Field(ge=1, description="Pixels", examples=[9120])
    mask: MaskRLE | None = Field(None, description="The nucleus mask (unless include_masks=false)")


class CellOut(BaseModel):
    """One segmented cell and what the model calls in it."""

    id: int = Field(ge=1, description="Label of the cell in the segmentation", examples=[1])
    bbox: BBox
    area: int = Field(ge=0, description="Pixels", examples=[61234])
    centroid: list[float] = Field(description="[row, column]", examples=[[261.4, 455.0]])
    touches_border: bool = Field(description="The cell is cut by the image border", examples=[False])
    labels: list[LabelOut] = Field(description="Classes at or above their decision threshold, most confident first")
    scores: list[float] | None = Field(None, description="All 19 probabilities in class order (on request)")
    mask: MaskRLE | None = Field(None, description="The cell's mask (unless include_masks=false)")
    nucleus: NucleusOut | None = Field(
        None, description="The cell's nucleus, same id as the cell; absent where the segmenter found none"
    )
    attributions: list[Attribution] | None = Field(None, description="Integrated-gradient maps (on request)")


class ClassSummary(BaseModel):
    """Field-level summary for one class: what the protein does in this field."""

    class_id: int = Field(examples=[6])
    name: str = Field(examples=["Endoplasmic reticulum"])
    cells: int = Field(description="Cells in which the class is called", examples=[14])
    max_confidence: float = Field(examples=[0.97])


class ModelRef(BaseModel):
    """The model that answered."""

    name: str = Field(examples=["locus-sim-b0"])
    version: str = Field(examples=["1.0.0"])


class ImageInfo(BaseModel):
    """Size of the field."""

    height: int = Field(examples=[2048])
    width: int = Field(examples=[2048])


class ClassifyResponse(BaseModel):
    """Every cell of the field with its labels, confidences and mask."""

    request_id: str = Field(examples=["6f1c2a9e8b7d4c3a"])
    image: ImageInfo
    model: ModelRef
    segmenter: str = Field(examples=["classical"])
    provider: str = Field(description="ONNX Runtime provider that ran the model", examples=["CPUExecutionProvider"])
    threshold: str | float = Field(
        description="'manifest' (the model's per-class thresholds for the views in `tta`: its one-view set, or "
        "the set tuned on that mean of views when the manifest has one) or the single threshold used",
        examples=["manifest"],
    )
    tta: int = Field(
        1,
        description="Test-time augmentation: views of each crop its scores are averaged over (1 = none)",
        examples=[1],
    )
    field_context: float = Field(
        0.0,
        description="Weight of the field's mean scores in each cell's scores and labels (0 = each cell's own)",
        examples=[0.5],
    )
    cell_count: int = Field(examples=[23])
    cells: list[CellOut]
    summary: list[ClassSummary] = Field(description="Per class called: cells and highest confidence")
    timings_ms: dict[str, float] = Field(
        description="Milliseconds per stage", examples=[{"decode": 41.0, "segment": 380.2, "classify": 95.1}]
    )


class KaggleResponse(BaseModel):
    """The field as one row of a competition submission."""

    ID: str = Field(examples=["field"])
    ImageWidth: int = Field(examples=[2048])
    ImageHeight: int = Field(examples=[2048])
    PredictionString: str = Field(
        description="Space-separated `class confidence mask` triples, one per (cell, class)",
        examples=["0 0.912000 eNoLCAgIMAEABJkBdQ== 16 0.611000 eNoLCAgIMAEABJkBdQ=="],
    )


class ErrorBody(BaseModel):
    """What went wrong and how to fix it."""

    code: str = Field(examples=["corrupt_image"])
    message: str = Field(examples=["green: the PNG data is truncated or corrupt and could not be decoded"])
    field: str | None = Field(None, description="The form field or parameter at fault", examples=["green"])


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer has this body."""

    error: ErrorBody
    request_id: str | None = Field(None, examples=["6f1c2a9e8b7d4c3a"])


class HealthResponse(BaseModel):
    """Liveness."""

    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    """Readiness: models loaded and not draining."""

    ready: bool
    reason: str | None = None


class ModelInfo(BaseModel):
    """The loaded model and how it runs."""

    model_config = ConfigDict(protected_namespaces=())

    name: str = Field(examples=["locus-sim-b0"])
    version: str = Field(examples=["1.0.0"])
    architecture: str = Field(examples=["efficientnet-b0"])
    classes: list[str]
    thresholds: list[float] = Field(description="Per-class decision thresholds for one view (tta 1)")
    view_thresholds: dict[int, list[float]] = Field(
        default_factory=dict,
        description="Per-class thresholds for scores averaged over 2, 4 or 8 views, by view count (the model's "
        "sets; a view count without one uses `thresholds`)",
    )
    input: dict = Field(
        examples=[
            {
                "name": "image",
                "shape": ["N", 128, 128, 4],
                "channels": ["red", "green", "blue", "yellow"],
                "value_range": [0, 255],
            }
        ]
    )
    crop: dict = Field(examples=[{"size": 128, "padding": 0.1, "mask_other_cells": True, "min_side": 16}])
    provider: str = Field(examples=["CPUExecutionProvider"])
    providers_requested: list[str]
    segmenter: str = Field(examples=["classical"])
    tta: int = Field(1, description="Test-time augmentation views a request gets unless it sets tta (LOCUS_TTA)")
    field_context: float = Field(
        0.0, description="Field-context weight a request gets unless it sets field_context (LOCUS_FIELD_CONTEXT)"
    )
    attributions: bool = Field(description="The model folder ships a gradient model")
    training: dict = Field(default_factory=dict, description="Training data summary and metrics from the manifest")
