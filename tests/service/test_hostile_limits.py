"""Hostile inputs that once got through: decoder/header disagreements, unbounded work and answers, a 500.

Every payload is built here. Each case is answered 4xx (or 200 where the input is honest), the
process's resident memory stays bounded, and a valid request is served right after.
"""

from __future__ import annotations

import io
import resource
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image

from locus.service.app import create_app
from locus.service.config import DEFAULT_MODEL_DIR
from locus.service.crop import CropRule, crop_cells
from locus.service.imaging import MAX_JPEG_SCANS, decode_channel, jpeg_structure
from locus.service.settings import Settings
from tests.conftest import png_uploads

RSS_GROWTH_MB = 200


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


def jpeg_hidden_sof(real: tuple[int, int] = (32000, 32000)) -> bytes:
    """A JPEG whose first SOF a naive scanner sees (inside a COM segment, after ``FF 00``) says 16x16; the real SOF
    libjpeg reads says ``real``."""
    data = bytearray(_jpeg(np.zeros((16, 16), np.uint8)))
    i = data.find(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", *real)
    fake_sof = b"\xff\xc0\x00\x0b\x08\x00\x10\x00\x10\x01\x01\x11\x00"
    com_payload = b"\xff\x00" + fake_sof
    com = b"\xff\xfe" + struct.pack(">H", len(com_payload) + 2) + com_payload
    return bytes(data[:2]) + com + bytes(data[2:])


def jpeg_many_scans(n_scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has ``n_scans`` scans."""
    data = _jpeg((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8), progressive=True)
    last = data.rfind(b"\xff\xda")
    end = data.rfind(b"\xff\xd9")
    _, scans = jpeg_structure(data)
    return data[:end] + data[last:end] * (n_scans - scans) + data[end:]


def _tiff_patch(data: bytes, patches: dict[int, int]) -> bytes:
    """Set the first value of the given tags (SHORT or LONG) in a little-endian classic TIFF's first IFD."""
    out = bytearray(data)
    (offset,) = struct.unpack("<I", out[4:8])
    (count,) = struct.unpack("<H", out[offset : offset + 2])
    for k in range(count):
        e = offset + 2 + 12 * k
        tag, typ = struct.unpack("<HH", out[e : e + 4])
        if tag in patches:
            fmt = "<H" if typ == 3 else "<I"
            out[e + 8 : e + 8 + struct.calcsize(fmt)] = struct.pack(fmt, patches[tag])
    return bytes(out)


def tiff_duplicate_size_tags(small: int = 16, big: int = 30000) -> bytes:
    """An uncompressed 8-bit TIFF with ImageWidth and ImageLength each given twice (small, then big)."""
    pixels = bytes(small * small)
    entries = [
        (256, 3, 1, small),
        (256, 4, 1, big),
        (257, 3, 1, small),
        (257, 4, 1, big),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 0),  # strip offset, set below
        (277, 3, 1, 1),
        (278, 4, 1, small),
        (279, 4, 1, len(pixels)),
    ]
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", len(entries)))
    for tag, typ, n, value in entries:
        value = data_at if tag == 273 else value
        packed = struct.pack("<H", value) + b"\x00\x00" if typ == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, n) + packed
    out += struct.pack("<I", 0) + pixels
    return bytes(out)


