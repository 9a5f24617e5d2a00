"""``GET /metrics``: Prometheus metrics of the service (HTTP and domain), in the app's own registry."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_fastapi_instrumentator import Instrumentator

from locus.service.api.deps import require_api_key
from locus.service.schemas import ErrorResponse

__all__ = ["router", "instrument"]

router = APIRouter(tags=["meta"])


def instrument(app: FastAPI) -> None:
    """Add HTTP metrics (requests, latencies, sizes by route template and status) to the app's registry.

    Every app has its own registry (``app.state.metrics.registry``), so building
    many apps in one process registers nothing twice. Paths that match no route
    are grouped under ``none`` so hostile URLs cannot blow up the label set.

    Parameters
    ----------
    app : FastAPI
        The app; call before it starts.
    """
    Instrumentator(
        should_group_status_codes=False,
        should_ignore_untemplated=False,
        should_group_untemplated=True,
        excluded_handlers=["/metrics"],
        registry=app.state.metrics.registry,
    ).instrument(app)


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
    """HTTP requests and latencies, fields and cells classified, stage latencies, batch sizes, requests in
    flight and queued, rejections by reason and error answers by code."""
    m = request.app.state.metrics
    state = getattr(request.app.state, "locus", None)
    if state is not None:
        a = state.admission
        m.admission(a.in_flight, a.running, a.capacity)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
