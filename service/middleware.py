"""ASGI middleware: request id and last-resort 500, API keys on every route, body size and time limits.

Order in the app (outermost first): HTTP metrics, :class:`RequestIdMiddleware`,
:class:`BodyLimitMiddleware`, :class:`ApiKeyMiddleware`, CORS (when configured),
the routes. Every answer these write is the service's JSON error body and
carries the request id in ``X-Request-ID``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from locus.service.auth import check_authorization
from locus.service.web import PAGE_PATHS

__all__ = ["RequestIdMiddleware", "BodyLimitMiddleware", "ApiKeyMiddleware", "OPEN_PATHS"]

log = logging.getLogger("locus.middleware")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

#: Paths answered without an API key: the probes of orchestrators and load balancers, and the viewer's page
#: and code (``/``, ``/viewer/<file>``: no data; a browser cannot send a key with a page load, and every call
#: the page makes carries the key).
OPEN_PATHS: frozenset[str] = frozenset({"/health", "/ready"}) | PAGE_PATHS


def _request_id(scope: Scope) -> str | None:
    return (scope.get("state") or {}).get("request_id")


def _count_error(scope: Scope, status: int, code: str) -> None:
    """Count an error answered by a middleware in the app's metrics (when there are any)."""
    app = scope.get("app")
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    if metrics is not None:
        metrics.error(status, code)


async def send_error(
    scope: Scope,
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: Iterable[tuple[str, str]] = (),
    close: bool = False,
) -> None:
    """Answer with the service's JSON error body straight from ASGI.

    Parameters
    ----------
    scope : Scope
        The request scope (for the request id and the app's metrics).
    send : Send
        ASGI send.
    status : int
        HTTP status.
    code : str
        Machine-readable reason.
    message : str
        What went wrong and how to fix it.
    headers : iterable of (str, str)
        Extra headers.
    close : bool
        Ask the client to close the connection (the request body was not read to its end).
    """
    rid = _request_id(scope)
    body = json.dumps({"error": {"code": code, "message": message, "field": None}, "request_id": rid}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    if close:
        raw.append((b"connection", b"close"))
    if rid:
        raw.append((b"x-request-id", rid.encode("latin-1")))
    _count_error(scope, status, code)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    """Give every request an id (or keep a safe ``X-Request-ID`` from the client); answer 500 on a crash.

    The id is bound into the structured log context, stored on ``request.state``,
    and returned in the ``X-Request-ID`` response header. An exception no handler
    took is logged with the id and answered with the JSON 500 body carrying it;
    the process keeps serving.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=rid, path=scope.get("path"))
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in (message.get("headers") or []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("internal error while serving %s %s", scope.get("method"), scope.get("path"))
            if started:  # the answer is half sent: nothing better to do than let the server drop it
                raise
            await send_error(
                scope,
                send,
                500,
                "internal_error",
                "the service failed on this request; it has been logged with this request id "
                "and the next request is served normally",
            )


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` (413) or slower than ``timeout_s`` (408), while streaming.

    The size is checked from ``Content-Length`` before anything is read and then
    on every chunk, so a chunked body without ``Content-Length`` is cut off too.
    The time limit runs from the first read of the body to its last chunk: a client
    that dribbles its upload holds a connection but not a worker, and is cut off
    after ``timeout_s``.

    Parameters
    ----------
    app : ASGIApp
        The wrapped app.
    max_bytes : int
        Largest accepted body.
    timeout_s : float, optional
        Longest time to receive the whole body; None: no limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large_message(self) -> str:
        return (
            f"the request body is over the limit of {self.max_bytes} bytes; "
            "send smaller images or raise LOCUS_MAX_REQUEST_BYTES"
        )

    def _timeout_message(self) -> str:
        return (
            f"the request body did not arrive within {self.timeout_s:g} s; upload faster or raise LOCUS_BODY_TIMEOUT_S"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    await send_error(scope, send, 413, "request_too_large", self._too_large_message(), close=True)
                    return
            except ValueError:
                pass
        received = 0
        started = False
        deadline: float | None = None
        done = False

        async def limited_receive() -> Message:
            nonlocal received, deadline, done
            if done or self.timeout_s is None:
                message = await receive()
            else:
                if deadline is None:
                    deadline = time.monotonic() + self.timeout_s
                try:
                    message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    scope.setdefault("state", {})["body_timeout"] = True
                    raise _BodyTimeoutError from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    done = True
                if received > self.max_bytes:
                    scope.setdefault("state", {})["body_too_large"] = True
                    raise _BodyTooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLargeError:
            if not started:
                await send_error(scope, send, 413, "request_too_large", self._too_large_message(), close=True)
        except _BodyTimeoutError:
            if not started:
                await send_error(scope, send, 408, "request_timeout", self._timeout_message(), close=True)


class ApiKeyMiddleware:
    """When API keys are configured, refuse every request but ``OPEN_PATHS`` without a valid key (401).

    This covers every route, the documentation (``/docs``, ``/redoc``,
    ``/openapi.json`` and their assets) and unknown paths alike, so a new route
    cannot be left open by mistake. CORS preflight requests pass only when CORS
    is on (they carry no credentials by design; the CORS middleware answers them). Keys are compared
    in constant time and never logged.

    Parameters
    ----------
    app : ASGIApp
        The wrapped app.
    keys : list of bytes
        Accepted keys; empty: authentication is off.
    open_paths : iterable of str
        Paths served without a key.
    cors : bool
        CORS is on (``LOCUS_CORS_ORIGINS``): let preflight requests through to the CORS middleware.
    """

    def __init__(
        self, app: ASGIApp, keys: list[bytes], open_paths: Iterable[str] = OPEN_PATHS, cors: bool = False
    ) -> None:
        self.cors = cors
        self.app = app
        self.keys = list(keys)
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.cors and scope.get("method") == "OPTIONS" and b"access-control-request-method" in headers:
            # With CORS on, the CORS middleware answers every preflight alike (it carries no credentials by
            # design); with CORS off a preflight is an ordinary request and needs a key like any other, so
            # its answer cannot tell real routes from unknown ones.
            await self.app(scope, receive, send)
            return
        problem = check_authorization(headers.get(b"authorization", b"").decode("latin-1"), self.keys)
        if problem is None:
            await self.app(scope, receive, send)
            return
        await send_error(scope, send, 401, "unauthorized", problem, headers=[("WWW-Authenticate", "Bearer")])


class _BodyTooLargeError(Exception):
    pass


class _BodyTimeoutError(Exception):
    pass
