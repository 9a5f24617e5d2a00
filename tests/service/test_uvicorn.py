"""The service as a user runs it: `locus serve` in its own process, over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import png_uploads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir: Path, port: int, **env: str) -> subprocess.Popen:
    environment = {
        **os.environ,
        "LOCUS_MODEL_DIR": str(model_dir),
        "LOCUS_PROVIDERS": "CPUExecutionProvider",
        "LOCUS_PORT": str(port),
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "locus.cli", "serve"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{proc.stdout.read()}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


@pytest.fixture(scope="module")
def server(test_model_dir):
    port = _free_port()
    proc = _start(test_model_dir, port, LOCUS_MAX_CONCURRENT="1", LOCUS_MAX_QUEUE="4")
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def _field(size: int = 512) -> dict:
    rng = np.random.default_rng(1)
    img = rng.normal(800, 100, (size, size, 4)).clip(0, None).astype(np.uint16)
    # one disc per 128-px tile, centred in it: the distance to the nearest centre, in one pass
    yy, xx = np.ogrid[:size, :size]
    d = np.hypot(yy % 128 - 64, xx % 128 - 64)
    img[d < 52, 0] += 9000
    img[d < 52, 3] += 8000
    img[d < 48, 1] += 12000
    img[d < 20, 2] += 30000
    return png_uploads(img)


def test_classify_over_real_http(server):
    url, _ = server
    r = httpx.post(url + "/classify", files=_field(), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["cell_count"] == 16
    assert r.headers["x-request-id"]


@pytest.mark.slow
def test_health_answers_while_a_request_classifies(server):
    url, _ = server
    big = _field(2048)
    result = {}

    def slow() -> None:
        result["r"] = httpx.post(url + "/classify", files=big, timeout=120)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.05)
    latencies = []
    while t.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.05)
    t.join()
    assert result["r"].status_code == 200
    assert latencies, "the request finished before /health was asked"
    assert max(latencies) < 2.0


@pytest.mark.slow
def test_sigterm_drains_and_exits_cleanly(test_model_dir):
    port = _free_port()
    proc = _start(test_model_dir, port)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, proc)
    result = {}
    payload = _field(1024)

    def request() -> None:
        result["r"] = httpx.post(url + "/classify", files=payload, timeout=120)

    t = threading.Thread(target=request)
    t.start()
    time.sleep(0.3)  # the request is in flight
    proc.send_signal(signal.SIGTERM)
    t.join()
    # uvicorn re-raises the signal after its graceful shutdown, so the exit reads as "terminated by SIGTERM"
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert result["r"].status_code == 200, "the request in flight was not finished before shutdown"
    log = proc.stdout.read()
    assert "draining" in log and "stopped" in log


def test_broken_model_folder_stops_the_start_naming_the_file(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "manifest.json").write_text("{not json")
    proc = _start(folder, _free_port())
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "manifest.json" in out and "not valid JSON" in out
