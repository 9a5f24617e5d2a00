"""Meta routes: liveness, readiness and the loaded model."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from locus.service.api.deps import StateDep, require_api_key
from locus.service.classes import CHANNELS, CLASS_NAMES
from locus.service.schemas import ErrorResponse, HealthResponse, ModelInfo, ReadyResponse

router = APIRouter(tags=["meta"])


@router.get("/health", response_model=HealthResponse, summary="Liveness: the process answers")
async def health() -> HealthResponse:
    """Answer as long as the process and its event loop run (no auth)."""
    return HealthResponse()


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "Not ready: loading or draining"}},
    summary="Readiness: models loaded and not draining",
)
async def ready(request: Request) -> JSONResponse:
    """200 when the model and segmenter are loaded and the service is not shutting down (no auth)."""
    state = getattr(request.app.state, "locus", None)
    if state is None:
        body = ReadyResponse(ready=False, reason="loading")
    elif state.draining:
        body = ReadyResponse(ready=False, reason="draining")
    else:
        body = ReadyResponse(ready=state.ready, reason=None if state.ready else "loading")
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get(
    "/model",
    response_model=ModelInfo,
    responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    summary="The loaded model, its input spec, provider and segmenter",
)
async def model_info(state: StateDep, _auth: Annotated[None, Depends(require_api_key)]) -> ModelInfo:
    """Describe the model folder in use and how it runs."""
    m = state.classifier.manifest
    return ModelInfo(
        name=m.name,
        version=m.version,
        architecture=m.architecture,
        classes=list(CLASS_NAMES),
        thresholds=list(m.thresholds),
        view_thresholds={n: list(v) for n, v in m.view_thresholds.items()},
        input={
            "name": m.input_name,
            "shape": ["N", m.input_size, m.input_size, 4],
            "channels": list(CHANNELS),
            "value_range": m.value_range,
            "dtype": "float32",
            "pixel_size": m.pixel_size,
        },
        crop=m.crop.model_dump(),
        provider=state.classifier.provider.primary,
        providers_requested=list(state.classifier.provider.requested),
        segmenter=state.segmenter_name,
        tta=state.pipeline.tta,
        field_context=state.pipeline.field_context,
        attributions=state.classifier.supports_attributions,
        training=m.training,
    )
