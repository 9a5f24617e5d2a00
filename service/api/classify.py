"""``POST /classify``: four channel images in, every cell with labels, confidences and mask out."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from starlette.datastructures import UploadFile as StarletteUploadFile

from service.api.deps import StateDep, require_api_key
from service.api.schemas import ClassifyResponse, KaggleResponse
from service.classes import CHANNELS, NUM_CLASSES
from service.errors import ERROR_RESPONSES, ApiError
from service.imaging import decode_channel, stack_channels
from service.pipeline import ClassifyOptions
from service.response import field_json
from service.state import ServiceState

router = APIRouter(tags=["classify"], dependencies=[Depends(require_api_key)])

_CHANNEL_HELP = {
    "red": "Microtubules channel (PNG 8/16-bit, TIFF or JPEG; tinted HPA website JPEGs accepted)",
    "green": "Protein of interest channel",
    "blue": "Nucleus channel",
    "yellow": "Endoplasmic reticulum channel",
}


def _parse_classes(text: str | None) -> tuple[int, ...] | None:
    if text is None or not text.strip():
        return None
    try:
        ids = tuple(sorted({int(p) for p in text.split(",") if p.strip()}))
    except ValueError as exc:
        raise ApiError(
            422,
            "invalid_parameter",
            "attribution_classes: give class ids 0-18 separated by commas",
            "attribution_classes",
        ) from exc
    if not ids or any(not 0 <= k < NUM_CLASSES for k in ids):
        raise ApiError(
            422, "invalid_parameter", "attribution_classes: class ids must be in 0-18", "attribution_classes"
        )
    return ids


async def _read_upload(upload: UploadFile, name: str, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(
            413,
            "upload_too_large",
            f"{name}: the upload is over the limit of {limit} bytes; raise LOCUS_MAX_UPLOAD_BYTES "
            "or send a smaller file",
            name,
        )
    return data


async def _check_form(request: Request) -> None:
    form = await request.form()
    extra = sorted({k for k in form if k not in CHANNELS})
    if extra:
        raise ApiError(
            422,
            "unexpected_field",
            f"unexpected form field(s) {', '.join(repr(e) for e in extra)}; send exactly the four "
            "channels red, green, blue, yellow (options go in the query string)",
            extra[0],
        )
    for c in CHANNELS:
        values = form.getlist(c)
        if len(values) > 1:
            raise ApiError(422, "duplicate_field", f"{c}: sent {len(values)} times; send each channel once", c)
        if values and not isinstance(values[0], StarletteUploadFile):
            raise ApiError(422, "not_a_file", f"{c}: must be a file upload (multipart file part), not a text value", c)


def _classify_sync(
    state: ServiceState, blobs: dict[str, bytes], options: ClassifyOptions, request_id: str, output: str, image_id: str
) -> dict:
    t0 = time.perf_counter()
    settings = state.settings
    channels = {c: decode_channel(blobs[c], field=c, max_pixels=settings.max_image_pixels) for c in CHANNELS}
    image = stack_channels(channels)
    decode_ms = (time.perf_counter() - t0) * 1e3
    result = state.pipeline.run(image, options)
    result.timings_ms = {"decode": decode_ms, **result.timings_ms}
    if output == "kaggle":
        return {
            "ID": image_id,
            "ImageWidth": result.width,
            "ImageHeight": result.height,
            "PredictionString": result.prediction_string(),
        }
    m = state.classifier.manifest
    body = field_json(
        result,
        options,
        model_name=m.name,
        model_version=m.version,
        segmenter=state.segmenter_name,
        provider=state.classifier.provider.primary,
        request_id=request_id,
    )
    body["timings_ms"]["total"] = round((time.perf_counter() - t0) * 1e3, 2)
    return body


@router.post(
    "/classify",
    response_model=ClassifyResponse | KaggleResponse,
    response_model_exclude_none=True,
    responses={k: v for k, v in ERROR_RESPONSES.items() if k != 400},
    summary="Segment a field and classify every cell",
)
async def classify(
    request: Request,
    state: StateDep,
    red: Annotated[UploadFile, File(description=_CHANNEL_HELP["red"])],
    green: Annotated[UploadFile, File(description=_CHANNEL_HELP["green"])],
    blue: Annotated[UploadFile, File(description=_CHANNEL_HELP["blue"])],
    yellow: Annotated[UploadFile, File(description=_CHANNEL_HELP["yellow"])],
    threshold: Annotated[
        float | None,
        Query(
            ge=0.0,
            le=1.0,
            description="One decision threshold for all classes; default: the model's per-class thresholds",
        ),
    ] = None,
    include_masks: Annotated[bool, Query(description="Return each cell's mask as COCO RLE")] = True,
    include_scores: Annotated[bool, Query(description="Return all 19 scores per cell")] = False,
    output: Annotated[
        Literal["json", "kaggle"], Query(description="json, or kaggle for a PredictionString row")
    ] = "json",
    image_id: Annotated[str, Query(max_length=200, description="ID of the row in kaggle output")] = "field",
    attributions: Annotated[bool, Query(description="Integrated-gradient maps per cell and label")] = False,
    attribution_classes: Annotated[
        str | None, Query(max_length=100, description="Comma-separated class ids to explain instead of the labels")
    ] = None,
    ig_steps: Annotated[
        int | None, Query(ge=2, description="Integrated-gradient steps (default from settings)")
    ] = None,
    ig_baseline: Annotated[Literal["black", "blur"], Query(description="Integrated-gradient baseline")] = "black",
) -> dict:
    """Segment the four-channel field, classify every cell into the 19 HPA classes, and answer per cell.

    Each channel is a multipart file part: ``red`` (microtubules), ``green`` (protein),
    ``blue`` (nucleus), ``yellow`` (ER), all the same size. The answer lists every cell
    with its bounding box, area, centroid, mask (COCO RLE), labels at or above the
    decision thresholds, and on request all scores and integrated-gradient maps; plus a
    field summary per class and stage timings. ``output=kaggle`` answers one
    competition submission row instead.
    """
    settings = state.settings
    await _check_form(request)
    classes = _parse_classes(attribution_classes)
    steps = ig_steps or settings.ig_steps
    if attributions:
        if not state.classifier.supports_attributions:
            raise ApiError(
                422,
                "attributions_unavailable",
                "attributions: this model folder has no gradient model (grad.onnx); export it with "
                "`locus export --grad`",
                "attributions",
            )
        if steps > settings.ig_max_steps:
            raise ApiError(
                422,
                "invalid_parameter",
                f"ig_steps: {steps} is over the maximum of {settings.ig_max_steps} (LOCUS_IG_MAX_STEPS)",
                "ig_steps",
            )
    options = ClassifyOptions(
        threshold=threshold,
        include_masks=include_masks,
        include_scores=include_scores,
        attributions=attributions,
        attribution_classes=classes,
        ig_steps=steps,
        ig_baseline=ig_baseline,
        ig_max_cells=settings.ig_max_cells,
    )
    if not state.admission.try_enter():
        request.app.state.metrics.rejected("overloaded")
        raise ApiError(
            503,
            "overloaded",
            f"the service is at capacity ({state.admission.capacity} requests in flight or queued); "
            "retry after the Retry-After seconds",
            headers={"Retry-After": "1"},
        )
    try:
        uploads = {"red": red, "green": green, "blue": blue, "yellow": yellow}
        blobs = {c: await _read_upload(uploads[c], c, settings.max_upload_bytes) for c in CHANNELS}
    except BaseException:
        state.admission.leave()
        raise
    rid = getattr(request.state, "request_id", "")
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(state.executor, _classify_sync, state, blobs, options, rid, output, image_id)
    # The slot is freed when the work really ends, also after a timeout (the thread cannot be killed).
    fut.add_done_callback(lambda _f: state.admission.leave())
    try:
        body = await asyncio.wait_for(asyncio.shield(fut), timeout=settings.request_timeout_s)
    except TimeoutError as exc:
        request.app.state.metrics.rejected("timeout")
        raise ApiError(
            504,
            "timeout",
            f"classification ran past the limit of {settings.request_timeout_s:g} s "
            "(LOCUS_REQUEST_TIMEOUT_S); send a smaller field or fewer attribution steps",
        ) from exc
    request.app.state.metrics.observe_field(body)
    return body