def tiff_huge_tile() -> bytes:
    """A valid 16x16 tiled TIFF whose tile is then declared 32768x32768 (1 GiB)."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((16, 16), np.uint8), tile=(16, 16))
    return _tiff_patch(buf.getvalue(), {322: 32768, 323: 32768})


def tiff_with_orientation(arr: np.ndarray, orientation: int) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, extratags=[(274, "H", 1, orientation, True)])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------- decoders


def test_jpeg_size_is_what_libjpeg_reads_not_a_hidden_sof() -> None:
    data = jpeg_hidden_sof()
    t = time.perf_counter()
    with pytest.raises(ValueError, match="over the limit") as exc:
        decode_channel(data, field="red", max_pixels=6144 * 6144)
    assert exc.value.status == 413 and time.perf_counter() - t < 1.0


def test_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    data = jpeg_many_scans(1000)
    assert jpeg_structure(data)[1] == 1000
    t = time.perf_counter()
    with pytest.raises(ValueError, match="scans") as exc:
        decode_channel(data, field="green")
    assert exc.value.code == "too_many_scans" and time.perf_counter() - t < 1.0
    # an ordinary progressive JPEG is well within the limit and decodes
    ok = _jpeg(np.full((64, 64), 90, np.uint8), progressive=True)
    assert 1 < jpeg_structure(ok)[1] < MAX_JPEG_SCANS
    assert decode_channel(ok).shape == (64, 64)


def test_tiled_tiff_with_a_tile_larger_than_the_image_is_refused() -> None:
    with pytest.raises(ValueError, match="tiles") as exc:
        decode_channel(tiff_huge_tile(), field="blue")
    assert exc.value.status == 422


def test_duplicate_size_tags_decode_to_the_size_that_was_checked() -> None:
    before = _rss_mb()
    try:
        img = decode_channel(tiff_duplicate_size_tags(), field="yellow", max_pixels=6144 * 6144)
    except ValueError as exc:  # refused from the size the decoder reads: fine
        assert exc.status in (413, 422)
    else:
        assert img.size <= 6144 * 6144
    assert _rss_mb() - before < 200


def test_tiff_orientation_tag_is_not_applied() -> None:
    arr = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64)
    assert np.array_equal(decode_channel(tiff_with_orientation(arr, 3)), arr)
    assert np.array_equal(decode_channel(tiff_with_orientation(arr, 6)), arr)


# --------------------------------------------------------------------------------------------------- crops


def test_a_cell_longer_than_any_window_is_cropped_with_bounded_memory(monkeypatch) -> None:
    from locus.service import crop

    h, w = 60, 3000
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)
    labels = np.zeros((h, w), np.int32)
    labels[10:50, 5:2995] = 1
    rule = CropRule(size=32)
    _, full = crop_cells(image, labels, rule)
    monkeypatch.setattr(crop, "MAX_WINDOW_SIDE", 512)  # force the bounded path on a small field
    _, bounded = crop_cells(image, labels, rule)
    assert bounded.shape == full.shape == (1, 32, 32, 4)
    assert np.abs(bounded - full).mean() < 1.0  # the same picture, to within resampling


# --------------------------------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def field() -> np.ndarray:
    from locus.training.sim.generator import SimConfig, generate_field

    return generate_field(0, 20261202, SimConfig(size=256)).image


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(
        model_dir=DEFAULT_MODEL_DIR,
        providers=["CPUExecutionProvider"],
        log_level="warning",
        max_map_bytes=2_000_000,
        max_concurrent=1,
        max_queue=0,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def test_attribution_work_over_budget_is_refused_up_front(client, field) -> None:
    params = {"attributions": "true", "ig_steps": "512", "attribution_classes": ",".join(map(str, range(19)))}
    t = time.perf_counter()
    r = client.post("/classify", files=png_uploads(field), params=params)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "attribution_budget" and "LOCUS_IG_BUDGET" in err["message"]
    assert time.perf_counter() - t < 5
    assert client.post("/classify", files=png_uploads(field)).status_code == 200


def test_answer_larger_than_the_cap_is_refused_before_maps_are_made(client, field) -> None:
    big = np.ascontiguousarray(np.repeat(np.repeat(field, 4, axis=0), 4, axis=1))  # 1024², large boxes
    params = {"attributions": "true", "ig_steps": "2", "attribution_classes": "0,1,2,3,4,5,6,7,8,9"}
    r = client.post("/classify", files=png_uploads(big), params=params)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] in ("answer_too_large", "attribution_budget")
    assert client.post("/classify", files=png_uploads(field)).status_code == 200


@pytest.mark.parametrize("text", ["1_0", "\u0661", "+1", " 1e1"])
def test_attribution_classes_take_ascii_digits_only(client, field, text) -> None:
    r = client.post("/classify", files=png_uploads(field), params={"attributions": "true", "attribution_classes": text})
    assert r.status_code == 422 and r.json()["error"]["field"] == "attribution_classes"


def test_hostile_files_through_the_api_then_a_valid_request(client, field) -> None:
    before = _rss_mb()
    cases = {
        "red": jpeg_hidden_sof(),
        "green": jpeg_many_scans(1000),
        "blue": tiff_huge_tile(),
    }
    for channel, payload in cases.items():
        files = png_uploads(field)
        files[channel] = (f"{channel}.bin", payload, "application/octet-stream")
        r = client.post("/classify", files=files)
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["error"]["field"] == channel
    assert _rss_mb() - before < RSS_GROWTH_MB  # the bombs were refused before any pixel was decoded
    assert client.post("/classify", files=png_uploads(field)).status_code == 200


def test_tiff_orientation_gives_the_same_answer_as_no_tag(client, field) -> None:
    files = png_uploads(field)
    files["blue"] = ("blue.tif", tiff_with_orientation(field[:, :, 2], 3), "image/tiff")
    tagged = client.post("/classify", files=files).json()
    plain = client.post("/classify", files=png_uploads(field)).json()
    assert [c["mask"] for c in tagged["cells"]] == [c["mask"] for c in plain["cells"]]


@pytest.mark.slow
def test_timed_out_request_stops_its_work_and_frees_the_worker(field) -> None:
    settings = Settings(
        model_dir=DEFAULT_MODEL_DIR,
        providers=["CPUExecutionProvider"],
        log_level="warning",
        max_concurrent=1,
        max_queue=0,
        request_timeout_s=3.0,
        ig_budget=10**9,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        params = {"attributions": "true", "ig_steps": "512", "attribution_classes": ",".join(map(str, range(19)))}
        r = c.post("/classify", files=png_uploads(field), params=params)  # minutes of work without cancellation
        assert r.status_code == 504, r.text
        t = time.perf_counter()
        while True:
            r = c.post("/classify", files=png_uploads(field))
            if r.status_code == 200 or time.perf_counter() - t > 15:
                break
            assert r.status_code in (503, 504)  # busy for at most one IG batch more (slow on a loaded machine)
            time.sleep(0.2)
        assert r.status_code == 200, "the worker was not freed after the timeout (without cancellation: minutes)"


def test_preflight_without_key_does_not_reveal_routes(test_model_dir) -> None:
    settings = Settings(model_dir=test_model_dir, providers=["CPUExecutionProvider"], api_keys=["k1"])
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        headers = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        real = c.options("/classify", headers=headers)
        unknown = c.options("/no-such-route", headers=headers)
        assert real.status_code == unknown.status_code == 401
