"""What users send, stage by stage: per-stage p50 next to each stage's floor, CPU core-time per field.

Used by ``bench_service.py --formats`` (and runnable alone). For each input kind
(HPA website tinted JPEG, 8- and 16-bit PNG, 16-bit TIFF) at 1728², 2048² and 3072²,
plus the real sample (tinted JPEGs, 1728²) and a real Kaggle field (PNG, 2048²) when
``../shared`` is present, it sends ``--reps`` sequential requests to a real ``locus
serve`` process and prints, per stage, the service's p50 (from the answer's
``timings_ms``) next to the floor measured in the same run:

- decode: ``cv2.imdecode`` of the four files, no checks, one after the other (and the
  same four in parallel on four threads, as the service decodes);
- segment: the same classical algorithm written lean (the downscale in the image's own
  dtype, labels upsampled as ``uint16``), with its agreement to the service's cells;
- crop: the crop of the same cells (``locus.service.crop.crop_cells``) alone, in this process;
- classify: one ONNX Runtime batch of the same number of cells with the same model.

CPU core-seconds per field are the server process's user + system time over the
requests, divided by the requests; "-model" subtracts the CPU time one ONNX Runtime
batch of the same cells takes in this process with the service's session options
(the goal of 150 ms per 2048² field excludes the model, which a GPU host moves off
the CPU). Prints numbers; asserts nothing.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from locus.service.classes import CHANNELS

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINTS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}


def _tinted_jpeg(channel: np.ndarray, colour: str, quality: int = 90) -> bytes:
    """The channel as the HPA website serves it: an RGB JPEG tinted in the channel's colour."""
    v = channel if channel.dtype == np.uint8 else (channel // 257).astype(np.uint8)
    rgb = np.dstack([v * np.uint8(k) for k in TINTS[colour]])
    ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes()


def _png(channel: np.ndarray) -> bytes:
    return cv2.imencode(".png", channel)[1].tobytes()


def _tiff(channel: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, channel, compression="zlib")
    return buf.getvalue()


ENCODERS: dict[str, Callable[[np.ndarray, str], bytes]] = {
    "jpeg-tinted": _tinted_jpeg,
    "png8": lambda a, c: _png(a if a.dtype == np.uint8 else (a // 257).astype(np.uint8)),
    "png16": lambda a, c: _png(a if a.dtype == np.uint16 else a.astype(np.uint16) * np.uint16(257)),
    "tiff16": lambda a, c: _tiff(a if a.dtype == np.uint16 else a.astype(np.uint16) * np.uint16(257)),
}


def cases(sizes: list[int], kinds: list[str], seed: int) -> dict[str, dict[str, bytes]]:
    """Name -> the four channel files, for every (kind, size) and the real fields when present."""
    from locus.training.sim.generator import SimConfig, generate_field

    out: dict[str, dict[str, bytes]] = {}
    real = SHARED / "hpa-samples"
    if (real / "89_B5_1_red.jpg").is_file():
        out["real 89_B5_1 jpeg-tinted 1728"] = {c: (real / f"89_B5_1_{c}.jpg").read_bytes() for c in CHANNELS}
    kaggle = SHARED / "hpa-real"
    firsts = sorted(kaggle.glob("*_red.png")) if kaggle.is_dir() else []
    if firsts:
        fid = firsts[0].name[: -len("_red.png")]
        out[f"real {fid[:8]} png8 2048"] = {c: (kaggle / f"{fid}_{c}.png").read_bytes() for c in CHANNELS}
    for size in sizes:
        field = generate_field(0, seed, SimConfig(size=size, bit_depth=16)).image
        for kind in kinds:
            out[f"sim {kind} {size}"] = {c: ENCODERS[kind](field[:, :, k], c) for k, c in enumerate(CHANNELS)}
    return out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def decode_floor(files: dict[str, bytes], reps: int = 3) -> tuple[float, float]:
    """(sequential, four threads) ms of plain ``cv2.imdecode`` of the four files; best of ``reps``."""

    def one(data: bytes) -> np.ndarray:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)

    seq, par = [], []
    with ThreadPoolExecutor(4) as pool:
        for _ in range(reps):
            t = time.perf_counter()
            for c in CHANNELS:
                one(files[c])
            seq.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            list(pool.map(one, [files[c] for c in CHANNELS]))
            par.append((time.perf_counter() - t) * 1e3)
    return min(seq), min(par)


def lean_segment(image: np.ndarray) -> np.ndarray:
    """The classical algorithm with its bookkeeping stripped: native-dtype downscale, uint16 label upsampling."""
    from locus.service.imaging import to_unit255
    from locus.service.segmentation.classical import ClassicalSegmenter, normalise_channel

    seg = ClassicalSegmenter()
    cfg = seg.config
    h, w = image.shape[:2]
    scale, ref = seg._scales((h, w))
    small = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    work = to_unit255(small)
    norm = np.dstack(
        [normalise_channel(work[:, :, c], cfg.low_percentile, cfg.high_percentile, cfg.min_contrast) for c in range(4)]
    ).astype(np.float32)
    nuclei = seg.segment_nuclei(norm[:, :, 2], ref)
    cells = seg.segment_cells(norm, nuclei, ref)
    return cv2.resize(cells.astype(np.uint16), (w, h), interpolation=cv2.INTER_NEAREST)


def model_floor(model_dir: Path, n_cells: int, reps: int = 3) -> tuple[float, float]:
    """One ONNX Runtime batch of ``n_cells`` crops with the model folder's network, as the service runs it.

    The session is made by the service's own ``create_session`` (same threads, no spinning), so its CPU
    time is what the classify stage costs the server.

    Returns
    -------
    wall_ms : float
        Best of ``reps``.
    cpu_s : float
        Median process CPU seconds (all threads) of one batch: the model's share of a field's core-time.
    """
    from locus.service.config import PipelineSettings
    from locus.service.inference import create_session
    from locus.service.manifest import load_manifest

    m = load_manifest(model_dir)
    sess, _ = create_session(
        model_dir / "model.onnx", ["CPUExecutionProvider"], intra_op_threads=PipelineSettings().resolved_threads()
    )
    x = np.random.default_rng(0).random((max(n_cells, 1), m.input_size, m.input_size, 4), dtype=np.float32) * 255
    sess.run(None, {m.input_name: x})
    best, cpus = float("inf"), []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        sess.run(None, {m.input_name: x})
        best = min(best, (time.perf_counter() - t) * 1e3)
        cpus.append(time.process_time() - c)
    return best, float(np.median(cpus))


def bench_formats(url: str, pid: int, model_dir: Path, sizes: list[int], kinds: list[str], reps: int, seed: int):
    """Run every case through the server; return rows of numbers."""
    import httpx

    from locus.service.crop import crop_cells
    from locus.service.imaging import decode_field
    from locus.service.manifest import load_manifest
    from locus.service.segmentation.classical import ClassicalSegmenter

    rule = load_manifest(model_dir).crop.rule()
    rows = []
    with httpx.Client(timeout=600) as client:
        for name, files in cases(sizes, kinds, seed).items():
            multipart = {c: (f"{c}.bin", files[c], "application/octet-stream") for c in CHANNELS}
            client.post(f"{url}/classify", files=multipart).raise_for_status()  # warm-up
            stages: dict[str, list[float]] = {}
            walls = []
            cpu0 = _cpu_seconds(pid)
            for _ in range(reps):
                t = time.perf_counter()
                r = client.post(f"{url}/classify", files=multipart, params={"include_masks": "true"})
                walls.append((time.perf_counter() - t) * 1e3)
                r.raise_for_status()
                body = r.json()
                for k, v in body["timings_ms"].items():
                    stages.setdefault(k, []).append(v)
            cpu = (_cpu_seconds(pid) - cpu0) / reps
            n = body["cell_count"]
            image = decode_field(files)
            seq, par = decode_floor(files)
            t = time.perf_counter()
            lean = lean_segment(image)
            seg_floor = (time.perf_counter() - t) * 1e3
            cells, _ = ClassicalSegmenter().segment(image)
            agree = float(((lean > 0) == (cells > 0)).mean())
            t = time.perf_counter()
            crop_cells(image, cells, rule)
            crop_ms = (time.perf_counter() - t) * 1e3
            classify_ms, model_cpu = model_floor(model_dir, n)
            rows.append(
                {
                    "case": name,
                    "cells": n,
                    "wall_p50": float(np.median(walls)),
                    "stages_p50": {k: float(np.median(v)) for k, v in stages.items()},
                    "decode_floor_seq": seq,
                    "decode_floor_par": par,
                    "segment_lean": seg_floor,
                    "segment_lean_fg_agreement": agree,
                    "crop_alone": crop_ms,
                    "classify_floor": classify_ms,
                    "cpu_s_per_field": cpu,
                    "model_cpu_s": model_cpu,
                    "cpu_s_excl_model": cpu - model_cpu,
                }
            )
            print_row(rows[-1])
    return rows


def print_header() -> None:
    """Print the table header."""
    print(
        f"\n{'case':<34}{'cells':>6}{'total':>8} | {'decode':>7}{'floor':>12} | {'segment':>8}{'lean':>7} | "
        f"{'crop':>6}{'/cell':>6} | {'classify':>9}{'floor':>7} | {'encode':>7} | {'CPU s':>6}{'-model':>7}"
    )


def print_row(r: dict) -> None:
    """Print one case."""
    s = r["stages_p50"]
    per_cell = s.get("crop", 0) / max(r["cells"], 1)
    print(
        f"{r['case']:<34}{r['cells']:>6}{r['wall_p50']:>8.0f} | {s.get('decode', 0):>7.0f}"
        f"{r['decode_floor_seq']:>6.0f}/{r['decode_floor_par']:<5.0f} | {s.get('segment', 0):>8.0f}"
        f"{r['segment_lean']:>7.0f} | {s.get('crop', 0):>6.0f}{per_cell:>6.1f} | {s.get('classify', 0):>9.0f}"
        f"{r['classify_floor']:>7.0f} | {s.get('encode', 0):>7.0f} | {r['cpu_s_per_field']:>6.2f}"
        f"{r['cpu_s_excl_model']:>7.2f}"
    )
