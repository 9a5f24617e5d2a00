"""API errors: one JSON body for every 4xx/5xx, naming the problem, the field and the fix."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from locus.service.problems import InputError

__all__ = ["ApiError", "error_response", "install_error_handlers", "ERROR_RESPONSES"]

log = logging.getLogger("locus.errors")


class ApiError(Exception):
    """An error the API answers with a JSON body.

    Parameters
    ----------
    status : int
        HTTP status.
    code : str
        Short machine-readable reason.
    message : str
        What went wrong and how to fix it.
    field : str, optional
        The form field or parameter at fault.
    headers : dict, optional
        Extra response headers (e.g. ``Retry-After``).
    """

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None) or request.headers.get("x-request-id")


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Build the JSON error answer.

    Parameters
    ----------
    request : Request
        The request (for its id).
    status, code, message, field, headers
        See :class:`ApiError`.

    Returns
    -------
    JSONResponse
        ``{"error": {"code", "message", "field"}, "request_id"}``.
    """
    body = {"error": {"code": code, "message": message, "field": field}, "request_id": _request_id(request)}
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.error(status, code)
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    parts = []
    field = None
    code = "invalid_request"
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        name = ".".join(loc) or "request"
        field = field or (loc[0] if loc else None)
        if "UploadFile" in str(err.get("msg", "")):
            code = "not_a_file" if code == "invalid_request" else code
            parts.append(f"{name}: must be a file upload (multipart file part), not a text value")
        elif err.get("type") == "missing":
            if name in ("red", "green", "blue", "yellow"):
                parts.append(f"{name}: missing; upload the {name} channel image as multipart form field '{name}'")
            else:
                parts.append(f"{name}: required")
        else:
            parts.append(f"{name}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", field, code


def _complete_openapi(schema: dict, auth: bool) -> dict:
    """Declare in an OpenAPI schema every error status the service can answer, all with ``ErrorResponse``.

    FastAPI declares its own ``HTTPValidationError`` body for 422, but the service
    answers 422 with :class:`ErrorResponse`; and middleware answers (401 for a missing
    key, 400/408/413 while reading a body, 500 on a crash) are invisible to it. When
    no API keys are configured, the bearer scheme and 401 are taken out: the schema
    says what this instance does.
    """
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    if not auth:
        schema.get("components", {}).pop("securitySchemes", None)
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses = op["responses"]
            wanted = [500]
            if not auth:
                op.pop("security", None)
                responses.pop("401", None)
            elif op.get("security"):
                wanted.append(401)
            if "requestBody" in op:
                wanted += [400, 408, 413]
            if "422" in responses or op.get("parameters") or "requestBody" in op:
                wanted.append(422)
            for status in wanted:
                entry = responses.setdefault(str(status), {"description": ERROR_RESPONSES[status]["description"]})
                content = entry.setdefault("content", {}).setdefault("application/json", {})
                if "HTTPValidationError" in str(content.get("schema")) or "schema" not in content:
                    content["schema"] = dict(ref)
    components = schema.get("components", {}).get("schemas", {})
    if "HTTPValidationError" not in str(schema.get("paths")):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
    return schema


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the JSON error body, and declare them in OpenAPI."""
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _complete_openapi(default_openapi(), bool(getattr(app.state, "api_keys", None)))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(InputError)
    async def _input_problem(request: Request, exc: InputError) -> JSONResponse:
        return error_response(request, exc.status, exc.code, exc.message, exc.field)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field, code = _validation_message(exc)
        return error_response(request, 422, code, message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if getattr(request.state, "body_too_large", False):
            limit = request.app.state.settings.max_request_bytes
            return error_response(
                request,
                413,
                "request_too_large",
                f"the request body is over the limit of {limit} bytes; "
                "send smaller images or raise LOCUS_MAX_REQUEST_BYTES",
                headers={"Connection": "close"},
            )
        if getattr(request.state, "body_timeout", False):
            timeout = request.app.state.settings.body_timeout_s
            return error_response(
                request,
                408,
                "request_timeout",
                f"the request body did not arrive within {timeout:g} s; upload faster or raise LOCUS_BODY_TIMEOUT_S",
                headers={"Connection": "close"},
            )
        code = {
            400: "malformed_request",
            404: "not_found",
            405: "method_not_allowed",
            401: "unauthorized",
        }.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error while serving %s %s", request.method, request.url.path)
        return error_response(
            request,
            500,
            "internal_error",
            "the service failed on this request; it has been logged with this request id "
            "and the next request is served normally",
        )


def _err(description: str) -> dict:
    from locus.service.schemas import ErrorResponse

    return {"model": ErrorResponse, "description": description}


ERROR_RESPONSES: dict[int | str, dict] = {
    400: _err("Malformed request body (e.g. a multipart body without boundary)"),
    401: _err("Missing or invalid API key (when keys are enabled)"),
    408: _err("The request body did not arrive within LOCUS_BODY_TIMEOUT_S"),
    413: _err("Upload or image too large (per-field bytes, request bytes or pixels)"),
    415: _err("A channel is not a PNG, TIFF or JPEG file"),
    422: _err("A channel image cannot be used (missing, corrupt, wrong depth, sizes differ) or a bad parameter"),
    500: _err("Internal error; the body carries the request id that the log names"),
    503: _err("Overloaded or not ready: retry after the Retry-After header's seconds"),
    504: _err("The request ran past the per-request time limit"),
}
"""Error statuses declared in the OpenAPI schema (the classify route's; others get theirs from the schema pass)."""
