"""Hostile input: every kind gets its 4xx JSON error naming the problem and the field, and the service goes on.

In-process (TestClient) for the decoding and form cases; a real uvicorn process for
the cases that need real sockets: bodies over the limit while streaming (also
chunked, without Content-Length), clients that dribble their upload, and the
server's memory after decompression bombs.

Decisions documented here and in docs/OPERATIONS.md:

* Channels are decoded by content, not by the declared part content type: a PNG sent
  as ``text/plain`` is a PNG. File names are never used (non-ASCII and path-like names
  are harmless).
* PNG, TIFF (classic, single page, 8/16-bit unsigned, 1 or 3 colour samples) and
  JPEG are accepted; GIF, BMP, WebP and BigTIFF get 415.
* EXIF orientation is ignored: pixels are used as stored, so the four channels line up.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image

from locus.service.app import create_app
from locus.service.classes import CHANNELS
from locus.service.settings import Settings
from tests.conftest import png_bytes, png_uploads

MAX_UPLOAD = 2_000_000
MAX_REQUEST = 6_000_000

# ---------------------------------------------------------------------------------------------------------------
# Builders of hostile files


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, idat: bytes | None = None, bit_depth: int = 8) -> bytes:
    """A PNG whose IHDR declares width x height, with the given IDAT payload (none: header only)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    body = _chunk(b"IHDR", ihdr)
    if idat is not None:
        body += _chunk(b"IDAT", idat)
    return b"\x89PNG\r\n\x1a\n" + body + _chunk(b"IEND", b"")


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A real decompression bomb: a few hundred KB of deflate that inflates to width x height zero pixels."""
    row = b"\x00" * (1 + width)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(min(height, 2000))]
    parts.append(comp.flush())
    return png_declaring(width, height, b"".join(parts))


def tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, **kwargs)
    return buf.getvalue()


def tiff_declaring(width: int, height: int) -> bytes:
    """A small TIFF whose ImageWidth/ImageLength tags are rewritten to width x height."""
    data = bytearray(tiff_bytes(np.zeros((16, 16), np.uint8)))
    (offset,) = struct.unpack("<I", data[4:8])
    (count,) = struct.unpack("<H", data[offset : offset + 2])
    for k in range(count):
        entry = offset + 2 + 12 * k
        tag, typ = struct.unpack("<HH", data[entry : entry + 4])
        if tag in (256, 257):
            value = width if tag == 256 else height
            data[entry + 2 : entry + 4] = struct.pack("<H", 4)  # LONG
            data[entry + 8 : entry + 12] = struct.pack("<I", value)
    return bytes(data)


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(cv2.imencode(".jpg", np.zeros((16, 16), np.uint8))[1].tobytes())
    i = data.find(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def pil_bytes(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def corrupt_middle(data: bytes, n: int = 64) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes((b ^ 0x5A) for b in data[mid : mid + n]) + data[mid + n :]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# ---------------------------------------------------------------------------------------------------------------
# In-process cases


@pytest.fixture(scope="module")
def client(test_model_dir: Path) -> Iterator[TestClient]:
    settings = Settings(
        model_dir=test_model_dir,
        providers=["CPUExecutionProvider"],
        log_json=True,
        log_level="warning",
        max_upload_bytes=MAX_UPLOAD,
        max_request_bytes=MAX_REQUEST,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def field8(synthetic_field: np.ndarray) -> np.ndarray:
    return (synthetic_field // 257).astype(np.uint8)


@pytest.fixture(scope="module")
def valid(synthetic_field: np.ndarray) -> dict:
    return png_uploads(synthetic_field)


def _with(valid: dict, channel: str, data: bytes, name: str = "x.bin", ctype: str = "application/octet-stream"):
    return {**valid, channel: (name, data, ctype)}


Case = tuple[Callable[[dict, np.ndarray], object], int, str, str | None]

#: name -> (make files from (valid files, 8-bit field), status, error code, field)
CASES: dict[str, Case] = {
    "png_bomb_declared_30000": (lambda v, f: _with(v, "red", png_bomb()), 413, "image_too_large", "red"),
    "png_bomb_header_ok_idat_junk": (
        lambda v, f: _with(v, "green", png_declaring(5000, 5000, b"junk" * 256)),
        422,
        "corrupt_image",
        "green",
    ),
    "png_header_only": (lambda v, f: _with(v, "blue", png_declaring(384, 448)), 422, "corrupt_image", "blue"),
    "png_zero_size": (lambda v, f: _with(v, "blue", png_declaring(0, 0)), 422, "corrupt_image", "blue"),
    "tiff_bomb_declared_60000": (
        lambda v, f: _with(v, "yellow", tiff_declaring(60000, 60000)),
        413,
        "image_too_large",
        "yellow",
    ),
    "jpeg_declared_65000": (lambda v, f: _with(v, "red", jpeg_declaring(65000, 65000)), 413, "image_too_large", "red"),
    "truncated_png": (lambda v, f: _with(v, "red", v["red"][1][: len(v["red"][1]) // 2]), 422, "corrupt_image", "red"),
    "truncated_jpeg": (
        lambda v, f: _with(v, "green", cv2.imencode(".jpg", f[:, :, 1])[1].tobytes()[:400]),
        422,
        "corrupt_image",
        "green",
    ),
    "truncated_tiff": (lambda v, f: _with(v, "blue", tiff_bytes(f[:, :, 2])[:300]), 422, "corrupt_image", "blue"),
    "truncated_tiff_header": (lambda v, f: _with(v, "blue", b"II*\x00\x08\x00"), 422, "corrupt_image", "blue"),
    "corrupt_png_middle": (
        lambda v, f: _with(v, "yellow", corrupt_middle(v["yellow"][1])),
        422,
        "corrupt_image",
        "yellow",
    ),
    "zero_bytes": (lambda v, f: _with(v, "green", b""), 422, "empty_file", "green"),
    "text_not_image": (lambda v, f: _with(v, "green", b"%PDF-1.4 hello"), 415, "not_an_image", "green"),
    "size_mismatch": (
        lambda v, f: _with(v, "yellow", png_bytes(np.zeros((100, 120), np.uint8))),
        422,
        "size_mismatch",
        "yellow",
    ),
    "one_channel_transposed": (
        lambda v, f: _with(v, "blue", png_bytes(np.ascontiguousarray(f[:, :, 2].T))),
        422,
        "size_mismatch",
        "blue",
    ),
    "two_channel_tiff": (
        lambda v, f: _with(v, "red", tiff_bytes(f[:, :, :2], photometric="minisblack", planarconfig="contig")),
        422,
        "not_a_channel",
        "red",
    ),
    "five_channel_tiff": (
        lambda v, f: _with(
            v,
            "red",
            tiff_bytes(np.concatenate([f, f[:, :, :1]], axis=2), photometric="minisblack", planarconfig="contig"),
        ),
        422,
        "not_a_channel",
        "red",
    ),
    "multi_page_tiff_all_channels": (
        lambda v, f: _with(v, "red", tiff_bytes(np.moveaxis(f, 2, 0), photometric="minisblack")),
        422,
        "multi_page",
        "red",
    ),
    "float32_tiff": (
        lambda v, f: _with(v, "green", tiff_bytes(f[:, :, 1].astype(np.float32))),
        422,
        "unsupported_depth",
        "green",
    ),
    "int32_tiff": (
        lambda v, f: _with(v, "green", tiff_bytes(f[:, :, 1].astype(np.int32))),
        422,
        "unsupported_depth",
        "green",
    ),
    "int16_tiff": (
        lambda v, f: _with(v, "green", tiff_bytes(f[:, :, 1].astype(np.int16))),
        422,
        "unsupported_depth",
        "green",
    ),
    "rgb16_colour_not_tint": (
        lambda v, f: _with(
            v, "blue", png_bytes(np.random.default_rng(3).integers(0, 65535, (*f.shape[:2], 3), dtype=np.uint16))
        ),
        422,
        "not_a_channel",
        "blue",
    ),
    "gif": (lambda v, f: _with(v, "red", pil_bytes(f[:, :, 0], "GIF")), 415, "not_an_image", "red"),
    "bmp": (lambda v, f: _with(v, "red", pil_bytes(f[:, :, 0], "BMP")), 415, "not_an_image", "red"),
    "webp": (lambda v, f: _with(v, "red", pil_bytes(f[:, :, 0], "WEBP")), 415, "not_an_image", "red"),
    "bigtiff": (lambda v, f: _with(v, "red", tiff_bytes(f[:, :, 0], bigtiff=True)), 415, "unsupported_format", "red"),
    "missing_channel": (lambda v, f: {k: x for k, x in v.items() if k != "blue"}, 422, "invalid_request", "blue"),
    "text_field_instead_of_file": (
        lambda v, f: ({k: x for k, x in v.items() if k != "red"}, {"red": "not a file"}),
        422,
        "not_a_file",
        "red",
    ),
    "duplicate_field": (lambda v, f: [*v.items(), ("green", v["green"])], 422, "duplicate_field", "green"),
    "extra_file_field": (lambda v, f: {**v, "purple": v["red"]}, 422, "unexpected_field", "purple"),
    "extra_text_field": (lambda v, f: (v, {"threshold": "0.5"}), 422, "unexpected_field", "threshold"),
    "field_over_upload_limit": (
        lambda v, f: _with(v, "yellow", v["yellow"][1] + b"\x00" * MAX_UPLOAD),
        413,
        "upload_too_large",
        "yellow",
    ),
    "request_over_body_limit": (
        lambda v, f: {c: (n, d + b"\x00" * (MAX_REQUEST // 4), t) for c, (n, d, t) in v.items()},
        413,
        "request_too_large",
        None,
    ),
}


def _post(client: TestClient, payload: object, params: dict | None = None) -> httpx.Response:
    if isinstance(payload, tuple):
        files, data = payload
        return client.post("/classify", files=files, data=data, params=params)
    return client.post("/classify", files=payload, params=params)


def _assert_error(r: httpx.Response, status: int, code: str, field: str | None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["field"] == field, body
    assert body["error"]["message"]
    if field is not None:
        assert field in body["error"]["message"]
    assert body["request_id"] == r.headers["x-request-id"]


def _assert_serves(client: TestClient, valid: dict) -> None:
    r = client.post("/classify", files=valid, params={"include_masks": "false"})
    assert r.status_code == 200, r.text
    assert r.json()["cell_count"] == 12


def test_at_least_twenty_kinds_of_hostile_input() -> None:
    assert len(CASES) + len(QUERY_CASES) >= 20


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_upload_gets_its_4xx_and_service_keeps_serving(client, valid, field8, case):
    make, status, code, field = CASES[case]
    r = _post(client, make(valid, field8))
    _assert_error(r, status, code, field)
    _assert_serves(client, valid)


QUERY_CASES = {
    "threshold_nan": ({"threshold": "nan"}, "threshold"),
    "threshold_inf": ({"threshold": "inf"}, "threshold"),
    "threshold_negative": ({"threshold": "-0.5"}, "threshold"),
    "ig_steps_negative": ({"ig_steps": "-3"}, "ig_steps"),
    "ig_steps_nan": ({"ig_steps": "nan"}, "ig_steps"),
    "include_masks_garbage": ({"include_masks": "perhaps"}, "include_masks"),
    "output_unknown": ({"output": "xml"}, "output"),
    "image_id_too_long": ({"image_id": "x" * 5000}, "image_id"),
    "attribution_classes_out_of_range": ({"attribution_classes": "3,-1"}, "attribution_classes"),
}


@pytest.mark.parametrize("case", list(QUERY_CASES))
def test_bad_query_parameters_get_422_naming_them(client, valid, case):
    params, field = QUERY_CASES[case]
    r = client.post("/classify", files=valid, params=params)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
    _assert_serves(client, valid)


def test_malformed_multipart_is_400(client, valid):
    r = client.post("/classify", content=b"garbage", headers={"content-type": "multipart/form-data"})
    _assert_error(r, 400, "malformed_request", None)
    r = client.post("/classify", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "red"
    _assert_serves(client, valid)


ACCEPTED = {
    # decoded by content, not by the declared part type
    "declared_text_plain": lambda v: {c: (n, d, "text/plain") for c, (n, d, _) in v.items()},
    "declared_nothing": lambda v: {c: (n, d) for c, (n, d, _) in v.items()},
    "non_ascii_file_names": lambda v: {c: (f"Zelle-µ-细胞-{c}.png", d, t) for c, (n, d, t) in v.items()},
    "path_like_file_names": lambda v: {c: ("../../etc/passwd", d, t) for c, (n, d, t) in v.items()},
    "long_file_names": lambda v: {c: ("a" * 4000 + ".png", d, t) for c, (n, d, t) in v.items()},
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_harmless_oddities_are_served(client, valid, case):
    r = client.post("/classify", files=ACCEPTED[case](valid), params={"include_masks": "false"})
    assert r.status_code == 200, r.text
    assert r.json()["cell_count"] == 12


def test_one_pixel_field_is_served(client):
    one = png_bytes(np.full((1, 1), 200, np.uint8))
    r = client.post("/classify", files={c: (f"{c}.png", one, "image/png") for c in CHANNELS})
    assert r.status_code == 200, r.text
    assert r.json()["image"] == {"height": 1, "width": 1}


def test_exif_rotation_is_ignored_pixels_as_stored(client, field8):
    """A JPEG with EXIF orientation 6 (rotate 90) is used as stored, so it lines up with the other channels."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(field8[:, :, 0]).save(buf, "JPEG", exif=exif, quality=95)
    files = png_uploads(field8)
    files["red"] = ("red.jpg", buf.getvalue(), "image/jpeg")
    r = client.post("/classify", files=files, params={"include_masks": "false"})
    assert r.status_code == 200, r.text
    assert r.json()["image"] == {"height": field8.shape[0], "width": field8.shape[1]}


