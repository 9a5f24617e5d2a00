"""``GET /metrics``: Prometheus metrics of the service."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import require_api_key
from service.api.schemas import ErrorResponse

router = APIRouter(tags=["meta"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        401: {"model": ErrorResponse},
    },
    summary="Prometheus metrics",
)
async def metrics(request: Request, _auth: Annotated[None, Depends(require_api_key)]) -> Response:
    """Fields and cells classified, stage latencies, batch sizes, requests in flight, rejections by reason."""
    m = request.app.state.metrics
    state = getattr(request.app.state, "locus", None)
    if state is not None:
        m.in_flight.set(state.admission.in_flight)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
