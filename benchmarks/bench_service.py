"""Benchmark the Locus service over HTTP against the naive notebook pipeline on the same fields.

The service side starts ``locus serve`` (or targets ``--url``), sends ``--requests``
POST /classify requests from ``--concurrency`` client threads (httpx) over a set of
HPA-sim fields (``--fields`` of ``--size``², generated once and cached as PNGs in a
temporary folder), and prints images/s, cells/s, p50/p95/p99 latency overall and
per pipeline stage (the response's ``timings_ms``), the provider (GET /model) and
the peak RSS of the server process.

The naive side is what a notebook does: full-resolution segmentation (the
classical segmenter with its downscaling disabled) and the Keras model called
once per cell (``model.predict`` on one crop at a time). The Keras model is the
model folder's ``.keras`` checkpoint when it has one, otherwise an untrained
EfficientNet-B0 of the manifest's input size (the cost is the same). Without
TensorFlow the naive side is skipped with a note.

Prints numbers; asserts nothing about timings.

Examples
--------
``python benchmarks/bench_service.py --fields 4 --size 2048 --concurrency 2 --requests 8``
``python benchmarks/bench_service.py --url http://gpu-host:8000 --no-naive``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from locus.service.classes import CHANNELS  # noqa: E402

DEFAULT_MODEL = REPO / "models" / "locus-sim-b0"


# ----------------------------------------------------------------------------- fields
def make_fields(n: int, size: int, seed: int, cache_root: Path) -> tuple[Path, list[str]]:
    """Generate (once) ``n`` HPA-sim fields of ``size``² as 8-bit channel PNGs.

    Parameters
    ----------
    n, size, seed : int
        Number of fields, side, dataset seed.
    cache_root : Path
        Parent of the cache folder.

    Returns
    -------
    folder : Path
        The folder with ``{ID}_{channel}.png``.
    ids : list of str
        Field ids.
    """
    from locus.training.sim.generator import SimConfig, field_id, generate_field

    folder = cache_root / f"locus-bench-fields-{size}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n):
        fid = field_id(i)
        ids.append(fid)
        if all((folder / f"{fid}_{c}.png").is_file() for c in CHANNELS):
            continue
        f = generate_field(i, seed, SimConfig(size=size))
        for k, c in enumerate(CHANNELS):
            cv2.imwrite(str(folder / f"{fid}_{c}.png"), f.image[:, :, k])
    return folder, ids


def load_field(folder: Path, fid: str) -> np.ndarray:
    """The (H, W, 4) R, G, B, Y field of one id."""
    return np.dstack([cv2.imread(str(folder / f"{fid}_{c}.png"), cv2.IMREAD_UNCHANGED) for c in CHANNELS])


# ----------------------------------------------------------------------------- server process
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_server(model: Path, segmenter: str, env_extra: dict[str, str]) -> Iterator[tuple[str, int]]:
    """Start ``locus serve`` on a free port; yield (url, pid); stop it with SIGTERM."""
    import httpx

    port = _free_port()
    env = {**os.environ, "LOCUS_LOG_LEVEL": "warning", **env_extra}
    cmd = [sys.executable, "-m", "locus.cli", "serve", "--port", str(port), "--model", str(model)]
    cmd += ["--segmenter", segmenter]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            raise RuntimeError("the server did not become ready in 180 s")
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


class RssSampler:
    """Peak resident memory of a process: VmHWM from /proc, else the largest psutil sample."""

    def __init__(self, pid: int | None, every_s: float = 0.2) -> None:
        self.pid = pid
        self.every_s = every_s
        self.peak_sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import psutil

            self._proc = psutil.Process(pid) if pid else None
        except Exception:  # psutil absent or the process gone
            self._proc = None

    def __enter__(self) -> RssSampler:
        if self._proc is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.peak_sampled = max(self.peak_sampled, self._proc.memory_info().rss)
            self._stop.wait(self.every_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def peak_bytes(self) -> tuple[int | None, str]:
        """The peak and where it came from."""
        if self.pid:
            status = Path(f"/proc/{self.pid}/status")
            with contextlib.suppress(OSError):
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024, "VmHWM"
        if self.peak_sampled:
            return self.peak_sampled, "psutil samples"
        return None, "unknown (remote server: pass --server-pid on its host)"


# ----------------------------------------------------------------------------- service side
def pct(values: list[float], q: float) -> float:
    """Percentile ``q`` (0-100) of a list; NaN when empty."""
    return float(np.percentile(values, q)) if values else float("nan")


def bench_service(
    url: str, folder: Path, ids: list[str], concurrency: int, requests: int, pid: int | None, api_key: str | None
) -> dict:
    """Send the requests and gather latencies, stage timings, cells, provider and peak RSS."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    payloads = {fid: {c: (folder / f"{fid}_{c}.png").read_bytes() for c in CHANNELS} for fid in ids}
    with httpx.Client(timeout=600, headers=headers) as c:
        info = c.get(f"{url}/model").json()
        # warm-up: one request (sessions, CUDA kernels, allocator) before timing
        first = ids[0]
        files = {ch: (f"{first}_{ch}.png", payloads[first][ch], "image/png") for ch in CHANNELS}
        c.post(f"{url}/classify", files=files).raise_for_status()

    local = threading.local()

    def one(k: int) -> tuple[float, dict, int]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(timeout=600, headers=headers)
        fid = ids[k % len(ids)]
        files = {ch: (f"{fid}_{ch}.png", payloads[fid][ch], "image/png") for ch in CHANNELS}
        t = time.perf_counter()
        r = client.post(f"{url}/classify", files=files)
        dt = time.perf_counter() - t
        r.raise_for_status()
        body = r.json()
        return dt, body.get("timings_ms", {}), int(body.get("cell_count", len(body.get("cells", []))))

    with RssSampler(pid) as rss:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - t0
    peak, source = rss.peak_bytes()
    lat = [r[0] * 1e3 for r in results]
    stages: dict[str, list[float]] = {}
    for _, timings, _ in results:
        for k, v in timings.items():
            stages.setdefault(k, []).append(float(v))
    cells = sum(r[2] for r in results)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "wall_s": wall,
        "images_per_s": requests / wall,
        "cells_per_s": cells / wall,
        "cells_per_image": cells / requests,
        "latency_ms": {"p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99)},
        "stages_ms": {k: {"p50": pct(v, 50), "p95": pct(v, 95), "p99": pct(v, 99)} for k, v in stages.items()},
        "provider": info.get("provider"),
        "segmenter": info.get("segmenter"),
        "model": f"{info.get('name')} {info.get('version')}",
        "peak_rss_mib": peak / 2**20 if peak else None,
        "peak_rss_source": source,
    }


