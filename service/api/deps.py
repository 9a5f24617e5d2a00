"""Dependencies shared by the routers: the loaded state and API-key authentication."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ApiError
from service.state import ServiceState

__all__ = ["get_state", "StateDep", "require_api_key", "check_authorization"]

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


def key_is_valid(given: str, keys: list[bytes]) -> bool:
    """Whether ``given`` is one of ``keys``, compared in constant time against every key.

    Parameters
    ----------
    given : str
        The key the client sent.
    keys : list of bytes
        Accepted keys.

    Returns
    -------
    bool
        True when it matches one of them.
    """
    raw = given.encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(raw, key)
    return ok


def check_authorization(header: str | None, keys: list[bytes]) -> str | None:
    """Check an ``Authorization`` header value against the accepted keys.

    Parameters
    ----------
    header : str or None
        The header's value (``"Bearer <key>"``).
    keys : list of bytes
        Accepted keys; empty means authentication is off.

    Returns
    -------
    str or None
        None when the request may pass, else the message of the 401 answer (it never contains the key).
    """
    if not keys:
        return None
    scheme, _, token = (header or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return "this service needs an API key: send 'Authorization: Bearer <key>'"
    if not key_is_valid(token, keys):
        return "the API key is not valid"
    return None


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse the request with 401 unless it carries a valid key (when keys are configured).

    The app's :class:`service.middleware.ApiKeyMiddleware` already guards every
    route; this dependency declares the bearer scheme in the OpenAPI schema and
    checks again. Keys are compared in constant time and never logged.
    """
    keys: list[bytes] = getattr(request.app.state, "api_keys", [])
    header = f"{credentials.scheme} {credentials.credentials}" if credentials is not None else None
    problem = check_authorization(header, keys)
    if problem is not None:
        raise ApiError(401, "unauthorized", problem, headers={"WWW-Authenticate": "Bearer"})
