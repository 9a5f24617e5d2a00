"""Dependencies shared by the routers: the loaded state and API-key authentication."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ApiError
from service.state import ServiceState

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


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse the request with 401 unless it carries a valid key (when keys are configured).

    Keys are compared in constant time and never logged.
    """
    keys: list[bytes] = getattr(request.app.state, "api_keys", [])
    if not keys:
        return
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise ApiError(
            401,
            "unauthorized",
            "this service needs an API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    given = credentials.credentials.encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key)
    if not ok:
        raise ApiError(401, "unauthorized", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
