"""Load test on loopback: a real ``locus serve`` process driven at a multiple of its capacity.

Run with ``python benchmarks/load_test.py`` (needs only what ``pip install -e '.[dev]'``
installs: httpx, numpy, OpenCV; ``onnx`` to build a stand-in model when no model folder
is given and ``models/locus-sim-b0`` is absent). The script

1. starts ``python -m locus.cli serve`` on a free 127.0.0.1 port and waits for /ready;
2. measures capacity: ``--calibrate`` requests at concurrency = the server's workers,
   capacity = completed requests per second;
3. offers ``--factor`` x capacity (default 2x) as an open-loop arrival stream (fixed
   interval, each request on its own task) for ``--duration`` seconds (default 60);
4. reports requests, status code counts, requests without an answer, p50/p95/max latency
   (all answers, and 200s alone), goodput, and the server's RSS before, peak and after;
5. stops the server with SIGTERM and exits 1 when any request went unanswered or any 5xx
   other than the documented 503 (overload) came back.

The field is synthetic (``--size`` square, 16-bit PNG, a grid of cells) or, with
``--sample``, the real HPA field of view in ``../shared/hpa-samples``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHANNELS = ("red", "green", "blue", "yellow")


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def synthetic_files(size: int) -> dict[str, tuple[str, bytes, str]]:
    """A size x size 16-bit field with a grid of round cells, as multipart file tuples."""
    rng = np.random.default_rng(1)
    img = rng.normal(800, 100, (size, size, 4)).clip(0, None).astype(np.uint16)
    yy, xx = np.mgrid[:size, :size]
    for cy in range(64, size, 128):
        for cx in range(64, size, 128):
            d = np.hypot(yy - cy, xx - cx)
            img[d < 52, 0] += 9000
            img[d < 52, 3] += 8000
            img[d < 48, 1] += 12000
            img[d < 20, 2] += 30000
    out = {}
    for k, c in enumerate(CHANNELS):
        ok, buf = cv2.imencode(".png", img[:, :, k])
        assert ok
        out[c] = (f"{c}.png", buf.tobytes(), "image/png")
    return out


def sample_files() -> dict[str, tuple[str, bytes, str]]:
    """The real HPA field (website JPEGs) from ../shared/hpa-samples."""
    folder = REPO.parent / "shared" / "hpa-samples"
    return {c: (f"{c}.jpg", (folder / f"89_B5_1_{c}.jpg").read_bytes(), "image/jpeg") for c in CHANNELS}


def model_folder(given: str | None) -> tuple[Path, str]:
    """The model folder to serve and a note on where it came from."""
    if given:
        return Path(given), "given"
    default = REPO / "models" / "locus-sim-b0"
    if (default / "manifest.json").is_file():
        return default, "default model"
    sys.path.insert(0, str(REPO))
    from tests.modelfolder import write_model_folder

    folder = write_model_folder(Path(tempfile.mkdtemp(prefix="locus-load-")) / "test-linear", input_size=64)
    return folder, "stand-in linear model (models/locus-sim-b0 is absent)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    environment = {
        **os.environ,
        "LOCUS_MODEL_DIR": str(model),
        "LOCUS_PROVIDERS": "CPUExecutionProvider",
        "LOCUS_PORT": str(port),
        "LOCUS_LOG_LEVEL": "warning",
        **env,
    }
    sink = open(log, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "locus.cli", "serve"], env=environment, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO
    )


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited early (code {proc.returncode})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


async def one(
    client: httpx.AsyncClient,
    url: str,
    files: dict,
    timeout: float,
    query: dict | None = None,
    hostile: bool = False,
) -> tuple[int | str, float]:
    t0 = time.perf_counter()
    params = {"include_masks": "false", **(query or {})}
    try:
        r = await client.post(url + "/classify", files=files, params=params, timeout=timeout)
        status: int | str = r.status_code
        if hostile and 400 <= r.status_code < 500:
            status = f"hostile-{r.status_code}"
        elif hostile and r.status_code == 200:
            status = "hostile-200"
        return status, time.perf_counter() - t0
    except httpx.HTTPError as exc:
        return type(exc).__name__, time.perf_counter() - t0


async def calibrate(url: str, files: dict, concurrency: int, n: int) -> float:
    """Completed requests per second at the server's own concurrency (closed loop)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:
        for _ in range(2):  # warm-up
            await one(client, url, files, 120)
        done = 0
        t0 = time.perf_counter()

        async def worker() -> None:
            nonlocal done
            while done < n:
                done += 1
                status, _ = await one(client, url, files, 120)
                if status != 200:
                    raise SystemExit(f"calibration request failed: {status}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - t0)


def hostile_payloads(files: dict) -> list[tuple[str, dict, dict]]:
    """(name, files, query) of hostile requests built from the valid ``files``.

    Decompression bombs, corrupt data and work over the budget.
    """
    import io
    import struct
    import zlib

    import tifffile
    from PIL import Image

    def with_(channel: str, data: bytes) -> dict:
        return {**files, channel: (f"{channel}.bin", data, "application/octet-stream")}

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    png_bomb = (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(jpeg, "JPEG")
    jbytes = bytearray(jpeg.getvalue())
    i = jbytes.find(b"\xff\xc0")
    jbytes[i + 5 : i + 9] = struct.pack(">HH", 32000, 32000)
    prog = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(
        prog, "JPEG", progressive=True
    )
    pdata = prog.getvalue()
    last, end = pdata.rfind(b"\xff\xda"), pdata.rfind(b"\xff\xd9")
    many_scans = pdata[:end] + pdata[last:end] * 1000 + pdata[end:]
    tile = io.BytesIO()
    tifffile.imwrite(tile, np.zeros((16, 16), np.uint8), tile=(16, 16))
    tdata = bytearray(tile.getvalue())
    (off,) = struct.unpack("<I", tdata[4:8])
    (count,) = struct.unpack("<H", tdata[off : off + 2])
    for k in range(count):
        e = off + 2 + 12 * k
        tag, typ = struct.unpack("<HH", tdata[e : e + 4])
        if tag in (322, 323):
            tdata[e + 8 : e + 12] = struct.pack("<I" if typ == 4 else "<HH", *((32768,) if typ == 4 else (32768, 0)))
    red = files["red"][1]
    all_classes = ",".join(str(k) for k in range(19))
    return [
        ("png_bomb", with_("red", png_bomb), {}),
        ("jpeg_bomb", with_("green", bytes(jbytes)), {}),
        ("jpeg_1000_scans", with_("blue", many_scans), {}),
        ("tiff_huge_tile", with_("yellow", bytes(tdata)), {}),
        ("truncated_png", with_("red", red[: len(red) // 2]), {}),
        ("not_an_image", with_("green", b"%PDF-1.4 nothing to see"), {}),
        ("ig_over_budget", files, {"attributions": "true", "ig_steps": "512", "attribution_classes": all_classes}),
        ("bad_class_ids", files, {"attributions": "true", "attribution_classes": "1_0"}),
    ]


async def drive(
    url: str,
    files: dict,
    rate: float,
    duration: float,
    timeout: float,
    proc_pid: int,
    hostile: list[tuple[str, dict, dict]] | None = None,
    hostile_fraction: float = 0.0,
) -> dict:
    """Open-loop load: one request every 1/rate s for ``duration`` s; wait for every answer.

    With ``hostile``, about ``hostile_fraction`` of the requests are hostile ones, in turn.
    """
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    results: list[tuple[int | str, float]] = []
    peak = rss_mb(proc_pid)
    async with httpx.AsyncClient(limits=limits) as client:
        tasks = []
        t0 = time.perf_counter()
        k = 0
        n_hostile = 0
        next_sample = t0
        while True:
            now = time.perf_counter()
            if now - t0 >= duration:
                break
            due = t0 + k / rate
            if due > now:
                await asyncio.sleep(due - now)
            if hostile and hostile_fraction > 0 and (k * hostile_fraction) % 1.0 + hostile_fraction >= 1.0:
                _, hfiles, query = hostile[n_hostile % len(hostile)]
                n_hostile += 1
                tasks.append(asyncio.create_task(one(client, url, hfiles, timeout, query, hostile=True)))
            else:
                tasks.append(asyncio.create_task(one(client, url, files, timeout)))
            k += 1
            if time.perf_counter() >= next_sample:
                peak = max(peak, rss_mb(proc_pid))
                next_sample += 1.0
        offered_s = time.perf_counter() - t0
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=1.0)
            peak = max(peak, rss_mb(proc_pid))
        results = [t.result() for t in tasks]
    return {"results": results, "offered_s": offered_s, "peak_rss_mb": peak}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default models/locus-sim-b0 or a stand-in)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--factor", type=float, default=2.0, help="offered load / measured capacity (default 2)")
    p.add_argument("--size", type=int, default=512, help="side of the synthetic field (default 512)")
    p.add_argument("--sample", action="store_true", help="send the real HPA field instead of a synthetic one")
    p.add_argument("--calibrate", type=int, default=20, help="requests to measure capacity (default 20)")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per request, s")
    p.add_argument("--max-queue", type=int, default=8, help="LOCUS_MAX_QUEUE of the server (default 8)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    p.add_argument("--hostile-fraction", type=float, default=0.0, help="share of hostile requests mixed in (soak: 0.2)")
    args = p.parse_args(argv)

    model, model_note = model_folder(args.model)
    files = sample_files() if args.sample else synthetic_files(args.size)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="locus-load-log-")) / "server.log"
    proc = start_server(model, port, {"LOCUS_MAX_QUEUE": str(args.max_queue)}, log)
    try:
        wait_ready(url, proc)
        workers = os.cpu_count() or 1
        with contextlib.suppress(OSError):
            workers = len(os.sched_getaffinity(proc.pid))
        capacity = asyncio.run(calibrate(url, files, workers, args.calibrate))
        rss_before = rss_mb(proc.pid)
        rate = args.factor * capacity
        print(f"model: {model} ({model_note}); field: {'HPA sample' if args.sample else f'{args.size}px synthetic'}")
        print(
            f"capacity {capacity:.2f} req/s at concurrency {workers}; offering {rate:.2f} req/s for {args.duration:g} s"
        )
        hostile = hostile_payloads(files) if args.hostile_fraction > 0 else None
        run = asyncio.run(
            drive(url, files, rate, args.duration, args.timeout, proc.pid, hostile, args.hostile_fraction)
        )
        time.sleep(2.0)
        rss_after = rss_mb(proc.pid)
        alive = proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    results = run["results"]
    codes = Counter(str(s) for s, _ in results)
    unanswered = sum(1 for s, _ in results if not isinstance(s, int) and not str(s).startswith("hostile-"))
    bad_5xx = sum(1 for s, _ in results if isinstance(s, int) and s >= 500 and s != 503)
    lat_all = [t for s, t in results if isinstance(s, int)]
    lat_ok = [t for s, t in results if s == 200]
    lat_503 = [t for s, t in results if s == 503]
    report = {
        "model": model_note,
        "capacity_rps": round(capacity, 2),
        "offered_rps": round(rate, 2),
        "duration_s": round(run["offered_s"], 1),
        "requests": len(results),
        "status_counts": dict(sorted(codes.items())),
        "unanswered": unanswered,
        "unexpected_5xx": bad_5xx,
        "goodput_rps": round(len(lat_ok) / run["offered_s"], 2),
        "latency_s": {
            "all": {"p50": percentile(lat_all, 50), "p95": percentile(lat_all, 95), "max": max(lat_all, default=0)},
            "200": {"p50": percentile(lat_ok, 50), "p95": percentile(lat_ok, 95), "max": max(lat_ok, default=0)},
            "503": {"p50": percentile(lat_503, 50), "p95": percentile(lat_503, 95), "max": max(lat_503, default=0)},
        },
        "server_rss_mb": {
            "before": round(rss_before, 1),
            "peak": round(run["peak_rss_mb"], 1),
            "after": round(rss_after, 1),
        },
        "server_alive_after": alive,
    }
    for group in report["latency_s"].values():
        for k, v in group.items():
            group[k] = round(v, 3)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    ok = unanswered == 0 and bad_5xx == 0 and alive
    print("PASS" if ok else f"FAIL (server log: {log})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
