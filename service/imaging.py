"""Decoding of channel images: bytes -> one 2-D channel, four channels -> HxWx4.

One function, :func:`decode_channel`, turns the bytes of any supported file
(PNG 8/16-bit, TIFF 8/16-bit, JPEG including the tinted 3-component JPEGs of the
HPA website) into a single 2-D channel. The training package and the service
both call it, so what is trained on is what is served.

Value rule
----------
Channels keep their dtype (``uint8`` or ``uint16``) when decoded. Model inputs
are brought to ``float32`` in 0-255 by :func:`to_unit255`: ``uint8`` as is,
``uint16`` divided by 257 (so 65535 -> 255), which is the one documented
normalisation rule of Locus.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from locus.service.classes import CHANNELS
from locus.service.problems import InputError

__all__ = [
    "ImageError",
    "decode_channel",
    "image_format",
    "jpeg_structure",
    "MAX_JPEG_SCANS",
    "stack_channels",
    "to_unit255",
    "load_field",
]

#: A 3-component image is accepted as an HPA tint (or grey) when the mean cosine between
#: its bright pixels' colours and their mean colour is at least this (tinted HPA JPEGs: 0.98-1.0;
#: uniformly random colours: 0.89).
_TINT_COHERENCE = 0.96


UINT16_TO_255 = np.float32(1.0 / 257.0)
"""The factor that brings uint16 values to 0-255 (65535 -> 255)."""


class ImageError(InputError):
    """A channel image that cannot be used (see :class:`~locus.service.problems.InputError`).

    Parameters
    ----------
    message : str
        What is wrong and what to do.
    field : str, optional
        The channel (``red``, ``green``, ``blue``, ``yellow``) the problem is in.
    code : str
        A short machine-readable reason, e.g. ``"not_an_image"``.
    status : int
        The HTTP status the service answers with (400, 413, 415 or 422).
    """

    def __init__(self, message: str, *, field: str | None = None, code: str = "bad_image", status: int = 422):
        super().__init__(message, field=field, code=code, status=status)


MAX_JPEG_SCANS = 64
"""Most scans a JPEG may have. Baseline files have one per component, libjpeg's progressive script 10; a
file with hundreds of scans is a decode-time bomb (each scan re-walks the whole image)."""

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_BIGTIFF_MAGIC = (b"II+\x00", b"MM\x00+")
_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def image_format(data: bytes) -> str:
    """The file format from its magic bytes.

    Parameters
    ----------
    data : bytes
        The file's bytes (only the first 8 are read).

    Returns
    -------
    str
        ``"png"``, ``"jpeg"``, ``"tiff"``, ``"bigtiff"`` or ``"unknown"``.
    """
    if data[:8] == _PNG_MAGIC:
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] in _TIFF_MAGIC:
        return "tiff"
    if data[:4] in _BIGTIFF_MAGIC:
        return "bigtiff"
    return "unknown"


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from IHDR; libpng refuses a file whose first chunk is not IHDR, so this is its reading."""
    if len(data) >= 33 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return int(height), int(width)
    return None


def jpeg_structure(data: bytes) -> tuple[list[tuple[int, int]], int]:
    """Walk a JPEG's markers as a decoder does: every frame's size and the number of scans.

    Marker segments carry a length; after each SOS the entropy-coded data runs to the next
    marker, where ``FF 00`` (a stuffed data byte), ``FF D0``-``FF D7`` (restart markers) and fill
    bytes do not end it.

    Parameters
    ----------
    data : bytes
        The JPEG file.

    Returns
    -------
    frames : list of tuple of int
        (height, width) of every SOF segment.
    scans : int
        Number of SOS segments.
    """
    arr = np.frombuffer(data, np.uint8)
    ff = np.flatnonzero(arr[:-1] == 0xFF)
    nxt = arr[ff + 1]
    # positions where entropy-coded data may end: FF followed by a real marker byte
    ends = ff[(nxt != 0x00) & (nxt != 0xFF) & ~((nxt >= 0xD0) & (nxt <= 0xD7))]
    frames: list[tuple[int, int]] = []
    scans = 0
    i, n = 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            break  # garbage between segments: the decoder stops (or fails) here too
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0xD9:
            break
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if i + 4 > n:
            break
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF_MARKERS and i + 9 <= n:
            frames.append(((data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]))
        i += 2 + length
        if marker == 0xDA:
            scans += 1
            k = int(np.searchsorted(ends, i))
            if k >= len(ends):
                break
            i = int(ends[k])
    return frames, scans


