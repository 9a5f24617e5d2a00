"""The FastAPI application: ``create_app(settings)``. Thin: wiring only.

The lifespan loads the model folder and the segmenter once (a broken model
folder stops the start with a message naming the file), serves, then drains:
readiness turns false and requests in flight finish before the worker pool and
batcher stop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from locus.service import __version__
from locus.service.api import classify, meta, observability, viewer
from locus.service.errors import install_error_handlers
from locus.service.logs import configure_logging
from locus.service.metrics import Metrics
from locus.service.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestIdMiddleware
from locus.service.settings import Settings
from locus.service.state import load_state

__all__ = ["create_app"]

log = logging.getLogger("locus.app")

DESCRIPTION = """\
Locus segments a four-channel Human Protein Atlas-style field of view (red microtubules,
green protein, blue nucleus, yellow ER) into cells and says, for each cell, where the
protein sits: 19 classes (18 localisations + Negative), with confidences, the cell's mask
as COCO RLE and, on request, integrated-gradient maps.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the Locus app.

    Parameters
    ----------
    settings : Settings, optional
        Service settings; default: read from ``LOCUS_*`` environment variables.

    Returns
    -------
    FastAPI
        The app; its lifespan loads the model and segmenter.
    """
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_json)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = load_state(settings, metrics=app.state.metrics)
        app.state.locus = state
        try:
            yield
        finally:
            log.info("draining: readiness false, finishing requests in flight")
            state.close()
            log.info("stopped")

    app = FastAPIOffline(
        title="Locus",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.locus = None
    app.state.api_keys = [k.encode("utf-8") for k in settings.all_api_keys()]
    install_error_handlers(app)
    app.include_router(meta.router)
    app.include_router(classify.router)
    app.include_router(observability.router)
    app.include_router(viewer.router)
    app.add_middleware(ApiKeyMiddleware, keys=app.state.api_keys, cors=bool(settings.cors_origins))
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestIdMiddleware)
    observability.instrument(app)
    return app
