"""The viewer: the page at ``/`` and its code, the bundled example fields, and ``POST /decode``.

Who may read what:

- ``/`` and ``/viewer/<asset>`` (:data:`locus.service.web.PAGE_PATHS`) are answered without an
  API key. A browser cannot attach an ``Authorization`` header to a page load, and the page
  holds no data: it is code. When keys are on, the page asks for the key and sends it as
  ``Authorization: Bearer`` on every call it makes; every one of those calls is checked by
  :class:`locus.service.middleware.ApiKeyMiddleware` like any other client's.
- ``GET /examples``, ``GET /examples/{name}`` (the bundled HPA-sim fields) and ``POST /decode``
  are public, documented API routes and need the key like ``/classify``.

``POST /decode`` exists because a browser cannot decode TIFF (and flattens 16-bit PNG to
8 bits): it reads one channel file exactly as ``/classify`` does and answers it as a
lossless grayscale PNG (8- or 16-bit, as stored), which any client can draw.
"""

from __future__ import annotations

from typing import Annotated, Literal

import cv2
from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from locus.service import web
from locus.service.api.deps import require_api_key
from locus.service.errors import ERROR_RESPONSES, ApiError
from locus.service.imaging import decode_channel

__all__ = ["router", "ExampleField"]

router = APIRouter(tags=["viewer"])

#: Headers of the page: nothing may load from or talk to another origin.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", what)


@router.get("/", include_in_schema=False)
async def page() -> Response:
    """The viewer page (no key needed: it holds no data)."""
    return Response(web.asset_bytes("index.html"), media_type=web.ASSETS["index.html"], headers=PAGE_HEADERS)


@router.get("/viewer/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    """One of the page's own files (script, style, icon)."""
    if name not in web.ASSETS:
        raise _not_found(f"no viewer file named {name!r}")
    return Response(web.asset_bytes(name), media_type=web.ASSETS[name], headers=PAGE_HEADERS)


class ExampleField(BaseModel):
    """A bundled example field: four channel files to send to ``POST /classify``."""

    id: str = Field(examples=["sim-golgi"])
    title: str = Field(examples=["HPA-sim 512², Golgi apparatus"])
    size: list[int] = Field(description="[height, width]", examples=[[512, 512]])
    truth: list[str] = Field(description="Classes present in the field (HPA-sim ground truth)")
    files: dict[str, str] = Field(
        description="Channel -> file name, fetched at /examples/{name}",
        examples=[{"red": "sim-golgi_red.jpg", "green": "sim-golgi_green.jpg"}],
    )
    source: str = Field(description="How the field was made")


_EXAMPLE_ERRORS = {k: ERROR_RESPONSES[k] for k in (401,)}

#: The example files by name (the path parameter's allowed values, so the schema says what exists).
ExampleFile = Literal[tuple(sorted({f for e in web.examples() for f in e["files"].values()}))]


@router.get(
    "/examples",
    response_model=list[ExampleField],
    dependencies=[Depends(require_api_key)],
    responses=_EXAMPLE_ERRORS,
    summary="The bundled example fields",
)
async def list_examples() -> list[ExampleField]:
    """List the example fields that ship with Locus (HPA-sim, 512², JPEG), for trying the service without data."""
    return [ExampleField(**e) for e in web.examples()]


@router.get(
    "/examples/{name}",
    response_class=Response,
    dependencies=[Depends(require_api_key)],
    responses={
        200: {"content": {"image/jpeg": {}}, "description": "The channel file"},
        422: {**ERROR_RESPONSES[422], "description": "No example file of that name"},
        **_EXAMPLE_ERRORS,
    },
    summary="One channel file of a bundled example field",
)
async def example_file(name: ExampleFile) -> Response:  # type: ignore[valid-type]
    """One channel file named in ``GET /examples``."""
    return Response((web.EXAMPLES_DIR / name).read_bytes(), media_type="image/jpeg")


@router.post(
    "/decode",
    response_class=Response,
    dependencies=[Depends(require_api_key)],
    responses={
        200: {
            "content": {"image/png": {}},
            "description": "The channel as a lossless grayscale PNG, 8- or 16-bit as stored "
            "(header X-Bit-Depth); tinted colour files come back reduced to one channel",
        },
        **{k: v for k, v in ERROR_RESPONSES.items() if k in (413, 415, 422)},
    },
    summary="Read one channel file as /classify does and answer it as a grayscale PNG",
)
async def decode(
    request: Request,
    image: Annotated[UploadFile, File(description="One channel file: PNG 8/16-bit, TIFF or JPEG (HPA tints too)")],
    channel: Annotated[
        Literal["red", "green", "blue", "yellow"] | None,
        Query(description="The channel's name, used in error messages and as the error's field"),
    ] = None,
) -> Response:
    """Decode one channel the way ``POST /classify`` does, for clients that cannot read the format themselves.

    Browsers cannot decode TIFF and reduce 16-bit PNG to 8 bits; the viewer sends such files
    here to draw them. The answer is the channel exactly as the service reads it (same
    decoder, same checks, same error messages), as a grayscale PNG with the stored bit depth.
    """
    settings = request.app.state.settings
    field = channel or "image"
    limit = settings.max_upload_bytes
    data = await image.read(limit + 1)
    if len(data) > limit:
        raise ApiError(
            413,
            "upload_too_large",
            f"{field}: the upload is over the limit of {limit} bytes; raise LOCUS_MAX_UPLOAD_BYTES "
            "or send a smaller file",
            field,
        )
    arr = await run_in_threadpool(decode_channel, data, field=field, max_pixels=settings.max_image_pixels)
    ok, buf = await run_in_threadpool(cv2.imencode, ".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover - OpenCV encodes any 2-D uint8/uint16 array
        raise ApiError(500, "internal_error", "the decoded channel could not be encoded as PNG")
    depth = "16" if arr.dtype.itemsize == 2 else "8"
    return Response(
        buf.tobytes(),
        media_type="image/png",
        headers={"X-Bit-Depth": depth, "X-Image-Size": f"{arr.shape[1]}x{arr.shape[0]}"},
    )
