"""``POST /classify``: four channel images in, every cell with labels, confidences and mask out."""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile
from starlette.datastructures import UploadFile as StarletteUploadFile

from locus.service.api.deps import StateDep, require_api_key
from locus.service.attribution import gradient_evaluations
from locus.service.classes import CHANNELS, NUM_CLASSES
from locus.service.errors import ERROR_RESPONSES, ApiError
from locus.service.formats import FORMATS, MEDIA_TYPES, FileAnswer, FormatUnavailableError, check_format
from locus.service.pipeline import ClassifyOptions
from locus.service.schemas import ClassifyResponse, ErrorResponse, KaggleResponse
from locus.service.state import ServiceState

router = APIRouter(tags=["classify"], dependencies=[Depends(require_api_key)])

_CHANNEL_HELP = {
    "red": "Microtubules channel (PNG 8/16-bit, TIFF or JPEG; tinted HPA website JPEGs accepted)",
    "green": "Protein of interest channel",
    "blue": "Nucleus channel",
    "yellow": "Endoplasmic reticulum channel",
}


_CLASS_ID = re.compile(r"[0-9]{1,2}", re.ASCII)


def _parse_classes(text: str | None) -> tuple[int, ...] | None:
    if text is None or not text.strip():
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    # ASCII digits only: int() would also take "1_0" (10) and other scripts' digits
    if not all(_CLASS_ID.fullmatch(p) for p in parts):
        raise ApiError(
            422,
            "invalid_parameter",
            "attribution_classes: give class ids 0-18 (ASCII digits) separated by commas, e.g. 2,6",
            "attribution_classes",
        )
    ids = tuple(sorted({int(p) for p in parts}))
    if not ids or any(not 0 <= k < NUM_CLASSES for k in ids):
        raise ApiError(
            422, "invalid_parameter", "attribution_classes: class ids must be in 0-18", "attribution_classes"
        )
    return ids


Output = Literal["json", "kaggle", "csv", "parquet", "h5ad", "geojson", "labels"]

_OUTPUT_HELP = (
    "json (default), kaggle (one submission row), or a file: csv or parquet (one row per cell: box, area, "
    "centroid, nucleus area, labels, all 19 scores), h5ad (AnnData: scores as X, cells in obs, centroids in "
    "obsm['spatial']), geojson (QuPath-importable cells with nuclei), labels (one OME-TIFF, channels cells and "
    "nuclei, cell k and its nucleus both k). Without it, the Accept header chooses among "
    + ", ".join(f"{MEDIA_TYPES[f]} ({f})" for f in FORMATS)
    + "; anything else gets json"
)

_FILE_RESPONSES: dict[int | str, dict] = {
    200: {
        "description": "The answer: JSON (ClassifyResponse or KaggleResponse), or the file asked for with output=",
        "content": {MEDIA_TYPES[f]: {"schema": {"type": "string", "format": "binary"}} for f in FORMATS},
    },
    406: {
        "model": ErrorResponse,
        "description": "The asked output format needs a Python package that this server does not have",
    },
}


def _accepted_output(accept: str | None) -> str:
    """The file format the Accept header prefers (by q value, then order), else ``json``."""
    if not accept:
        return "json"
    by_type = {v: k for k, v in MEDIA_TYPES.items()}
    best, best_q = "json", 0.0
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        fmt = by_type.get(media.lower())
        if media.lower() == "application/json":
            fmt = "json"
        if fmt is not None and q > best_q:
            best, best_q = fmt, q
    return best


def _resolve_output(output: str | None, accept: str | None) -> str:
    """The output asked for (the query parameter wins over Accept), checked to be servable here."""
    chosen = output or _accepted_output(accept)
    if chosen in FORMATS:
        try:
            check_format(chosen)
        except FormatUnavailableError as exc:
            field = "output" if output else "accept"
            raise ApiError(406, "format_unavailable", f"{field}: {exc}", field) from exc
    return chosen