# ----------------------------------------------------------------------------- naive side
def keras_model(model_dir: Path, input_size: int):
    """The folder's ``.keras`` checkpoint, else an EfficientNet-B0 (random weights) of the input size."""
    import keras

    checkpoints = sorted(model_dir.glob("*.keras"))
    if checkpoints:
        return keras.models.load_model(checkpoints[0], compile=False), f"checkpoint {checkpoints[0].name}"
    try:
        from locus.training.model import build_model

        return build_model("b0", input_size=input_size), "locus.training.model.build_model('b0') (random weights)"
    except Exception as exc:  # the training package is optional here
        base = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(input_size,) * 2 + (4,))
        x = keras.layers.GlobalAveragePooling2D()(base.output)
        out = keras.layers.Dense(19, activation="sigmoid")(x)
        return keras.Model(base.input, out), f"keras.applications.EfficientNetB0 (random weights; {exc})"


def bench_naive(folder: Path, ids: list[str], model_dir: Path, n_fields: int) -> dict:
    """Full-resolution classical segmentation + one ``model.predict`` per cell, field by field."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return {"skipped": "TensorFlow is not installed (pip install -e '.[train]'): naive pipeline not run"}
    from locus.service.crop import crop_cells
    from locus.service.manifest import load_manifest
    from locus.service.segmentation.classical import ClassicalSegmenter

    manifest = load_manifest(model_dir)
    rule = manifest.crop.rule()
    model, source = keras_model(model_dir, manifest.input_size)
    seg = ClassicalSegmenter(work_side=10**6)  # no downscaling: full resolution, as a notebook would
    model.predict(np.zeros((1, manifest.input_size, manifest.input_size, 4), np.float32), verbose=0)  # build
    times, seg_times, cls_times, cells = [], [], [], 0
    for fid in ids[:n_fields]:
        image = load_field(folder, fid)
        t = time.perf_counter()
        labels, _ = seg.segment(image)
        t_seg = time.perf_counter()
        ids_, batch = crop_cells(image, labels, rule)
        for i in range(len(ids_)):
            model.predict(batch[i : i + 1], verbose=0)
        t_end = time.perf_counter()
        seg_times.append((t_seg - t) * 1e3)
        cls_times.append((t_end - t_seg) * 1e3)
        times.append(t_end - t)
        cells += len(ids_)
    wall = sum(times)
    return {
        "fields": len(times),
        "images_per_s": len(times) / wall,
        "cells_per_s": cells / wall,
        "cells_per_image": cells / len(times),
        "latency_ms": {"p50": pct([t * 1e3 for t in times], 50)},
        "segment_ms_p50": pct(seg_times, 50),
        "classify_ms_p50": pct(cls_times, 50),
        "keras_model": source,
    }


def b0_model_folder(root: Path, input_size: int = 64) -> tuple[Path, str]:
    """A model folder whose ONNX model is an (untrained) EfficientNet-B0, plus the same network as ``.keras``.

    Used when the shipped model is absent, so both sides of the comparison run the
    same network. Without TensorFlow, a small linear test folder (cheaper than B0).
    """
    from tests.modelfolder import write_model_folder

    folder = root / f"locus-bench-model-b0-{input_size}"
    if (folder / "manifest.json").is_file() and (folder / "model.keras").is_file():
        return folder, "EfficientNet-B0, random weights (cached)"
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        folder = write_model_folder(root / "locus-bench-model-linear", input_size=input_size)
        return folder, "linear test classifier (TensorFlow absent: no B0 to export)"
    from locus.service.manifest import sha256_file
    from locus.training.export import convert_to_onnx

    write_model_folder(folder, input_size=input_size)
    model, source = keras_model(folder, input_size)
    model.save(folder / "model.keras")
    convert_to_onnx(model, folder / "model.onnx")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(
        name="bench-b0", architecture="efficientnet-b0", files={"model.onnx": sha256_file(folder / "model.onnx")}
    )
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder, f"EfficientNet-B0, random weights ({source})"


# ----------------------------------------------------------------------------- report
def print_report(service: dict, naive: dict | None) -> None:
    """Print the numbers."""
    s = service
    print(f"\n== service ({s['model']}, segmenter {s['segmenter']}, provider {s['provider']})")
    print(f"requests {s['requests']} at concurrency {s['concurrency']} in {s['wall_s']:.1f} s")
    print(f"images/s {s['images_per_s']:.3f}   cells/s {s['cells_per_s']:.1f}   cells/image {s['cells_per_image']:.1f}")
    lat = s["latency_ms"]
    print(f"latency ms  p50 {lat['p50']:.0f}  p95 {lat['p95']:.0f}  p99 {lat['p99']:.0f}")
    for k, v in s["stages_ms"].items():
        print(f"  stage {k:<10} p50 {v['p50']:8.1f}  p95 {v['p95']:8.1f}  p99 {v['p99']:8.1f} ms")
    rss = f"{s['peak_rss_mib']:.0f} MiB" if s["peak_rss_mib"] else "n/a"
    print(f"server peak RSS {rss} ({s['peak_rss_source']})")
    if naive is None:
        return
    print("\n== naive notebook pipeline (full-resolution segmentation + model.predict per cell)")
    if "skipped" in naive:
        print(f"note: {naive['skipped']}")
        return
    print(f"fields {naive['fields']}  images/s {naive['images_per_s']:.4f}  cells/s {naive['cells_per_s']:.1f}")
    print(
        f"per field p50 {naive['latency_ms']['p50']:.0f} ms (segment {naive['segment_ms_p50']:.0f} ms, "
        f"per-cell predict {naive['classify_ms_p50']:.0f} ms); model: {naive['keras_model']}"
    )
    print(f"\nratio service/naive: {s['images_per_s'] / naive['images_per_s']:.1f}x images/s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="target a running service instead of starting one")
    p.add_argument("--server-pid", type=int, default=None, help="pid of the --url server for peak RSS (same host)")
    p.add_argument("--model", type=Path, default=None, help="model folder (default models/locus-sim-b0 or a test one)")
    p.add_argument("--fields", type=int, default=4, help="distinct HPA-sim fields")
    p.add_argument("--size", type=int, default=2048, help="field side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=2, help="client threads")
    p.add_argument("--requests", type=int, default=8, help="timed requests")
    p.add_argument("--segmenter", default="classical", help="classical, hpa or hpacellseg (started server only)")
    p.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True, help="run the naive pipeline")
    p.add_argument("--naive-fields", type=int, default=2, help="fields through the naive pipeline")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()), help="where fields are cached")
    p.add_argument("--api-key", default=os.environ.get("LOCUS_API_KEY"), help="bearer key, if the service needs one")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    p.add_argument(
        "--formats",
        action="store_true",
        help="per-stage p50 vs floors for tinted JPEG, PNG 8/16-bit and TIFF at --format-sizes (see bench_formats.py)",
    )
    p.add_argument("--format-sizes", default="1728,2048,3072", help="field sides for --formats")
    p.add_argument("--format-kinds", default="jpeg-tinted,png8,png16,tiff16", help="input kinds for --formats")
    p.add_argument("--reps", type=int, default=3, help="requests per case for --formats")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = args.model
    if model is None:
        if (DEFAULT_MODEL / "manifest.json").is_file():
            model = DEFAULT_MODEL
        else:
            model, what = b0_model_folder(args.cache_dir, input_size=64)
            print(f"note: {DEFAULT_MODEL} is absent; using {model}: {what}")
    t = time.perf_counter()
    folder, ids = make_fields(args.fields, args.size, args.seed, args.cache_dir)
    print(f"{len(ids)} fields of {args.size}² in {folder} ({time.perf_counter() - t:.1f} s)")
    if args.formats:
        return run_formats(args, model)
    if args.url:
        service = bench_service(
            args.url.rstrip("/"), folder, ids, args.concurrency, args.requests, args.server_pid, args.api_key
        )
    else:
        keys = {"LOCUS_API_KEYS": args.api_key} if args.api_key else {}
        with start_server(model, args.segmenter, keys) as (url, pid):
            service = bench_service(url, folder, ids, args.concurrency, args.requests, pid, args.api_key)
    naive = bench_naive(folder, ids, model, args.naive_fields) if args.naive else None
    print_report(service, naive)
    if args.json:
        args.json.write_text(json.dumps({"service": service, "naive": naive}, indent=2))
    return 0


def run_formats(args: argparse.Namespace, model: Path) -> int:
    """``--formats``: the real input kinds, stage by stage, then the naive pipeline on JPEG and 16-bit PNG."""
    from bench_formats import bench_formats, cases, print_header

    sizes = [int(s) for s in args.format_sizes.split(",") if s]
    kinds = [k for k in args.format_kinds.split(",") if k]
    with start_server(model, args.segmenter, {}) as (url, pid):
        print_header()
        rows = bench_formats(url, pid, model, sizes, kinds, args.reps, args.seed)
    if args.naive:
        print("\nnaive notebook pipeline (full-resolution segmentation + model.predict per cell), one field each:")
        tmp = Path(tempfile.mkdtemp(prefix="locus-bench-naive-"))
        for kind in ("jpeg-tinted", "png16"):
            name = next((n for n in cases([2048], [kind], args.seed) if n.startswith("sim")), None)
            files = cases([2048], [kind], args.seed)[name]
            from locus.service.imaging import decode_field

            image = decode_field(files)
            for k, c in enumerate(CHANNELS):
                cv2.imwrite(str(tmp / f"F_{c}.png"), image[:, :, k])
            naive = bench_naive(tmp, ["F"], model, 1)
            if "skipped" in naive:
                print(naive["skipped"])
                break
            ours = next(r for r in rows if r["case"] == name)
            ratio = naive["latency_ms"]["p50"] / ours["wall_p50"]
            naive_ms = naive["latency_ms"]["p50"]
            print(f"  {name}: naive {naive_ms:.0f} ms vs service {ours['wall_p50']:.0f} ms: {ratio:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
