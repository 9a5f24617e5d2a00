"""Peak memory follows the documented formula (docs/OPERATIONS.md, "Memory") under concurrent maximal requests.

A real ``locus serve`` with ``MAX_CONCURRENT=2`` and ``MAX_QUEUE=2`` gets four requests at once, each a
16-bit field at the pixel limit; its peak resident memory above the warmed-up baseline must be within 20% of
``C x (PER_REQUEST_MB + BYTES_PER_PIXEL x P + U)``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import httpx
import pytest

from locus.service.classes import CHANNELS
from locus.service.config import BYTES_PER_PIXEL, PER_REQUEST_MB, peak_memory_mb

REPO = Path(__file__).resolve().parents[2]


def _status(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise AssertionError(key)


@pytest.mark.slow
def test_peak_memory_within_20_percent_of_the_formula() -> None:
    from locus.training.sim.generator import SimConfig, generate_field

    side, running, queued = 2048, 2, 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "LOCUS_LOG_LEVEL": "warning",
        "LOCUS_MAX_CONCURRENT": str(running),
        "LOCUS_MAX_QUEUE": str(queued),
        "LOCUS_MAX_IMAGE_PIXELS": str(side * side),
        "LOCUS_PROVIDERS": "CPUExecutionProvider",
    }
    proc = subprocess.Popen([sys.executable, "-m", "locus.cli", "serve", "--port", str(port)], env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        field = generate_field(0, 5, SimConfig(size=side, bit_depth=16)).image
        files = {
            c: (f"{c}.png", cv2.imencode(".png", field[:, :, k])[1].tobytes(), "image/png")
            for k, c in enumerate(CHANNELS)
        }
        upload = sum(len(v[1]) for v in files.values())
        small = {
            c: (n, cv2.imencode(".png", field[:256, :256, k])[1].tobytes(), t)
            for k, (c, (n, _, t)) in enumerate(files.items())
        }
        assert httpx.post(url + "/classify", files=small, timeout=120).status_code == 200  # warm up
        base = _status(proc.pid, "VmRSS")
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset the high-water mark
        codes: list[int] = []

        def one() -> None:
            codes.append(httpx.post(url + "/classify", files=files, timeout=600).status_code)

        threads = [threading.Thread(target=one) for _ in range(running + queued)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = _status(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert codes.count(200) >= running, codes
    expected = peak_memory_mb(running=running, queued=queued, pixels=side * side, request_bytes=upload)
    print(f"peak {peak - base:.0f} MB above {base:.0f} MB; formula {expected:.0f} MB")
    print(f"({BYTES_PER_PIXEL} B/px, {PER_REQUEST_MB} MB a running request)")
    assert 0.8 * expected <= peak - base <= 1.2 * expected