def test_sixteen_bit_tiff_and_rgba_tiff_accepted(client, synthetic_field):
    files = {c: (f"{c}.tif", tiff_bytes(synthetic_field[:, :, k]), "image/tiff") for k, c in enumerate(CHANNELS)}
    grey = (synthetic_field[:, :, 0] // 257).astype(np.uint8)
    rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1)
    files["red"] = ("red.tif", tiff_bytes(rgba, photometric="rgb", extrasamples=["unassalpha"]), "image/tiff")
    r = client.post("/classify", files=files, params={"include_masks": "false"})
    assert r.status_code == 200, r.text
    assert r.json()["cell_count"] == 12


# ---------------------------------------------------------------------------------------------------------------
# A real uvicorn process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model_dir: Path, log_path: Path | None = None, **env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``locus serve`` on a free loopback port; yields (base URL, process). Logs go to ``log_path``."""
    port = _free_port()
    environment = {
        **os.environ,
        "LOCUS_MODEL_DIR": str(model_dir),
        "LOCUS_PROVIDERS": "CPUExecutionProvider",
        "LOCUS_PORT": str(port),
        "LOCUS_LOG_LEVEL": "warning",
        **env,
    }
    sink = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "locus.cli", "serve"], env=environment, stdout=sink, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, "server exited early"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            assert time.monotonic() - t0 < 60, "server did not become ready"
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        if log_path is not None:
            sink.close()


