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

import struct
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from locus.service.classes import CHANNELS

__all__ = [
    "ImageError",
    "decode_channel",
    "read_dimensions",
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


class ImageError(ValueError):
    """A channel image that cannot be used, with a message that says why and how to fix it.

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
        super().__init__(message)
        self.message = message
        self.field = field
        self.code = code
        self.status = status


def _png_dimensions(data: bytes) -> tuple[int, int] | None:
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return int(height), int(width)
    return None


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        return None
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if i + 4 > n:
            return None
        seg_len = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return int(height), int(width)
        i += 2 + seg_len
    return None


@dataclass(frozen=True)
class TiffInfo:
    """What the first image file directory (IFD) of a TIFF says, read without decoding pixels.

    Attributes
    ----------
    height, width : int or None
        ImageLength and ImageWidth.
    samples : int
        SamplesPerPixel (1 when absent).
    extra_samples : int
        Number of ExtraSamples (alpha and other non-colour samples).
    extra_kind : int
        The first ExtraSamples value: 0 unspecified data, 1 associated alpha, 2 unassociated alpha.
    bits : int or None
        BitsPerSample of the first sample.
    sample_format : int
        SampleFormat: 1 unsigned integer (default), 2 signed integer, 3 floating point.
    pages : int
        1, or 2 when a further IFD follows (a multi-page file).
    """

    height: int | None
    width: int | None
    samples: int = 1
    extra_samples: int = 0
    extra_kind: int = 0
    bits: int | None = None
    sample_format: int = 1
    pages: int = 1


_TIFF_TYPE_SIZE = {1: 1, 3: 2, 4: 4, 16: 8}


def _tiff_info(data: bytes) -> TiffInfo | None:
    """Parse the first IFD of a classic TIFF; None when it cannot be read."""
    if len(data) < 8 or data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    endian = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(endian + "I", data[4:8])
    if offset < 8 or offset + 2 > len(data):
        return None
    (count,) = struct.unpack(endian + "H", data[offset : offset + 2])
    tags: dict[int, tuple[int, int, int]] = {}  # tag -> (type, count, first value)
    for k in range(count):
        entry = offset + 2 + 12 * k
        if entry + 12 > len(data):
            return None
        tag, typ, n = struct.unpack(endian + "HHI", data[entry : entry + 8])
        size = _TIFF_TYPE_SIZE.get(typ)
        if size is None or n == 0:
            continue
        where = entry + 8
        if size * n > 4:  # the values live elsewhere in the file
            (where,) = struct.unpack(endian + "I", data[entry + 8 : entry + 12])
            if where + size > len(data):
                continue
        fmt = {1: "B", 3: "H", 4: "I", 16: "Q"}[typ]
        (value,) = struct.unpack(endian + fmt, data[where : where + size])
        tags[tag] = (typ, n, int(value))
    next_at = offset + 2 + 12 * count
    pages = 1
    if next_at + 4 <= len(data) and struct.unpack(endian + "I", data[next_at : next_at + 4])[0] != 0:
        pages = 2
    return TiffInfo(
        height=tags[257][2] if 257 in tags else None,
        width=tags[256][2] if 256 in tags else None,
        samples=tags[277][2] if 277 in tags else 1,
        extra_samples=tags[338][1] if 338 in tags else 0,
        extra_kind=tags[338][2] if 338 in tags else 0,
        bits=tags[258][2] if 258 in tags else None,
        sample_format=tags[339][2] if 339 in tags else 1,
        pages=pages,
    )


def _tiff_dimensions(data: bytes) -> tuple[int, int] | None:
    info = _tiff_info(data)
    if info is None or info.width is None or info.height is None:
        return None
    return info.height, info.width


def _check_tiff(data: bytes, name: str, field: str | None) -> None:
    """Refuse, from the header, TIFFs that OpenCV would decode only in part or not as one channel."""
    info = _tiff_info(data)
    if info is None:
        return
    if info.pages > 1:
        raise ImageError(
            f"{name}: a multi-page TIFF; only its first page would be read. Send one single-page image per channel",
            field=field,
            code="multi_page",
        )
    colour = info.samples - info.extra_samples
    if colour not in (1, 3) or info.extra_samples > 1 or (info.extra_samples == 1 and info.extra_kind not in (1, 2)):
        raise ImageError(
            f"{name}: a TIFF with {info.samples} samples per pixel; send a single-channel image "
            "(or an HPA website tinted RGB image)",
            field=field,
            code="not_a_channel",
        )
    if info.sample_format != 1 or (info.bits is not None and info.bits > 16):
        kind = {2: "signed integer", 3: "floating point"}.get(info.sample_format, "unsigned integer")
        raise ImageError(
            f"{name}: {info.bits}-bit {kind} pixels are not supported; send 8- or 16-bit unsigned integer images",
            field=field,
            code="unsupported_depth",
        )


def read_dimensions(data: bytes) -> tuple[str, tuple[int, int] | None]:
    """Read the format and (height, width) from a file header without decoding pixels.

    Parameters
    ----------
    data : bytes
        The file's bytes (only the header is read).

    Returns
    -------
    format : str
        ``"png"``, ``"jpeg"``, ``"tiff"`` or ``"unknown"``.
    shape : tuple of int or None
        (height, width) as the header declares it, or None when it cannot be read.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png", _png_dimensions(data)
    if data[:2] == b"\xff\xd8":
        return "jpeg", _jpeg_dimensions(data)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff", _tiff_dimensions(data)
    return "unknown", None


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
    reduced = img.max(axis=2)
    flat = img.reshape(-1, 3)
    peak = float(reduced.max()) if reduced.size else 0.0
    if peak > 0:
        step = max(1, flat.shape[0] // 200_000)
        sample = flat[::step].astype(np.float32)
        bright = sample[sample.max(axis=1) > 0.2 * peak]
        if bright.shape[0] >= 16:
            unit = bright / np.linalg.norm(bright, axis=1, keepdims=True)
            mean = unit.mean(axis=0)
            mean /= np.linalg.norm(mean)
            coherence = float((unit @ mean).mean())
            if coherence < _TINT_COHERENCE:
                raise ImageError(
                    f"{field or 'image'}: a colour image whose pixels have different hues (colour coherence "
                    f"{coherence:.2f} < {_TINT_COHERENCE}); send one grayscale image per channel, or an HPA "
                    "website tinted JPEG",
                    field=field,
                    code="not_a_channel",
                )
    return reduced


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
    fmt, shape = read_dimensions(data)
    if fmt == "unknown" and data[:4] in (b"II+\x00", b"MM\x00+"):
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
    if shape is not None and max_pixels is not None and shape[0] * shape[1] > max_pixels:
        raise ImageError(
            f"{name}: declared size {shape[1]}x{shape[0]} has {shape[0] * shape[1]} pixels, over the limit "
            f"of {max_pixels}; downscale the image or raise LOCUS_MAX_IMAGE_PIXELS",
            field=field,
            code="image_too_large",
            status=413,
        )
    if shape is not None and (shape[0] == 0 or shape[1] == 0):
        raise ImageError(f"{name}: the header declares a zero-sized image", field=field, code="corrupt_image")
    if shape is None:
        # Without a readable size the pixel limit cannot be checked before decoding: refuse.
        raise ImageError(
            f"{name}: the {fmt.upper()} header is truncated or corrupt (no image size found)",
            field=field,
            code="corrupt_image",
        )
    if fmt == "tiff":
        _check_tiff(data, name, field)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # pragma: no cover - OpenCV raises only on exotic input
        raise ImageError(
            f"{name}: the {fmt.upper()} data could not be decoded ({exc})", field=field, code="corrupt_image"
        ) from exc
    if img is None or img.size == 0:
        raise ImageError(
            f"{name}: the {fmt.upper()} data is truncated or corrupt and could not be decoded",
            field=field,
            code="corrupt_image",
        )
    if max_pixels is not None and img.shape[0] * img.shape[1] > max_pixels:
        raise ImageError(
            f"{name}: {img.shape[1]}x{img.shape[0]} pixels is over the limit of {max_pixels}",
            field=field,
            code="image_too_large",
            status=413,
        )
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