def _reduce_colour(img: np.ndarray, field: str | None) -> np.ndarray:
    """Reduce a 3- or 4-component image (OpenCV BGR order) to one channel by the max over colour.

    HPA website JPEGs are tinted: red in R, green in G, blue in B, yellow in R+G, so
    every pixel's colour points the same way (a grey image stored as RGB too). Such
    an image reduces exactly by the maximum over the colour axis. An image whose
    bright pixels point in different colour directions is a colour picture, not a
    channel, and is refused.
    """
    if img.shape[2] == 4:
        img = img[:, :, :3]
    # numpy's maximum over the three strided planes (no split copies): ~3 ms for 1728², cv2.split + max ~18 ms
    reduced = np.empty(img.shape[:2], dtype=img.dtype)
    np.maximum(img[:, :, 0], img[:, :, 1], out=reduced)
    np.maximum(reduced, img[:, :, 2], out=reduced)
    flat = img.reshape(-1, img.shape[2])[:, :3]
    peak = float(reduced.max()) if reduced.size else 0.0
    if peak > 0:
        step = max(1, flat.shape[0] // 50_000)  # ~50k pixels judge the hue coherence to +-0.005
        # Column by column (numpy's reductions along a length-3 axis are several times slower).
        sample = flat[::step]
        r, g, b = (sample[:, k].astype(np.float32) for k in range(3))
        bright = np.maximum(np.maximum(r, g), b) > 0.2 * peak
        if int(bright.sum()) >= 16:
            r, g, b = r[bright], g[bright], b[bright]
            norm = np.sqrt(r * r + g * g + b * b)
            r, g, b = r / norm, g / norm, b / norm
            mean = np.array([r.mean(), g.mean(), b.mean()])
            mean /= np.linalg.norm(mean)
            coherence = float((r * mean[0] + g * mean[1] + b * mean[2]).mean())
            if coherence < _TINT_COHERENCE:
                raise ImageError(
                    f"{field or 'image'}: a colour image whose pixels have different hues (colour coherence "
                    f"{coherence:.2f} < {_TINT_COHERENCE}); send one grayscale image per channel, or an HPA "
                    "website tinted JPEG",
                    field=field,
                    code="not_a_channel",
                )
    return reduced


def _check_size(shape: tuple[int, int] | None, fmt: str, name: str, field: str | None, max_pixels: int | None) -> None:
    """Refuse a size the decoder read from the header before any pixel is decoded."""
    if shape is None:
        # Without a readable size the pixel limit cannot be checked before decoding: refuse.
        raise ImageError(
            f"{name}: the {fmt.upper()} header is truncated or corrupt (no image size found)",
            field=field,
            code="corrupt_image",
        )
    h, w = shape
    if max_pixels is not None and h * w > max_pixels:
        raise ImageError(
            f"{name}: declared size {w}x{h} has {h * w} pixels, over the limit of {max_pixels}; downscale the "
            "image or raise LOCUS_MAX_IMAGE_PIXELS",
            field=field,
            code="image_too_large",
            status=413,
        )
    if h == 0 or w == 0:
        raise ImageError(f"{name}: the header declares a zero-sized image", field=field, code="corrupt_image")


def _corrupt(name: str, field: str | None, fmt: str, detail: str = "") -> ImageError:
    extra = f" ({detail})" if detail else ""
    return ImageError(
        f"{name}: the {fmt.upper()} data is truncated or corrupt and could not be decoded{extra}",
        field=field,
        code="corrupt_image",
    )


def _decode_png(data: bytes, name: str, field: str | None, max_pixels: int | None) -> np.ndarray:
    shape = _png_size(data)
    _check_size(shape, "png", name, field, max_pixels)
    # IMREAD_UNCHANGED keeps the bit depth and ignores any EXIF orientation: pixels as stored.
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.shape[:2] != shape:
        raise _corrupt(name, field, "png")
    return img


def _decode_jpeg(data: bytes, name: str, field: str | None, max_pixels: int | None) -> np.ndarray:
    import simplejpeg

    try:
        h, w, colourspace, _ = simplejpeg.decode_jpeg_header(data)  # libjpeg-turbo's own header reading
    except ValueError as exc:
        raise ImageError(
            f"{name}: the JPEG header is truncated or corrupt ({exc})", field=field, code="corrupt_image"
        ) from exc
    _check_size((h, w), "jpeg", name, field, max_pixels)
    frames, scans = jpeg_structure(data)
    if any(f != (h, w) for f in frames):
        raise ImageError(
            f"{name}: the JPEG declares frames of different sizes ({', '.join(f'{b}x{a}' for a, b in frames)}); "
            "send a plain single-frame JPEG",
            field=field,
            code="corrupt_image",
        )
    if scans > MAX_JPEG_SCANS:
        raise ImageError(
            f"{name}: the JPEG has {scans} scans, over the limit of {MAX_JPEG_SCANS} (progressive files have about "
            "10); re-save it as a baseline JPEG or send PNG",
            field=field,
            code="too_many_scans",
        )
    if colourspace not in ("Gray", "YCbCr", "RGB"):
        raise ImageError(
            f"{name}: a {colourspace} JPEG; send a grayscale image or an HPA website tinted RGB JPEG",
            field=field,
            code="not_a_channel",
        )
    try:
        # strict: a warning (premature end of data, corrupt entropy data) is an error, not grey pixels
        img = simplejpeg.decode_jpeg(data, colorspace="GRAY" if colourspace == "Gray" else "RGB", strict=True)
    except ValueError as exc:
        raise _corrupt(name, field, "jpeg", str(exc)) from exc
    return img[:, :, 0] if img.shape[2] == 1 else img


def _decode_tiff(data: bytes, name: str, field: str | None, max_pixels: int | None) -> np.ndarray:
    import tifffile

    try:
        tif = tifffile.TiffFile(io.BytesIO(data))
    except Exception as exc:  # tifffile raises several types for broken headers
        raise _corrupt(name, field, "tiff", str(exc)) from exc
    with tif:
        try:
            n_pages = len(tif.pages)
            page = tif.pages.first
        except Exception as exc:
            raise _corrupt(name, field, "tiff", str(exc)) from exc
        if n_pages > 1:
            raise ImageError(
                f"{name}: a multi-page TIFF ({n_pages} pages); send one single-page image per channel",
                field=field,
                code="multi_page",
            )
        h, w = int(page.imagelength), int(page.imagewidth)
        _check_size((h, w), "tiff", name, field, max_pixels)
        if page.imagedepth > 1:
            raise ImageError(f"{name}: a 3-D (volume) TIFF; send one 2-D image", field=field, code="not_a_channel")
        if page.is_tiled:
            # A tile is a multiple of 16 and covers at most the image rounded up to 16: a larger one is a bomb.
            th, tw = int(page.tilelength), int(page.tilewidth)
            if th > -(-h // 16) * 16 or tw > -(-w // 16) * 16 or page.tiledepth > 1:
                raise ImageError(
                    f"{name}: TIFF tiles of {tw}x{th} are larger than the {w}x{h} image; re-save the file "
                    "(untiled, or tiles of 256x256)",
                    field=field,
                    code="corrupt_image",
                )
        extra = len(page.extrasamples)
        colour = int(page.samplesperpixel) - extra
        if colour not in (1, 3) or extra > 1 or (extra == 1 and int(page.extrasamples[0]) not in (1, 2)):
            raise ImageError(
                f"{name}: a TIFF with {page.samplesperpixel} samples per pixel; send a single-channel image "
                "(or an HPA website tinted RGB image)",
                field=field,
                code="not_a_channel",
            )
        bits = int(page.bitspersample)
        if int(page.sampleformat) != 1 or bits > 16:
            kind = {2: "signed integer", 3: "floating point"}.get(int(page.sampleformat), "unsigned integer")
            raise ImageError(
                f"{name}: {bits}-bit {kind} pixels are not supported; send 8- or 16-bit unsigned integer images",
                field=field,
                code="unsupported_depth",
            )
        try:
            # Pixels as stored: the Orientation tag is not applied (as for PNG and JPEG).
            img = page.asarray(maxworkers=1)
        except Exception as exc:
            raise _corrupt(name, field, "tiff", str(exc)) from exc
    if img.ndim == 3 and img.shape[2] == 2:  # grey + alpha
        img = img[:, :, 0]
    if img.shape[:2] != (h, w):
        raise _corrupt(name, field, "tiff", f"decoded {img.shape[1]}x{img.shape[0]}, header {w}x{h}")
    if img.dtype == bool or (img.dtype.kind == "u" and img.dtype.itemsize == 1 and bits < 8):
        img = img.astype(np.uint8)
    return img


def decode_channel(
    data: bytes,
    *,
    field: str | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Decode the bytes of one channel image into a 2-D array.

    Parameters
    ----------
    data : bytes
        A PNG (8- or 16-bit, grayscale or tinted colour), TIFF (8- or 16-bit) or
        JPEG file. Tinted 3-component files (HPA website JPEGs) are reduced by
        the maximum over the colour axis.
    field : str, optional
        Channel name, used in error messages.
    max_pixels : int, optional
        Largest accepted height x width, checked from the header before any
        pixel is decoded (a small compressed file can declare gigapixels).

    Returns
    -------
    numpy.ndarray
        Shape (H, W), dtype ``uint8`` or ``uint16``, values as stored.

    Raises
    ------
    ImageError
        Empty, truncated or corrupt data, an unsupported format or bit depth,
        an image over ``max_pixels``, or a colour image that is not an HPA tint.
    """
    name = field or "image"
    if not data:
        raise ImageError(f"{name}: the file is empty; upload the channel image itself", field=field, code="empty_file")
    fmt = image_format(data)
    if fmt == "bigtiff":
        raise ImageError(
            f"{name}: BigTIFF files are not supported; save the channel as a classic TIFF, PNG or JPEG",
            field=field,
            code="unsupported_format",
            status=415,
        )
    if fmt == "unknown":
        raise ImageError(
            f"{name}: not a PNG, TIFF or JPEG file (unrecognised header); send the channel as PNG, TIFF or JPEG",
            field=field,
            code="not_an_image",
            status=415,
        )
    decode = {"png": _decode_png, "jpeg": _decode_jpeg, "tiff": _decode_tiff}[fmt]
    img = decode(data, name, field, max_pixels)
    if img.dtype not in (np.uint8, np.uint16):
        raise ImageError(
            f"{name}: pixel type {img.dtype} is not supported; send 8- or 16-bit unsigned integer images",
            field=field,
            code="unsupported_depth",
        )
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[:, :, 0]
        elif img.shape[2] in (3, 4):
            img = _reduce_colour(img, field)
        else:
            raise ImageError(
                f"{name}: {img.shape[2]} colour components; send a single-channel image",
                field=field,
                code="not_a_channel",
            )
    elif img.ndim != 2:
        raise ImageError(f"{name}: unexpected image layout {img.shape}", field=field, code="not_a_channel")
    return np.ascontiguousarray(img)


def stack_channels(channels: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> np.ndarray:
    """Stack four 2-D channels into one HxWx4 array in R, G, B, Y order.

    Parameters
    ----------
    channels : mapping or sequence
        ``{"red": ..., "green": ..., "blue": ..., "yellow": ...}`` or four arrays in that order.

    Returns
    -------
    numpy.ndarray
        Shape (H, W, 4). When the channels mix ``uint8`` and ``uint16``, the
        8-bit ones are scaled by 257 to ``uint16`` so all share one value range.

    Raises
    ------
    ImageError
        A channel is missing or the channels differ in size.
    """
    if isinstance(channels, Mapping):
        missing = [c for c in CHANNELS if c not in channels]
        if missing:
            raise ImageError(
                f"missing channel(s): {', '.join(missing)}", field=missing[0], code="missing_channel", status=422
            )
        arrays = [channels[c] for c in CHANNELS]
    else:
        arrays = list(channels)
        if len(arrays) != 4:
            raise ImageError(f"expected 4 channels, got {len(arrays)}", code="missing_channel")
    shapes = {c: a.shape for c, a in zip(CHANNELS, arrays, strict=True)}
    if len(set(shapes.values())) != 1:
        desc = ", ".join(f"{c} {s[1]}x{s[0]}" for c, s in shapes.items())
        raise ImageError(
            f"the four channels must have the same size; got {desc}",
            field=next(c for c in CHANNELS if shapes[c] != shapes["red"]) if len(set(shapes.values())) > 1 else None,
            code="size_mismatch",
        )
    if len({a.dtype for a in arrays}) > 1:
        arrays = [a.astype(np.uint16) * 257 if a.dtype == np.uint8 else a for a in arrays]
    if all(a.ndim == 2 and a.dtype in (np.uint8, np.uint16) for a in arrays):
        # OpenCV interleaves the four planes in one pass: numpy's stack is 2-8x slower (4.8 vs 0.6 ms at 2048²)
        return cv2.merge(arrays).reshape(*arrays[0].shape, 4)
    return np.ascontiguousarray(np.stack(arrays, axis=-1))


def to_unit255(image: np.ndarray) -> np.ndarray:
    """Bring an image to ``float32`` in 0-255 by the one Locus rule.

    Parameters
    ----------
    image : numpy.ndarray
        ``uint8`` (kept), ``uint16`` (divided by 257) or floating point (taken as 0-255 already).

    Returns
    -------
    numpy.ndarray
        ``float32`` array of the same shape.
    """
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    if image.dtype == np.uint16:
        return image.astype(np.float32) * UINT16_TO_255
    return image.astype(np.float32, copy=False)


_DECODE_POOL: ThreadPoolExecutor | None = None


def _decode_pool() -> ThreadPoolExecutor:
    global _DECODE_POOL
    if _DECODE_POOL is None:
        _DECODE_POOL = ThreadPoolExecutor(max_workers=len(CHANNELS), thread_name_prefix="locus-decode")
    return _DECODE_POOL


def decode_field(blobs: Mapping[str, bytes], *, max_pixels: int | None = None) -> np.ndarray:
    """Decode the four channel files of one field in parallel and stack them.

    The decoders release the GIL, so the four channels decode on as many cores.

    Parameters
    ----------
    blobs : mapping
        Channel name (red, green, blue, yellow) -> file bytes.
    max_pixels : int, optional
        Pixel limit passed to :func:`decode_channel`.

    Returns
    -------
    numpy.ndarray
        HxWx4, ``uint8`` or ``uint16``.

    Raises
    ------
    ImageError
        The first channel (in R, G, B, Y order) that could not be decoded, or channels that disagree.
    """
    futures = {c: _decode_pool().submit(decode_channel, blobs[c], field=c, max_pixels=max_pixels) for c in CHANNELS}
    return stack_channels({c: futures[c].result() for c in CHANNELS})


def load_field(paths: Mapping[str, str] | Sequence[str], *, max_pixels: int | None = None) -> np.ndarray:
    """Read the four channel files of one field of view from disk.

    Parameters
    ----------
    paths : mapping or sequence
        File paths by channel name, or four paths in R, G, B, Y order.
    max_pixels : int, optional
        Pixel limit passed to :func:`decode_channel`.

    Returns
    -------
    numpy.ndarray
        HxWx4, ``uint8`` or ``uint16``.
    """
    if not isinstance(paths, Mapping):
        paths = dict(zip(CHANNELS, paths, strict=True))
    blobs = {}
    for c in CHANNELS:
        with open(paths[c], "rb") as fh:
            blobs[c] = fh.read()
    return decode_field(blobs, max_pixels=max_pixels)