@pytest.fixture(scope="module")
def server(test_model_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    with serve(
        test_model_dir,
        LOCUS_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
        LOCUS_MAX_REQUEST_BYTES=str(MAX_REQUEST),
        LOCUS_BODY_TIMEOUT_S="3",
    ) as s:
        yield s


def _multipart(files: dict, boundary: str = "locusboundary") -> bytes:
    out = b""
    for name, (fname, data, ctype) in files.items():
        out += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{fname}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


def _raw_request(url: str, head: bytes, chunks: Iterator[bytes], timeout: float = 30.0) -> tuple[int, bytes]:
    """Send a request over a raw socket, chunk by chunk; return (status, raw answer)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the end of the body: what is wanted
        answer = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while True:
                part = sock.recv(65536)
                if not part:
                    break
                answer += part
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else 0
    return status, answer


def test_streamed_body_over_limit_with_content_length_is_413_before_reading(server, valid):
    url, _ = server
    head = (
        "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {MAX_REQUEST * 10}\r\n\r\n"
    ).encode()
    t0 = time.monotonic()
    status, answer = _raw_request(url, head, iter([b"x" * 65536] * 4))
    assert status == 413, answer[:300]
    assert b"request_too_large" in answer and b"x-request-id" in answer.lower()
    assert time.monotonic() - t0 < 10
    assert httpx.post(url + "/classify", files=valid, timeout=60).status_code == 200


def test_chunked_body_over_limit_is_413_while_streaming(server, valid):
    url, proc = server
    rss0 = _rss_mb(proc.pid)
    boundary = "locusboundary"
    head = (
        "POST /classify HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="red"; filename="r.png"\r\n\r\n'.encode()

    def chunks() -> Iterator[bytes]:
        piece = b"\x00" * 256 * 1024
        yield f"{len(part):x}\r\n".encode() + part + b"\r\n"
        for _ in range(4 * MAX_REQUEST // len(piece)):  # four times the limit, never ending the body
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"

    status, answer = _raw_request(url, head, chunks())
    assert status == 413, answer[:300]
    assert b'"request_too_large"' in answer
    assert _rss_mb(proc.pid) - rss0 < 100
    assert httpx.post(url + "/classify", files=valid, timeout=60).status_code == 200


@pytest.mark.slow
def test_slow_upload_does_not_block_others_and_is_cut_off(server, valid):
    """A client dribbling its body holds a connection, not the server: /health and /classify answer meanwhile,
    and the dribbler gets 408 after LOCUS_BODY_TIMEOUT_S (3 s here)."""
    url, _ = server
    body = _multipart(valid)
    head = (
        "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=locusboundary\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    result: dict = {}

    def dribble() -> Iterator[bytes]:
        for i in range(0, 60):
            yield body[i * 10 : (i + 1) * 10]
            time.sleep(0.1)

    def slow_client() -> None:
        result["answer"] = _raw_request(url, head, dribble())

    slow = [threading.Thread(target=slow_client) for _ in range(3)]
    for t in slow:
        t.start()
    time.sleep(0.5)
    health = []
    while any(t.is_alive() for t in slow):
        t0 = time.perf_counter()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        health.append(time.perf_counter() - t0)
        if len(health) == 3:
            r = httpx.post(url + "/classify", files=valid, timeout=60)
            assert r.status_code == 200, r.text
        time.sleep(0.1)
    for t in slow:
        t.join()
    assert len(health) >= 3 and max(health) < 1.0
    status, answer = result["answer"]
    assert status == 408, answer[:300]
    assert b'"request_timeout"' in answer


@pytest.mark.slow
def test_bombs_keep_server_memory_bounded(server, valid):
    url, proc = server
    bombs = {
        "png": png_bomb(),
        "png_in_limits_junk": png_declaring(6000, 6000, b"junk" * 1024),
        "tiff": tiff_declaring(60000, 60000),
        "jpeg": jpeg_declaring(65000, 65000),
    }
    assert httpx.post(url + "/classify", files=valid, timeout=60).status_code == 200
    rss0 = _rss_mb(proc.pid)
    for _ in range(3):
        for name, data in bombs.items():
            r = httpx.post(url + "/classify", files={**valid, "green": (f"{name}.bin", data, "image/png")}, timeout=60)
            assert r.status_code in (413, 422), (name, r.text)
            assert r.json()["error"]["field"] == "green"
    assert _rss_mb(proc.pid) - rss0 < 200
    assert httpx.post(url + "/classify", files=valid, timeout=60).status_code == 200
