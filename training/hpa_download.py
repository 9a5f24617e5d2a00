"""``locus hpa-download``: public HPA images -> the Kaggle layout that ``locus train`` reads.

Usage::

    locus hpa-download kaggle_2021.tsv --out data/hpa-public --kaggle-cell-lines --workers 16
    locus hpa-download prefixes.txt --out data/x --base-url http://mirror.local/hpa

Input is the index the Kaggle 2021 participants used, ``kaggle_2021.tsv`` (comma- or
tab-separated despite its name; columns ``Image`` (a URL prefix such as
``https://images.proteinatlas.org/10005/921_B9_1``), ``Label`` (HPA location names),
``Cellline``, ``in_trainset``, ``Label_idx`` (``|``-separated class ids)), or a text
file with one prefix per line.

For every selected field and channel the downloader fetches ``{prefix}_{color}.jpg``
(a tinted 8-bit JPEG) and, where that is missing or unusable, ``{prefix}_{color}.tif.gz``
(``--prefer tif`` reverses the order). A tinted JPEG becomes one channel by taking the
channel's own colour plane (red R, green G, blue B, yellow the larger of R and G) after
the service's own decoder (:func:`locus.service.imaging.decode_channel`) has accepted
the file; a TIFF is kept as stored (8- or 16-bit). Every channel is written as
``{out}/{ID}_{color}.png`` (``ID`` = ``{folder}_{name}`` of the prefix, e.g.
``10005_921_B9_1``) and ``{out}/train.csv`` lists the labelled fields.

Robustness
----------
* bounded parallelism (``--workers`` threads, one field each);
* retries with exponential backoff and jitter on 5xx, 408, 429, timeouts, resets and
  truncated bodies (``Retry-After`` honoured, capped); 404 and other 4xx are final;
* every file is verified: the JPEG must be complete (end-of-image marker) and decode, the
  TIFF must decompress and decode, the PNG written must decode back to the same pixels;
* atomic writes (temporary file + :func:`os.replace`): a killed run leaves no half file;
* resumable: channels already on disk are not fetched again, ``train.csv`` is merged;
* failures are listed at the end and in ``{out}/failures.csv``; ``{out}/download.json``
  holds the run's numbers.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import logging
import os
import random
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np

from locus.service.classes import CHANNELS, format_label, parse_label
from locus.service.config import MAX_IMAGE_PIXELS
from locus.service.imaging import ImageError, decode_channel, image_format
from locus.training.hpa_locations import (
    KAGGLE_CELL_LINES,
    locations_to_classes,
    parse_class_filter,
    split_locations,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "IndexRow",
    "FetchError",
    "Fetcher",
    "DownloadReport",
    "read_index",
    "select_rows",
    "field_id",
    "resolve_url",
    "tinted_jpeg_channel",
    "tiff_gz_channel",
    "download",
    "configure_parser",
    "run",
]

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://images.proteinatlas.org"
USER_AGENT = "locus-hpa-download/1 (Python urllib)"
MAX_FILE_BYTES = 256 * 1024 * 1024
"""Largest accepted download (a 3072² 16-bit TIFF gzips to ~20 MB)."""
PNG_COMPRESSION = 3
"""zlib level of the written PNGs: 3 is ~1.2x faster than 6 for ~5% more bytes (2048² channel)."""
TMP_SUFFIX = ".locus-tmp"

#: RGB planes of each channel's tint: red in R, green in G, blue in B, yellow in R and G.
_TINT_PLANES: dict[str, tuple[int, ...]] = {"red": (0,), "green": (1,), "blue": (2,), "yellow": (0, 1)}


# ---------------------------------------------------------------------------------------------- index


@dataclass(frozen=True)
class IndexRow:
    """One field of the index.

    Attributes
    ----------
    id : str
        Field ID (``{folder}_{name}`` of the prefix).
    prefix : str
        The ``Image`` value as given (URL or path without ``_{color}.{ext}``).
    labels : tuple of int or None
        Class ids (``Label_idx``, else mapped from ``Label``); None when unknown.
    locations : str
        The HPA location names (``Label``) as given.
    cell_line : str
        ``Cellline`` (empty when absent).
    in_trainset : bool
        The field is already in the Kaggle 2021 training set.
    unmapped : tuple of str
        Location names the 19-class task has no class for.
    """

    id: str
    prefix: str
    labels: tuple[int, ...] | None
    locations: str = ""
    cell_line: str = ""
    in_trainset: bool = False
    unmapped: tuple[str, ...] = ()


def field_id(prefix: str) -> str:
    """The field ID of an image prefix: its last two path parts joined by ``_``.

    Parameters
    ----------
    prefix : str
        E.g. ``https://images.proteinatlas.org/10005/921_B9_1``.

    Returns
    -------
    str
        E.g. ``10005_921_B9_1`` (the well name alone repeats across antibodies).

    Raises
    ------
    ValueError
        An empty prefix.
    """
    path = urlsplit(prefix.strip()).path if "://" in prefix else prefix.strip()
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    if not parts:
        raise ValueError(f"empty image prefix {prefix!r}")
    return "_".join(parts[-2:])


def resolve_url(prefix: str, base_url: str | None = None) -> str:
    """The URL of a prefix, on ``base_url`` when given.

    Parameters
    ----------
    prefix : str
        A full URL (``https://host/10005/921_B9_1``) or a path (``10005/921_B9_1``).
    base_url : str, optional
        Replaces the scheme, host and any leading path of the prefix's server; the
        prefix's own path is appended. Default: the prefix as is, or :data:`DEFAULT_BASE_URL`
        for a bare path.

    Returns
    -------
    str
        The URL without the ``_{color}.{ext}`` suffix.
    """
    prefix = prefix.strip()
    parts = urlsplit(prefix)
    if parts.scheme and parts.netloc:
        if base_url is None:
            return prefix
        path = parts.path
    else:
        path = "/" + prefix.lstrip("/")
    return (base_url or DEFAULT_BASE_URL).rstrip("/") + path


def _truthy(text: str) -> bool:
    return str(text).strip().lower() in {"true", "1", "yes", "y", "t"}


def read_index(path: str | os.PathLike) -> list[IndexRow]:
    """Read ``kaggle_2021.tsv`` (or a file of image prefixes, one per line).

    Parameters
    ----------
    path : path-like
        A table with an ``Image`` column (comma- or tab-separated; ``Label``, ``Cellline``,
        ``in_trainset``, ``Label_idx`` optional), or plain lines of prefixes (blank lines and
        ``#`` comments ignored).

    Returns
    -------
    list of IndexRow
        In file order; labels from ``Label_idx`` when it is filled in, else from ``Label``
        through :data:`locus.training.hpa_locations.LOCATION_CLASSES`.

    Raises
    ------
    ValueError
        A bad ``Label_idx`` (with the line number).
    """
    text = Path(path).read_text(encoding="utf-8-sig")
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    delimiter = "\t" if "\t" in first else ","
    header = [h.strip() for h in next(csv.reader([first], delimiter=delimiter))] if first else []
    rows: list[IndexRow] = []
    if "Image" not in header:
        for line in lines:
            prefix = line.split("#", 1)[0].strip()
            if prefix:
                rows.append(IndexRow(id=field_id(prefix), prefix=prefix, labels=None))
        return rows
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    reader.fieldnames = [f.strip() for f in reader.fieldnames or []]
    for rec in reader:
        prefix = (rec.get("Image") or "").strip()
        if not prefix:
            continue
        names = split_locations(rec.get("Label") or "")
        mapped, unmapped = locations_to_classes(names)
        idx_text = (rec.get("Label_idx") or "").strip()
        if idx_text and idx_text.lower() != "nan":
            try:
                labels: tuple[int, ...] | None = tuple(parse_label(idx_text.replace(",", "|").replace(".0", "")))
            except ValueError as exc:
                raise ValueError(f"{path}:{reader.line_num}: Label_idx {idx_text!r}: {exc}") from exc
        else:
            labels = tuple(mapped) if mapped else None
        rows.append(
            IndexRow(
                id=field_id(prefix),
                prefix=prefix,
                labels=labels,
                locations=",".join(names),
                cell_line=(rec.get("Cellline") or "").strip(),
                in_trainset=_truthy(rec.get("in_trainset") or ""),
                unmapped=tuple(unmapped),
            )
        )
    return rows


def select_rows(
    rows: Iterable[IndexRow],
    *,
    cell_lines: Iterable[str] | None = None,
    classes: Iterable[int] | None = None,
    include_trainset: bool = False,
    require_labels: bool = True,
    limit: int | None = None,
) -> tuple[list[IndexRow], Counter]:
    """Filter the index.

    Parameters
    ----------
    rows : iterable of IndexRow
        The index.
    cell_lines : iterable of str, optional
        Keep only these cell lines (case-insensitive).
    classes : iterable of int, optional
        Keep only fields with at least one of these classes.
    include_trainset : bool
        Keep fields already in the Kaggle training set (dropped by default: they are
        in the competition download).
    require_labels : bool
        Drop fields without class labels (``locus train`` needs them).
    limit : int, optional
        Keep at most this many (after filtering).

    Returns
    -------
    rows : list of IndexRow
        The selection, first occurrence of each ID only.
    dropped : collections.Counter
        Why the others were dropped.
    """
    lines = {c.casefold() for c in cell_lines} if cell_lines else None
    wanted = set(classes) if classes else None
    out: list[IndexRow] = []
    seen: set[str] = set()
    dropped: Counter = Counter()
    for row in rows:
        if row.in_trainset and not include_trainset:
            dropped["in Kaggle train set"] += 1
        elif require_labels and not row.labels:
            dropped["no class label"] += 1
        elif lines is not None and row.cell_line.casefold() not in lines:
            dropped["cell line"] += 1
        elif wanted is not None and not wanted.intersection(row.labels or ()):
            dropped["label filter"] += 1
        elif row.id in seen:
            dropped["duplicate ID"] += 1
        elif limit is not None and len(out) >= limit:
            dropped["over --limit"] += 1
        else:
            seen.add(row.id)
            out.append(row)
    return out, dropped


# ---------------------------------------------------------------------------------------------- HTTP


class FetchError(Exception):
    """A download that failed.

    Parameters
    ----------
    message : str
        What happened (``"HTTP 404"``, ``"timed out"``, ``"truncated: 100 of 2000 bytes"``).
    retryable : bool
        Whether another attempt may succeed.
    retry_after : float, optional
        Seconds the server asked to wait (``Retry-After``).
    """

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


class Fetcher:
    """GET with a per-read timeout, an overall deadline, retries and backoff (standard library only).

    Parameters
    ----------
    timeout : float
        Seconds to wait for the connection and for each read.
    retries : int
        Further attempts after a retryable failure.
    backoff : float
        First wait in seconds; doubled on each retry, with +-25% jitter.
    max_backoff : float
        Longest wait (also caps ``Retry-After``).
    max_bytes : int
        Largest accepted body.
    sleep : callable
        The waiting function (tests pass a fast one).
    """

    def __init__(
        self,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        max_bytes: int = MAX_FILE_BYTES,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_bytes = int(max_bytes)
        self.sleep = sleep
        self._lock = threading.Lock()
        self.stats: Counter = Counter()
        self._opener = urllib.request.build_opener()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def get_once(self, url: str) -> bytes:
        """One GET; raises :class:`FetchError` on anything but a complete 200 body.

        Parameters
        ----------
        url : str
            The URL.

        Returns
        -------
        bytes
            The body.
        """
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
        deadline = time.monotonic() + 10 * self.timeout
        try:
            with self._opener.open(request, timeout=self.timeout) as resp:
                declared = resp.headers.get("Content-Length")
                expected = int(declared) if declared and declared.isdigit() else None
                if expected is not None and expected > self.max_bytes:
                    raise FetchError(f"{expected} bytes is over the {self.max_bytes} limit", retryable=False)
                buf = bytearray()
                while True:
                    chunk = resp.read(1 << 16)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > self.max_bytes:
                        raise FetchError(f"body over the {self.max_bytes}-byte limit", retryable=False)
                    if time.monotonic() > deadline:
                        raise FetchError(f"timed out (slower than {10 * self.timeout:.0f} s in all)", retryable=True)
                if expected is not None and len(buf) != expected:
                    raise FetchError(f"truncated: {len(buf)} of {expected} bytes", retryable=True)
                return bytes(buf)
        except FetchError:
            raise
        except urllib.error.HTTPError as exc:
            retry = exc.code in _RETRY_STATUS
            after = _retry_after(exc.headers.get("Retry-After")) if exc.headers else None
            exc.close()
            raise FetchError(f"HTTP {exc.code}", retryable=retry, retry_after=after) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise FetchError("timed out", retryable=True) from None
            raise FetchError(f"connection failed ({reason})", retryable=True) from None
        except TimeoutError:
            raise FetchError("timed out", retryable=True) from None
        except http.client.IncompleteRead as exc:
            raise FetchError(
                f"truncated: {len(exc.partial)} bytes then the connection closed", retryable=True
            ) from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            raise FetchError(f"connection error ({type(exc).__name__}: {exc})", retryable=True) from None

    def get(self, url: str) -> bytes:
        """GET with retries on retryable failures.

        Parameters
        ----------
        url : str
            The URL.

        Returns
        -------
        bytes
            The complete body.

        Raises
        ------
        FetchError
            The last failure, its message saying how many attempts were made.
        """
        attempt = 0
        while True:
            self._count("requests")
            try:
                data = self.get_once(url)
                self._count("bytes", len(data))
                return data
            except FetchError as exc:
                if not exc.retryable or attempt >= self.retries:
                    if attempt:
                        exc.message = f"{exc.message} (after {attempt + 1} attempts)"
                        exc.args = (exc.message,)
                    raise
                self._count("retries")
                wait_s = min(self.max_backoff, self.backoff * (2**attempt)) * random.uniform(0.75, 1.25)
                if exc.retry_after is not None:
                    wait_s = max(wait_s, min(exc.retry_after, self.max_backoff))
                logger.debug("%s: %s; retry %d in %.2f s", url, exc.message, attempt + 1, wait_s)
                self.sleep(wait_s)
                attempt += 1


# ---------------------------------------------------------------------------------------------- conversion


def _jpeg_complete(data: bytes) -> bool:
    """True when the JPEG ends with its end-of-image marker (a truncated JPEG still decodes, as grey)."""
    return b"\xff\xd9" in data[-1024:]


def tinted_jpeg_to_channel(img: np.ndarray, color: str) -> np.ndarray:
    """Reduce a decoded tinted HPA JPEG (RGB order) to its channel's own colour.

    Parameters
    ----------
    img : numpy.ndarray
        (H, W, 3) RGB or (H, W) grey ``uint8``.
    color : str
        ``red`` (plane R), ``green`` (G), ``blue`` (B) or ``yellow`` (max of R and G).

    Returns
    -------
    numpy.ndarray
        (H, W) ``uint8``. A grey image (equal planes) gives the same values as any plane.

    Raises
    ------
    ImageError
        The image's colour is not the channel's tint: one of its own planes holds under half
        the brightness of the brightest plane (a file of another channel). Images darker
        than a mean of 1 are not judged.
    """
    if img.ndim == 2:
        return img
    img = np.ascontiguousarray(img[:, :, :3])
    sums = cv2.sumElems(img)[:3]
    planes = _TINT_PLANES[color]
    top = max(sums)
    if top > img.shape[0] * img.shape[1] and min(sums[p] for p in planes) < 0.5 * top:
        raise ImageError(
            f"{color}: the JPEG is not tinted {color} (plane brightness R, G, B = "
            f"{', '.join(f'{x / (img.shape[0] * img.shape[1]):.1f}' for x in sums)})",
            field=color,
            code="wrong_tint",
        )
    split = cv2.split(img)
    own = split[planes[0]] if len(planes) == 1 else cv2.max(split[planes[0]], split[planes[1]])
    return np.ascontiguousarray(own)


def tinted_jpeg_channel(data: bytes, color: str, *, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode a tinted HPA website JPEG into its channel.

    The service's decoder (:func:`locus.service.imaging.decode_channel`) must accept the
    file first (complete header, size limit, decodable, a single tint); then the channel's
    own colour plane is taken (:func:`tinted_jpeg_to_channel`), which keeps JPEG colour
    noise of the other planes out.

    Parameters
    ----------
    data : bytes
        The JPEG file.
    color : str
        The channel.
    max_pixels : int, optional
        Largest height x width.

    Returns
    -------
    numpy.ndarray
        (H, W) ``uint8``.

    Raises
    ------
    ImageError
        A truncated (no end-of-image marker), corrupt or wrongly tinted JPEG.
    """
    import simplejpeg

    if image_format(data) != "jpeg":
        raise ImageError(f"{color}: not a JPEG file", field=color, code="not_an_image")
    if not _jpeg_complete(data):
        raise ImageError(f"{color}: the JPEG is truncated (no end-of-image marker)", field=color, code="corrupt_image")
    decode_channel(data, field=color, max_pixels=max_pixels)  # the service's checks: size, structure, one tint
    # the same decoder (libjpeg-turbo through simplejpeg, strict), keeping the colour planes
    if simplejpeg.decode_jpeg_header(data)[2] == "Gray":
        return simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True)[:, :, 0]
    img = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    return tinted_jpeg_to_channel(img, color)


def tiff_gz_channel(data: bytes, color: str, *, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decompress and decode a gzipped TIFF channel, as stored (8- or 16-bit).

    Parameters
    ----------
    data : bytes
        The ``.tif.gz`` file.
    color : str
        The channel (for messages).
    max_pixels : int, optional
        Largest height x width; also bounds the decompressed size.

    Returns
    -------
    numpy.ndarray
        (H, W) ``uint8`` or ``uint16``.

    Raises
    ------
    ImageError
        Not gzip, truncated, over the size limit, or not a decodable single-channel TIFF.
    """
    limit = 2 * 3 * (max_pixels or MAX_IMAGE_PIXELS) + (1 << 20)
    try:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        raw = inflater.decompress(data, limit)
        if inflater.unconsumed_tail:
            raise ImageError(f"{color}: the TIFF inflates to over {limit} bytes", field=color, code="image_too_large")
        if not inflater.eof:
            raise ImageError(f"{color}: the gzip stream is truncated", field=color, code="corrupt_image")
    except zlib.error as exc:
        raise ImageError(f"{color}: not a valid gzip file ({exc})", field=color, code="corrupt_image") from exc
    if image_format(raw) != "tiff":
        raise ImageError(f"{color}: the .tif.gz does not hold a TIFF", field=color, code="not_an_image")
    return decode_channel(raw, field=color, max_pixels=max_pixels)


_CONVERTERS: dict[str, Callable[..., np.ndarray]] = {"jpg": tinted_jpeg_channel, "tif.gz": tiff_gz_channel}


# ---------------------------------------------------------------------------------------------- files


def encode_png(channel: np.ndarray) -> bytes:
    """Encode a channel as PNG and check it decodes back to the same pixels.

    Parameters
    ----------
    channel : numpy.ndarray
        (H, W) ``uint8`` or ``uint16``.

    Returns
    -------
    bytes
        The PNG file (8- or 16-bit grayscale).

    Raises
    ------
    RuntimeError
        The round trip differs (never expected).
    """
    ok, buf = cv2.imencode(".png", channel, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    back = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if back is None or back.dtype != channel.dtype or not np.array_equal(back, channel):  # pragma: no cover
        raise RuntimeError("the PNG written does not decode to the downloaded pixels")
    return buf.tobytes()


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that it is either absent or complete: temporary file, then :func:`os.replace`.

    Parameters
    ----------
    path : Path
        Destination.
    data : bytes
        Contents.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _png_shape(path: Path) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR chunk."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if image_format(head) != "png" or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return int(height), int(width)


# ---------------------------------------------------------------------------------------------- download


@dataclass
class DownloadReport:
    """What a download run did.

    Attributes
    ----------
    selected : int
        Fields selected from the index.
    skipped : int
        Fields already complete on disk (nothing fetched).
    downloaded : int
        Fields completed by this run.
    failed : list of dict
        ``{"id", "image", "channel", "reason"}`` per failed field.
    channels : dict
        Channels written, by source format (``jpg``, ``tif.gz``).
    bytes : int
        Bytes downloaded (complete bodies).
    requests, retries : int
        HTTP requests made and retries among them.
    seconds : float
        Wall time.
    dropped : dict
        Index rows not selected, by reason.
    """

    selected: int = 0
    skipped: int = 0
    downloaded: int = 0
    failed: list[dict] = field(default_factory=list)
    channels: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        """Download throughput in MB/s (10^6 bytes)."""
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _FieldOutcome:
    id: str
    status: str  # "skipped", "downloaded", "failed"
    sources: dict[str, str] = field(default_factory=dict)
    channel: str | None = None
    reason: str | None = None


def _fetch_channel(
    fetcher: Fetcher, url: str, color: str, order: Sequence[str], max_pixels: int | None
) -> tuple[np.ndarray, str]:
    reasons = []
    for fmt in order:
        try:
            data = fetcher.get(f"{url}_{color}.{fmt}")
        except FetchError as exc:
            reasons.append(f"{fmt}: {exc.message}")
            continue
        try:
            return _CONVERTERS[fmt](data, color, max_pixels=max_pixels), fmt
        except ImageError as exc:
            reasons.append(f"{fmt}: {exc.message.removeprefix(f'{color}: ')}")
    raise FetchError("; ".join(reasons), retryable=False)


def _download_field(
    row: IndexRow, out: Path, fetcher: Fetcher, base_url: str | None, order: Sequence[str], max_pixels: int | None
) -> _FieldOutcome:
    paths = {c: out / f"{row.id}_{c}.png" for c in CHANNELS}
    todo = [c for c in CHANNELS if not paths[c].is_file()]
    if not todo:
        return _FieldOutcome(row.id, "skipped")
    url = resolve_url(row.prefix, base_url)
    arrays: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for color in todo:
        try:
            arrays[color], sources[color] = _fetch_channel(fetcher, url, color, order, max_pixels)
        except FetchError as exc:
            return _FieldOutcome(row.id, "failed", channel=color, reason=exc.message)
    shapes = {c: a.shape for c, a in arrays.items()}
    for c in CHANNELS:
        if c not in arrays:
            shapes[c] = _png_shape(paths[c])
    if len(set(shapes.values())) != 1:
        desc = ", ".join(f"{c} {s}" for c, s in shapes.items())
        return _FieldOutcome(row.id, "failed", channel=None, reason=f"channels differ in size: {desc}")
    for color, arr in arrays.items():
        write_atomic(paths[color], encode_png(arr))
    return _FieldOutcome(row.id, "downloaded", sources=sources)


def _write_train_csv(out: Path, rows: Sequence[IndexRow]) -> int:
    """Merge the complete, labelled fields of ``rows`` into ``out/train.csv``; returns the row count."""
    path = out / "train.csv"
    columns = ["ID", "Label", "Cellline", "Locations", "Image"]
    records: dict[str, dict[str, str]] = {}
    if path.is_file():
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            for name in reader.fieldnames or []:
                if name not in columns:
                    columns.append(name)
            for rec in reader:
                if rec.get("ID"):
                    records[rec["ID"]] = rec
    for row in rows:
        if row.labels and all((out / f"{row.id}_{c}.png").is_file() for c in CHANNELS):
            records[row.id] = {
                "ID": row.id,
                "Label": format_label(row.labels),
                "Cellline": row.cell_line,
                "Locations": row.locations,
                "Image": row.prefix,
            }
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for ident in sorted(records):
        writer.writerow(records[ident])
    write_atomic(path, buf.getvalue().encode("utf-8"))
    return len(records)


def _write_failures(out: Path, report: DownloadReport) -> None:
    path = out / "failures.csv"
    if not report.failed:
        if path.exists():
            path.unlink()
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["id", "image", "channel", "reason"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(report.failed)
    write_atomic(path, buf.getvalue().encode("utf-8"))


def download(
    rows: Sequence[IndexRow],
    out: str | os.PathLike,
    *,
    base_url: str | None = None,
    workers: int = 8,
    fetcher: Fetcher | None = None,
    prefer: str = "jpg",
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    progress: bool = True,
    flush_every: int = 200,
    dropped: dict[str, int] | None = None,
) -> DownloadReport:
    """Download fields into the Kaggle layout.

    Parameters
    ----------
    rows : sequence of IndexRow
        The fields (see :func:`read_index` and :func:`select_rows`).
    out : path-like
        Output folder: ``{ID}_{color}.png``, ``train.csv``, ``failures.csv``, ``download.json``.
    base_url : str, optional
        Server to fetch from instead of the prefixes' own (see :func:`resolve_url`).
    workers : int
        Fields fetched at once (threads).
    fetcher : Fetcher, optional
        HTTP settings (timeout, retries, backoff); default :class:`Fetcher()`.
    prefer : {"jpg", "tif"}
        Format tried first; the other is the fallback.
    max_pixels : int, optional
        Largest height x width of a channel.
    progress : bool
        Show a progress bar.
    flush_every : int
        Rewrite ``train.csv`` after this many completed fields (so an interrupted run keeps a usable one).
    dropped : dict, optional
        Index rows not selected, by reason (recorded in ``download.json``).

    Returns
    -------
    DownloadReport
        Counts, bytes, time and the failures.
    """
    from tqdm import tqdm

    if prefer not in ("jpg", "tif"):
        raise ValueError(f"prefer must be 'jpg' or 'tif', not {prefer!r}")
    order = ("jpg", "tif.gz") if prefer == "jpg" else ("tif.gz", "jpg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f".*{TMP_SUFFIX}"):  # left by a killed run
        stale.unlink(missing_ok=True)
    fetcher = fetcher or Fetcher()
    before = Counter(fetcher.stats)
    report = DownloadReport(selected=len(rows), dropped=dict(dropped or {}))
    channels: Counter = Counter()
    t0 = time.perf_counter()
    bar = tqdm(total=len(rows), desc="hpa-download", unit="field", disable=not progress)
    workers = max(1, int(workers))
    done_since_flush = 0
    pending = iter(rows)
    in_flight: dict[Future, IndexRow] = {}
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="locus-dl") as pool:

            def submit_next() -> bool:
                row = next(pending, None)
                if row is None:
                    return False
                in_flight[pool.submit(_download_field, row, out, fetcher, base_url, order, max_pixels)] = row
                return True

            for _ in range(2 * workers):
                if not submit_next():
                    break
            try:
                while in_flight:
                    finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                    for fut in finished:
                        row = in_flight.pop(fut)
                        try:
                            outcome = fut.result()
                        except Exception as exc:  # an unexpected error fails this field only
                            logger.exception("%s: unexpected error", row.id)
                            outcome = _FieldOutcome(row.id, "failed", reason=f"{type(exc).__name__}: {exc}")
                        if outcome.status == "skipped":
                            report.skipped += 1
                        elif outcome.status == "downloaded":
                            report.downloaded += 1
                            channels.update(outcome.sources.values())
                            done_since_flush += 1
                        else:
                            report.failed.append(
                                {
                                    "id": row.id,
                                    "image": row.prefix,
                                    "channel": outcome.channel,
                                    "reason": outcome.reason,
                                }
                            )
                        bar.update()
                        submit_next()
                    if done_since_flush >= flush_every:
                        _write_train_csv(out, rows)
                        done_since_flush = 0
            except BaseException:  # Ctrl-C or a bug: queued fields are not started, running ones finish
                for fut in in_flight:
                    fut.cancel()
                raise
    finally:
        bar.close()
        _write_train_csv(out, rows)
        stats = fetcher.stats - before
        report.bytes = int(stats["bytes"])
        report.requests = int(stats["requests"])
        report.retries = int(stats["retries"])
        report.channels = dict(channels)
        report.seconds = round(time.perf_counter() - t0, 3)
        report.failed.sort(key=lambda f: f["id"])
        _write_failures(out, report)
        summary = {**asdict(report), "mb_per_s": round(report.mb_per_s, 3)}
        write_atomic(out / "download.json", (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return report


# ---------------------------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``hpa-download`` options."""
    parser.add_argument(
        "index",
        help="kaggle_2021.tsv (columns Image, Label, Cellline, in_trainset, Label_idx) "
        "or a text file of image prefixes, one per line",
    )
    parser.add_argument("--out", required=True, help="output folder (Kaggle layout: {ID}_{color}.png + train.csv)")
    parser.add_argument(
        "--base-url",
        default=None,
        help=f"fetch from this server instead (default: the prefixes' own; bare paths use {DEFAULT_BASE_URL})",
    )
    parser.add_argument("--cell-line", action="append", default=None, help="keep this cell line (repeatable)")
    parser.add_argument(
        "--kaggle-cell-lines", action="store_true", help="keep the 17 cell lines of the Kaggle 2021 training set"
    )
    parser.add_argument(
        "--label",
        action="append",
        default=None,
        help="keep fields with this class: id, class name or HPA location name (repeatable)",
    )
    parser.add_argument(
        "--include-trainset",
        action="store_true",
        help="also fetch fields that are in the Kaggle training set (skipped by default)",
    )
    parser.add_argument("--unlabelled", action="store_true", help="also fetch fields without class labels")
    parser.add_argument("--limit", type=int, default=None, help="fetch at most this many fields")
    parser.add_argument(
        "--prefer",
        choices=("jpg", "tif"),
        default="jpg",
        help="format tried first: jpg (tinted 8-bit, small) or tif (.tif.gz as acquired, large); "
        "the other is the fallback",
    )
    parser.add_argument("--workers", type=int, default=8, help="fields fetched at once (default 8)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per connect/read (default 30)")
    parser.add_argument("--retries", type=int, default=4, help="retries on 5xx, timeouts and resets (default 4)")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry wait in seconds, doubled each time")
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched and stop")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when any field failed (else only when all did)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``locus hpa-download``."""
    try:
        rows = read_index(args.index)
        classes = parse_class_filter(args.label) if args.label else None
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"locus hpa-download: {exc}\n")
        return 2
    if args.workers < 1 or args.retries < 0 or args.timeout <= 0:
        sys.stderr.write("locus hpa-download: --workers must be >= 1, --retries >= 0, --timeout > 0\n")
        return 2
    lines = list(args.cell_line or [])
    if args.kaggle_cell_lines:
        lines.extend(KAGGLE_CELL_LINES)
    selected, dropped = select_rows(
        rows,
        cell_lines=lines or None,
        classes=classes,
        include_trainset=args.include_trainset,
        require_labels=not args.unlabelled,
        limit=args.limit,
    )
    out = Path(args.out)
    present = sum(all((out / f"{r.id}_{c}.png").is_file() for c in CHANNELS) for r in selected)
    drop_text = ", ".join(f"{n} {why}" for why, n in dropped.most_common()) or "none"
    print(f"{len(rows)} index rows: {len(selected)} selected ({present} already in {out}); dropped: {drop_text}")
    if args.dry_run:
        per_class = Counter(c for r in selected for c in (r.labels or ()))
        print("fields per class: " + ", ".join(f"{c}:{per_class[c]}" for c in sorted(per_class)))
        print(f"to fetch: {len(selected) - present} fields, {4 * (len(selected) - present)} files")
        return 0
    fetcher = Fetcher(timeout=args.timeout, retries=args.retries, backoff=args.backoff)
    report = download(
        selected,
        out,
        base_url=args.base_url,
        workers=args.workers,
        fetcher=fetcher,
        prefer=args.prefer,
        progress=not args.quiet,
        dropped=dict(dropped),
    )
    print(
        f"{report.downloaded} fields downloaded, {report.skipped} already there, {len(report.failed)} failed; "
        f"{report.bytes / 1e6:.1f} MB in {report.seconds:.1f} s ({report.mb_per_s:.2f} MB/s), "
        f"{report.requests} requests ({report.retries} retries); channels by source: {report.channels}"
    )
    if report.failed:
        print(f"failed fields ({len(report.failed)}, also in {out / 'failures.csv'}; re-run to retry them):")
        for f in report.failed[:20]:
            print(f"  {f['id']} [{f['channel'] or '-'}]: {f['reason']}")
        if len(report.failed) > 20:
            print(f"  ... and {len(report.failed) - 20} more")
    if report.failed and (args.strict or report.downloaded + report.skipped == 0):
        return 1  # --strict, or nothing at all succeeded (a wrong --base-url, no network)
    return 0
