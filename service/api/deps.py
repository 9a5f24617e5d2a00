"""Dependencies shared by the routers: the loaded state and API-key authentication."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from locus.service.errors import ApiError
from locus.service.state import ServiceState

__all__ = ["get_state", "StateDep", "require_api_key"]

_bearer = HTTPBearer(auto_error=False, description="API key, when the service has keys configured")


def get_state(request: Request) -> ServiceState:
    """The loaded service state, or 503 while the service is starting or draining."""
    state: ServiceState | None = getattr(request.app.state, "locus", None)
    if state is None or not state.ready:
        reason = "draining for shutdown" if state is not None and state.draining else "models are still loading"
        raise ApiError(
            503, "not_ready", f"the service is not ready ({reason}); retry shortly", headers={"Retry-After": "2"}
        )
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


def require_api_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Declare the bearer scheme of a route in the OpenAPI schema.

    The key itself is checked once, for every path, by
    :class:`locus.service.middleware.ApiKeyMiddleware` before any route runs.
    """