def _file_response(answer: FileAnswer) -> Response:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", answer.filename)
    return Response(
        content=answer.content,
        media_type=answer.media_type,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


def _check_upload_size(upload: UploadFile, name: str, limit: int) -> None:
    size = upload.size
    if size is None:  # not known from the parser: measure the spooled file without reading it
        upload.file.seek(0, 2)
        size = upload.file.tell()
        upload.file.seek(0)
    if size > limit:
        raise ApiError(
            413,
            "upload_too_large",
            f"{name}: the upload is over the limit of {limit} bytes; raise LOCUS_MAX_UPLOAD_BYTES "
            "or send a smaller file",
            name,
        )


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


@router.post(
    "/classify",
    response_model=ClassifyResponse | KaggleResponse,
    response_model_exclude_none=True,
    responses={**{k: v for k, v in ERROR_RESPONSES.items() if k != 400}, **_FILE_RESPONSES},
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
    output: Annotated[Output | None, Query(description=_OUTPUT_HELP)] = None,
    image_id: Annotated[
        str, Query(max_length=200, description="ID of the field in kaggle output, table rows and file names")
    ] = "field",
    attributions: Annotated[bool, Query(description="Integrated-gradient maps per cell and label")] = False,
    attribution_classes: Annotated[
        str | None, Query(max_length=100, description="Comma-separated class ids to explain instead of the labels")
    ] = None,
    ig_steps: Annotated[
        int | None, Query(ge=2, description="Integrated-gradient steps (default from settings)")
    ] = None,
    ig_baseline: Annotated[Literal["black", "blur"], Query(description="Integrated-gradient baseline")] = "black",
    ig_tolerance: Annotated[
        float | None,
        Query(
            ge=0.0,
            le=1.0,
            description="Relative completeness error each map must meet; maps over it are refined to 2x, 4x ... "
            "the steps, within LOCUS_IG_MAX_STEPS and LOCUS_IG_BUDGET (each map reports its steps and error). "
            "0: no refinement. Default from settings (LOCUS_IG_TOLERANCE, 0.05)",
        ),
    ] = None,
    pixel_size: Annotated[
        float | None,
        Query(
            gt=0.0,
            le=100.0,
            description="The image's pixel size in micrometres; the field is resampled to the model's training "
            "scale (GET /model: pixel_size) for segmentation and cropping, masks stay at full resolution. "
            "Default: no resampling",
        ),
    ] = None,
    hpa_compat: Annotated[
        bool | None,
        Query(
            description="With the hpa segmenter: true reproduces HPA's official post-processing step by step, "
            "false uses Locus's default (HPA's two merging defects fixed); default LOCUS_HPA_COMPAT",
        ),
    ] = None,
    tta: Annotated[
        int | None,
        Query(
            description="Test-time augmentation: average each cell's scores over 1, 2, 4 or 8 flipped/transposed "
            "views of its crop (the classify stage costs that many times more); default LOCUS_TTA (auto: 8 on a GPU, "
            "1 on a CPU)",
        ),
    ] = None,
    field_context: Annotated[
        float | None,
        Query(
            description="Weight from 0 to 1 of the field's mean scores in each cell's scores and labels (the cells of "
            "one field share one protein); 0: each cell's own scores; default LOCUS_FIELD_CONTEXT",
        ),
    ] = None,
) -> ClassifyResponse | KaggleResponse | Response:
    """Segment the four-channel field, classify every cell into the 19 HPA classes, and answer per cell.

    Each channel is a multipart file part: ``red`` (microtubules), ``green`` (protein),
    ``blue`` (nucleus), ``yellow`` (ER), all the same size. The answer lists every cell
    with its bounding box, area, centroid, mask (COCO RLE), labels at or above the
    decision thresholds, and on request all scores and integrated-gradient maps; plus a
    field summary per class and stage timings. ``output=kaggle`` answers one
    competition submission row instead; ``output=csv|parquet|h5ad|geojson|labels`` (or the
    matching ``Accept`` media type) answers the same cells as a file for other tools.
    """
    await _check_form(request)
    fmt = _resolve_output(output, request.headers.get("accept"))
    options = _options(
        state,
        threshold=threshold,
        include_masks=include_masks,
        include_scores=include_scores,
        attributions=attributions,
        attribution_classes=attribution_classes,
        ig_steps=ig_steps,
        ig_baseline=ig_baseline,
        ig_tolerance=ig_tolerance,
        pixel_size=pixel_size,
        hpa_compat=hpa_compat,
        tta=tta,
        field_context=field_context,
    )
    if fmt in FORMATS:  # files are drawn from the label images; RLE masks would go unused
        options = dataclasses.replace(options, include_masks=False)
    uploads = {"red": red, "green": green, "blue": blue, "yellow": yellow}
    for c in CHANNELS:
        _check_upload_size(uploads[c], c, state.settings.max_upload_bytes)
    state.admit()
    rid = getattr(request.state, "request_id", "")
    # The uploads stay in the parser's spooled files (on disk beyond 1 MiB) until a worker reads them, so a
    # queued request holds no upload in memory.
    files = {c: uploads[c].file for c in CHANNELS}
    body = await state.classify(files, options, request_id=rid, output=fmt, image_id=image_id)
    return _file_response(body) if isinstance(body, FileAnswer) else body


def _options(
    state: ServiceState,
    *,
    threshold: float | None,
    include_masks: bool,
    include_scores: bool,
    attributions: bool,
    attribution_classes: str | None,
    ig_steps: int | None,
    ig_baseline: str,
    ig_tolerance: float | None = None,
    pixel_size: float | None = None,
    hpa_compat: bool | None = None,
    tta: int | None = None,
    field_context: float | None = None,
) -> ClassifyOptions:
    """The request's options, checked against what this model and these settings allow."""
    settings = state.settings
    if pixel_size is not None and state.classifier.manifest.pixel_size is None:
        raise ApiError(
            422,
            "invalid_parameter",
            "pixel_size: this model folder records no training pixel size (manifest pixel_size); leave it out",
            "pixel_size",
        )
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
        if classes is not None and gradient_evaluations(1, len(classes), steps) > settings.ig_budget:
            raise ApiError(
                422,
                "attribution_budget",
                f"attributions: {len(classes)} classes at {steps} steps cost "
                f"{gradient_evaluations(1, len(classes), steps)} gradient evaluations per cell, over the budget of "
                f"{settings.ig_budget} per field (LOCUS_IG_BUDGET); ask for fewer classes or fewer steps",
                "attribution_classes",
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
        ig_tolerance=settings.ig_tolerance if ig_tolerance is None else ig_tolerance,
        ig_max_steps=settings.ig_max_steps,
        ig_max_cells=settings.ig_max_cells,
        ig_budget=settings.ig_budget,
        max_map_bytes=settings.max_map_bytes,
        pixel_size=pixel_size,
        hpa_compat=hpa_compat,
        tta=tta,
        field_context=field_context,
    )
    state.pipeline.check_options(options)  # before admission: the pipeline's own check, not a copy of it
    return options
