"""The HTTP API against the real app (in-process client): round trips, options, bad input, docs."""

from __future__ import annotations

import re
import struct
import zlib

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pycocotools import mask as mask_utils

from locus.service.app import create_app
from locus.service.classes import CHANNELS, CLASS_NAMES
from locus.service.encoding import parse_prediction_string
from locus.service.imaging import stack_channels
from locus.service.segmentation import make_segmenter
from locus.service.settings import Settings
from tests.conftest import png_bytes


def _files(field: np.ndarray, ext: str = ".png") -> dict:
    return {c: (f"f_{c}{ext}", png_bytes(field[:, :, k]), "image/png") for k, c in enumerate(CHANNELS)}


@pytest.fixture(scope="module")
def client(test_model_dir):
    settings = Settings(
        model_dir=test_model_dir, providers=["CPUExecutionProvider"], log_json=False, max_image_pixels=4000 * 4000
    )
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def valid_files(synthetic_field):
    return _files(synthetic_field)


def _assert_serves(client, files) -> None:
    r = client.post("/classify", files=files)
    assert r.status_code == 200, r.text
    assert r.json()["cell_count"] > 0


def test_meta_routes(client, test_model_dir):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["ready"] is True
    info = client.get("/model").json()
    assert info["name"] == "test-linear"
    assert info["classes"] == list(CLASS_NAMES)
    assert info["provider"] == "CPUExecutionProvider"
    assert info["segmenter"] == "classical"
    assert info["input"]["shape"] == ["N", 32, 32, 4]


