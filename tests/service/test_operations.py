"""Operations: metrics, logs with request ids, draining, model failures, overload (503) and timeouts (504)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from locus.service.app import create_app
from locus.service.manifest import sha256_file
from locus.service.settings import Settings
from tests.conftest import png_uploads
from tests.modelfolder import write_model_folder
from tests.service.test_hostile_input import serve

#: Pixel value (0-255 model scale) above which the failing model's graph breaks at run time.
FAIL_ABOVE = 250.0


def write_failing_model_folder(folder: Path, input_size: int = 32) -> Path:
    """A valid model folder whose ONNX graph fails at run time when any input value is above ``FAIL_ABOVE``.

    The graph computes the linear test classifier, then gathers its rows back at
    indices ``range(N) + flag * 10**6`` with ``flag = max(image) > FAIL_ABOVE``: a Gather
    that ONNX Runtime refuses (index out of bounds) for exactly those inputs, as a real
    model can fail on inputs it was not built for.
    """
    write_model_folder(folder, input_size=input_size)
    s = input_size
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", s, s, 4])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 19])
    inits = [
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
        numpy_helper.from_array(rng.normal(0, 0.05, (4, 19)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(0, 1, 19).astype(np.float32), "B"),
        numpy_helper.from_array(np.array(FAIL_ABOVE, np.float32), "limit"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array(10**6, np.int64), "far"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["m"], keepdims=0),
        helper.make_node("MatMul", ["m", "W"], ["z0"]),
        helper.make_node("Add", ["z0", "B"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p"]),
        helper.make_node("Shape", ["image"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Range", ["zero", "n", "one"], ["rows"]),
        helper.make_node("ReduceMax", ["image"], ["peak"], keepdims=0),
        helper.make_node("Greater", ["peak", "limit"], ["over"]),
        helper.make_node("Cast", ["over"], ["flag"], to=TensorProto.INT64),
        helper.make_node("Mul", ["flag", "far"], ["shift"]),
        helper.make_node("Add", ["rows", "shift"], ["index"]),
        helper.make_node("Gather", ["p", "index"], ["probabilities"], axis=0),
    ]
    graph = helper.make_graph(nodes, "fails-on-bright", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(folder / "model.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


@pytest.fixture(scope="module")
def failing_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_failing_model_folder(tmp_path_factory.mktemp("failing") / "fails-on-bright")


@pytest.fixture(scope="module")
def files(synthetic_field: np.ndarray) -> dict:
    return png_uploads(synthetic_field)


@pytest.fixture(scope="module")
def poison_files(synthetic_field: np.ndarray) -> dict:
    """The synthetic field with saturated nuclei: the failing model breaks on it."""
    field = synthetic_field.copy()
    field[:, :, 2][field[:, :, 2] > 20000] = 65535
    return png_uploads(field)


def _settings(model_dir: Path, **kw) -> Settings:
    base = {"model_dir": model_dir, "providers": ["CPUExecutionProvider"], "log_json": True, "log_level": "info"}
    return Settings(**{**base, **kw})


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    assert found, f"no sample {name}{labels}"
    return total


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()))
    t.start()
    return t, out


def _wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_http_and_domain(test_model_dir, files):
    apps = [create_app(_settings(test_model_dir)) for _ in range(3)]  # no duplicate registration across apps
    with TestClient(apps[-1]) as c:
        assert c.post("/classify", files=files).status_code == 200
        assert c.post("/classify", files={**files, "red": ("r.png", b"junk", "image/png")}).status_code == 415
        assert c.get("/nope/../../etc").status_code == 404
        text = c.get("/metrics").text
    assert _metric(text, "http_requests_total", handler="/classify", method="POST", status="200") == 1
    assert _metric(text, "http_requests_total", handler="/classify", status="415") == 1
    assert _metric(text, "http_requests_total", handler="none") >= 1  # unknown paths grouped, not one label each
    assert _metric(text, "http_request_duration_seconds_count", handler="/classify") == 2
    assert _metric(text, "locus_fields_classified_total") == 1
    assert _metric(text, "locus_cells_classified_total") == 12
    for stage in ("decode", "segment", "crop", "classify"):
        assert _metric(text, "locus_stage_seconds_count", stage=stage) == 1
    assert _metric(text, "locus_batch_size_count") >= 1 and _metric(text, "locus_batch_size_sum") == 12
    assert _metric(text, "locus_requests_in_flight") == 0
    assert _metric(text, "locus_requests_queued") == 0
    assert _metric(text, "locus_admission_capacity") == Settings().resolved_concurrency() + 8
    assert _metric(text, "locus_errors_total", status="415", code="not_an_image") == 1
    assert _metric(text, "locus_labels_called_total") >= 0


# ---------------------------------------------------------------------------------------------------------------
# Overload, timeout, draining


@pytest.mark.slow
def test_overload_answers_503_with_retry_after_at_once(test_model_dir, files):
    # max_wait_ms=1000: every request waits a second for its batch to fill, so the first one holds the only slot
    settings = _settings(test_model_dir, max_concurrent=1, max_queue=0, max_wait_ms=1000)
    with TestClient(create_app(settings)) as c:
        admission = c.app.state.locus.admission
        slow, out = _in_thread(lambda: c.post("/classify", files=files))
        _wait_for(lambda: admission.in_flight == 1)
        t0 = time.perf_counter()
        r = c.post("/classify", files=files)
        elapsed = time.perf_counter() - t0
        # "At once": the refusal does not wait for the slot, so it comes back while the request in flight (which
        # waits a second for its batch) still runs. Not a wall-clock bound: on 2 busy cores the in-flight request's
        # decoding can delay the answer by most of a second without any queueing.
        refused_while_busy = slow.is_alive()
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
        assert refused_while_busy, f"the refusal waited for the request in flight ({elapsed:.2f} s)"
        metrics = c.get("/metrics").text
        assert _metric(metrics, "locus_requests_in_flight") == 1
        assert _metric(metrics, "locus_rejections_total", reason="overloaded") == 1
        slow.join()
        assert out["r"].status_code == 200
        assert c.post("/classify", files=files).status_code == 200


@pytest.mark.slow
def test_request_timeout_is_504_and_the_slot_comes_back(test_model_dir, files):
    settings = _settings(test_model_dir, request_timeout_s=0.2, max_wait_ms=1000)
    with TestClient(create_app(settings)) as c:
        t0 = time.perf_counter()
        r = c.post("/classify", files=files)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "timeout" and r.json()["request_id"] == r.headers["x-request-id"]
        assert time.perf_counter() - t0 < 1.0
        assert c.get("/health").status_code == 200
        _wait_for(lambda: c.app.state.locus.admission.in_flight == 0)  # freed when the work really ends
        assert _metric(c.get("/metrics").text, "locus_rejections_total", reason="timeout") == 1


@pytest.mark.slow
def test_readiness_false_while_draining_and_requests_in_flight_finish(test_model_dir, files):
    settings = _settings(test_model_dir, max_wait_ms=1000)
    with TestClient(create_app(settings)) as c:
        state = c.app.state.locus
        assert c.get("/ready").json() == {"ready": True, "reason": None}
        slow, out = _in_thread(lambda: c.post("/classify", files=files))
        _wait_for(lambda: state.admission.in_flight == 1)
        closer, _ = _in_thread(state.close)  # what the lifespan runs at shutdown
        _wait_for(lambda: state.draining)
        r = c.get("/ready")
        assert r.status_code == 503 and r.json() == {"ready": False, "reason": "draining"}
        r = c.post("/classify", files=files)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and r.headers["retry-after"]
        assert c.get("/health").status_code == 200  # alive, just not taking work
        slow.join()
        closer.join(timeout=30)
        assert out["r"].status_code == 200, "the request in flight was not finished"


# ---------------------------------------------------------------------------------------------------------------
# Model failures and logs, in a real server


def _json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


@pytest.mark.slow
def test_model_failure_is_a_500_with_request_id_logged_and_next_request_served(
    failing_model_dir, files, poison_files, tmp_path
):
    import httpx

    log_path = tmp_path / "server.log"
    with serve(failing_model_dir, log_path=log_path, LOCUS_LOG_LEVEL="info") as (url, proc):
        ok = httpx.post(url + "/classify", files=files, headers={"X-Request-ID": "ops-ok-1"}, timeout=60)
        assert ok.status_code == 200, ok.text
        assert ok.headers["x-request-id"] == "ops-ok-1" and ok.json()["request_id"] == "ops-ok-1"
        bad = httpx.post(url + "/classify", files=poison_files, timeout=60)
        assert bad.status_code == 500, bad.text
        rid = bad.headers["x-request-id"]
        assert bad.json()["request_id"] == rid and bad.json()["error"]["code"] == "internal_error"
        # not the model's message: no internals leak to the client
        assert "Gather" not in bad.text and "out of data bounds" not in bad.text
        again = httpx.post(url + "/classify", files=files, timeout=60)
        assert again.status_code == 200 and again.json()["cell_count"] == 12
        metrics = httpx.get(url + "/metrics", timeout=10).text
        assert _metric(metrics, "locus_errors_total", status="500", code="internal_error") == 1
        assert _metric(metrics, "http_requests_total", handler="/classify", status="500") == 1
        assert proc.poll() is None
    records = _json_lines(log_path.read_text(errors="replace"))
    assert records, "the server wrote no JSON log lines"
    mine = [r for r in records if r.get("request_id") == rid]
    errors = [r for r in mine if r.get("level") == "error"]
    assert errors and "internal error" in errors[0]["event"], mine
    assert "out of data bounds" in errors[0].get("exception", ""), "the log line carries the model's traceback"
    access_ok = [r for r in records if r.get("request_id") == "ops-ok-1" and "/classify" in r.get("event", "")]
    assert access_ok and " 200" in access_ok[0]["event"]
    assert any(r.get("request_id") == rid and " 500" in r.get("event", "") for r in records)


def test_model_failure_in_process_does_not_break_the_batcher(failing_model_dir, files, poison_files):
    with TestClient(create_app(_settings(failing_model_dir)), raise_server_exceptions=False) as c:
        for _ in range(3):
            bad = c.post("/classify", files=poison_files)
            assert bad.status_code == 500 and bad.headers["x-request-id"] == bad.json()["request_id"]
            assert c.post("/classify", files=files).status_code == 200