def test_classify_synthetic_field_masks_match_segmentation(client, synthetic_field, valid_files):
    r = client.post("/classify", files=valid_files, params={"include_scores": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-request-id"] == body["request_id"]
    assert body["image"] == {"height": 384, "width": 448}
    labels, _ = make_segmenter("classical").segment(synthetic_field)
    assert body["cell_count"] == labels.max() == 12
    for cell in body["cells"]:
        rle = {"size": cell["mask"]["size"], "counts": cell["mask"]["counts"].encode()}
        decoded = mask_utils.decode(rle).astype(bool)
        assert np.array_equal(decoded, labels == cell["id"])
        assert cell["area"] == int(decoded.sum())
        b = cell["bbox"]
        rows, cols = np.nonzero(decoded)
        assert (b["row0"], b["col0"], b["row1"], b["col1"]) == (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
        assert len(cell["scores"]) == 19
        for lab in cell["labels"]:
            assert lab["name"] == CLASS_NAMES[lab["class_id"]]
            assert lab["confidence"] >= 0.5  # the test model's thresholds
            assert lab["confidence"] == pytest.approx(cell["scores"][lab["class_id"]], abs=1e-6)
    # the summary counts what the cells say
    for entry in body["summary"]:
        called = sum(1 for c in body["cells"] if any(lab["class_id"] == entry["class_id"] for lab in c["labels"]))
        assert entry["cells"] == called
        assert entry["name"] == CLASS_NAMES[entry["class_id"]]
    assert {"decode", "segment", "crop", "classify", "encode", "total"} <= set(body["timings_ms"])


def test_threshold_option_changes_labels(client, valid_files):
    low = client.post("/classify", files=valid_files, params={"threshold": 0.0, "include_masks": "false"}).json()
    high = client.post("/classify", files=valid_files, params={"threshold": 1.0, "include_masks": "false"}).json()
    assert all(len(c["labels"]) == 19 for c in low["cells"])
    assert all(c["labels"] == [] for c in high["cells"])
    assert all("mask" not in c for c in low["cells"])
    assert low["threshold"] == 0.0


def test_kaggle_output_row(client, valid_files):
    r = client.post("/classify", files=valid_files, params={"output": "kaggle", "image_id": "abc"})
    assert r.status_code == 200
    row = r.json()
    assert (row["ID"], row["ImageWidth"], row["ImageHeight"]) == ("abc", 448, 384)
    triples = parse_prediction_string(row["PredictionString"])
    assert len(triples) == 12 * 19  # every class of every cell
    assert {t[0] for t in triples} == set(range(19))


def test_real_sample_round_trip(client, sample_files):
    r = client.post("/classify", files=sample_files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"height": 1728, "width": 1728}
    assert 5 <= body["cell_count"] <= 60
    cell = body["cells"][0]
    m = mask_utils.decode({"size": cell["mask"]["size"], "counts": cell["mask"]["counts"].encode()})
    assert m.shape == (1728, 1728) and m.sum() == cell["area"]


def test_blank_field_is_a_valid_empty_answer(client):
    blank = np.full((256, 256, 4), 10, np.uint8)
    r = client.post("/classify", files=_files(blank))
    assert r.status_code == 200
    assert r.json()["cells"] == [] and r.json()["cell_count"] == 0 and r.json()["summary"] == []


def _truncated_png(field: np.ndarray) -> bytes:
    data = png_bytes(field[:, :, 0])
    return data[: len(data) // 2]


def _png_header_only(width: int, height: int, bit_depth: int = 8, colour: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


BAD_INPUTS = {
    "missing_channel": (lambda f: {k: v for k, v in f.items() if k != "yellow"}, 422, "yellow"),
    "not_an_image": (lambda f: {**f, "green": ("g.png", b"hello, this is text", "image/png")}, 415, "green"),
    "empty_file": (lambda f: {**f, "blue": ("b.png", b"", "image/png")}, 422, "blue"),
    "truncated": (None, 422, "red"),
    "huge_declared": (lambda f: {**f, "red": ("r.png", _png_header_only(100000, 100000), "image/png")}, 413, "red"),
    "size_mismatch": (
        lambda f: {**f, "yellow": ("y.png", png_bytes(np.zeros((100, 120), np.uint8)), "image/png")},
        422,
        "yellow",
    ),
    "colour_not_tint": (
        lambda f: {
            **f,
            "green": (
                "g.png",
                png_bytes(np.random.default_rng(0).integers(0, 255, (384, 448, 3), dtype=np.uint8)),
                "image/png",
            ),
        },
        422,
        "green",
    ),
    "extra_channel": (lambda f: {**f, "purple": ("p.png", f["red"][1], "image/png")}, 422, "purple"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_4xx_naming_the_field_and_service_keeps_serving(client, valid_files, synthetic_field, case):
    make, status, field = BAD_INPUTS[case]
    if case == "truncated":
        files = {**valid_files, "red": ("r.png", _truncated_png(synthetic_field), "image/png")}
    else:
        files = make(valid_files)
    r = client.post("/classify", files=files)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field
    assert field in err["message"]
    assert r.json()["request_id"] == r.headers["x-request-id"]
    _assert_serves(client, valid_files)


def test_duplicate_field_refused(client, valid_files):
    files = list(valid_files.items()) + [("red", valid_files["red"])]
    r = client.post("/classify", files=files)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "duplicate_field"


def test_sixteen_bit_and_eight_bit_give_the_same_cells(client, synthetic_field):
    eight = (synthetic_field // 257).astype(np.uint8)
    a = client.post("/classify", files=_files(synthetic_field), params={"include_masks": "false"}).json()
    b = client.post("/classify", files=_files(eight), params={"include_masks": "false"}).json()
    assert a["cell_count"] == b["cell_count"]


def test_tinted_jpeg_channels_accepted(client, synthetic_field):
    files = {}
    tints = {"red": (0, 0, 1), "green": (0, 1, 0), "blue": (1, 0, 0), "yellow": (0, 1, 1)}  # BGR
    for k, c in enumerate(CHANNELS):
        gray = (synthetic_field[:, :, k] // 257).astype(np.uint8)
        tinted = np.stack([gray * t for t in tints[c]], axis=-1).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", tinted, [cv2.IMWRITE_JPEG_QUALITY, 95])
        files[c] = (f"f_{c}.jpg", buf.tobytes(), "image/jpeg")
    r = client.post("/classify", files=files)
    assert r.status_code == 200, r.text
    assert r.json()["cell_count"] == 12


def test_bad_query_parameter(client, valid_files):
    r = client.post("/classify", files=valid_files, params={"threshold": 3})
    assert r.status_code == 422 and r.json()["error"]["field"] == "threshold"
    r = client.post("/classify", files=valid_files, params={"output": "xml"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "output"


def test_attributions_refused_without_grad_model(client, valid_files):
    r = client.post("/classify", files=valid_files, params={"attributions": "true"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "attributions_unavailable"


def test_not_multipart(client):
    r = client.post("/classify", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "multipart" in r.json()["error"]["message"] or "missing" in r.json()["error"]["message"]


def test_docs_work_offline(client):
    for path in ("/docs", "/redoc"):
        html = client.get(path).text
        hosts = re.findall(r"(?:src|href)=[\"']?(https?://[^\"' >]+)", html)
        assert hosts == [], f"{path} loads from external hosts: {hosts}"
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/classify"]["post"]
    assert {"413", "415", "422", "503"} <= set(post["responses"])
    assert "ClassifyResponse" in schema["components"]["schemas"]
    assets = re.findall(r"src=[\"']?(/[^\"' >]+\.js)", client.get("/docs").text)
    assert assets and all(client.get(a).status_code == 200 for a in assets)


def test_stack_matches_upload(synthetic_field):
    # the multipart upload decodes to exactly the field the client had
    from locus.service.imaging import decode_channel

    chans = {c: decode_channel(png_bytes(synthetic_field[:, :, k]), field=c) for k, c in enumerate(CHANNELS)}
    assert np.array_equal(stack_channels(chans), synthetic_field)
