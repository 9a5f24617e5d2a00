"""Benchmark: integrated gradients through ``grad.onnx`` with ONNX Runtime, per cell and per request.

Run with ``python benchmarks/bench_attribution.py`` (add ``--grad models/NAME/grad.onnx`` to use a
shipped gradient model). Without ``--grad`` it uses ``models/*/grad.onnx`` when one exists, otherwise
it exports an EfficientNet-B0 at ``--size`` (random weights, BatchNorm statistics set from cell-like
crops so outputs depend on the input) in a child process, so this process never imports TensorFlow.

Prints, for each step count:

* seconds for one cell (one class) and for one request of ``--cells`` cells (one class each);
* gradient evaluations per second;
* completeness error ``|sum(attr) - (f(x) - f(baseline))| / max(|f(x) - f(baseline)|, 1e-4)``
  over the request's cells (median, 90th percentile, max) and the absolute error;
* correlation of each map with the map at the largest step count (convergence of the map itself);
* peak Python/numpy memory of the call (tracemalloc) and the process's peak RSS (``ru_maxrss``).

The cells are crops of the real HPA sample (``../shared/hpa-samples``) when present, else synthetic.
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from locus.service.attribution import integrated_gradients  # noqa: E402
from locus.service.classes import NUM_CLASSES  # noqa: E402

SAMPLE = REPO.parent / "shared" / "hpa-samples"


def synthetic_cells(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Cell-like crops: a soft blob per channel plus noise, 0-255."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.zeros((n, size, size, 4), np.float32)
    for i in range(n):
        cy, cx, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.15, 0.3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        for ch in range(4):
            out[i, :, :, ch] = 255 * blob * rng.uniform(0.3, 1.0) + rng.normal(0, 6, (size, size))
    return np.clip(out, 0, 255)


def sample_cells(n: int, size: int) -> tuple[np.ndarray, str]:
    """Crops of the real HPA sample (classical segmentation), or synthetic crops when it is absent."""
    files = sorted(SAMPLE.glob("*_red.jpg"))
    if files:
        try:
            from locus.service.crop import CropRule, crop_cells
            from locus.service.imaging import load_field
            from locus.service.segmentation import make_segmenter

            stem = str(files[0])[: -len("_red.jpg")]
            image = load_field({c: f"{stem}_{c}.jpg" for c in ("red", "green", "blue", "yellow")})
            labels, _ = make_segmenter("classical").segment(image)
            _, batch = crop_cells(image, labels, CropRule(size=size))
            if len(batch):
                reps = int(np.ceil(n / len(batch)))
                return np.concatenate([batch] * reps)[:n], f"{len(batch)} cells of {Path(stem).name} (HPA sample)"
        except Exception as exc:  # noqa: BLE001 - fall back to synthetic crops
            print(f"(HPA sample unusable: {exc}; using synthetic crops)")
    return synthetic_cells(n, size), "synthetic crops"


def export_child(path: Path, size: int, batch: int) -> None:
    """Build a conditioned EfficientNet-B0 and export grad.onnx (runs in a child process with TensorFlow)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from locus.training.grad_export import export_grad_model

    keras.utils.set_random_seed(0)
    base = keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=(size, size, 4))
    feats = keras.layers.GlobalAveragePooling2D()(base.output)
    model = keras.Model(base.input, keras.layers.Dense(NUM_CLASSES, activation="sigmoid")(feats))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    real, _ = sample_cells(16, size)
    model(np.concatenate([synthetic_cells(16, size, seed=11), real]), training=True)
    for layer in model.layers:  # variance floor: keeps the random network well conditioned
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_variance.assign(np.maximum(layer.moving_variance.numpy(), 0.02))
    head = model.layers[-1]  # spread the probabilities (|p(x) - p(black)| up to ~0.3 on HPA crops)
    head.kernel.assign(head.kernel.numpy() * 10.0)
    t = time.perf_counter()
    entry = export_grad_model(model, path, batch=batch)
    print(f"exported {path} in {time.perf_counter() - t:.1f} s; parity {entry['parity']}")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grad", help="grad.onnx to benchmark (default: models/*/grad.onnx or a fresh B0 export)")
    ap.add_argument("--size", type=int, default=128, help="input size of the exported B0 (default 128)")
    ap.add_argument("--batch", type=int, default=16, help="fixed batch of the exported B0 (default 16)")
    ap.add_argument("--cells", type=int, default=20, help="cells per request (default 20)")
    ap.add_argument("--steps", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--baseline", default="black", choices=["black", "blur"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="also run each step count with this completeness tolerance (the service's LOCUS_IG_TOLERANCE; 0: skip)",
    )
    ap.add_argument("--max-steps", type=int, default=512, help="refinement ceiling (LOCUS_IG_MAX_STEPS)")
    ap.add_argument("--keep", help="save the exported grad.onnx here (reuse it later with --grad)")
    ap.add_argument("--export-to", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.export_to:
        export_child(Path(args.export_to), args.size, args.batch)
        return

    import onnxruntime as ort

    grad = args.grad or next(iter(sorted(glob.glob(str(REPO / "models" / "*" / "grad.onnx")))), None)
    tmp = None
    if grad is None:
        tmp = tempfile.TemporaryDirectory()
        grad = args.keep or str(Path(tmp.name) / "grad.onnx")
        cmd = [sys.executable, __file__, "--export-to", grad, "--size", str(args.size), "--batch", str(args.batch)]
        subprocess.run(cmd, check=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(grad, opts, providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    batch, size = int(shape[0]), int(shape[1])
    print(
        f"grad model {grad}: batch {batch}, input {size}, provider {sess.get_providers()[0]}, "
        f"{args.threads} threads, tensorflow imported: {'tensorflow' in sys.modules}"
    )
    cells, source = sample_cells(args.cells, size)
    print(f"cells: {source}; request = {args.cells} cells x 1 class; baseline {args.baseline}")

    # target: each cell's most probable class (from the endpoint probabilities of one batch)
    probs = []
    zeros_w = np.zeros((batch, NUM_CLASSES), np.float32)
    for i in range(0, len(cells), batch):
        chunk = np.zeros((batch, size, size, 4), np.float32)
        part = cells[i : i + batch]
        chunk[: len(part)] = part
        t = time.perf_counter()
        probs.append(sess.run(["probabilities"], {"image": chunk, "weights": zeros_w})[0][: len(part)])
        t_batch = time.perf_counter() - t
    probs = np.concatenate(probs)
    targets = [[int(np.argmax(p))] for p in probs]
    reps = []
    for _ in range(3):
        t = time.perf_counter()
        sess.run(["gradients", "probabilities"], {"image": chunk, "weights": zeros_w})
        reps.append(time.perf_counter() - t)
    t_batch = min(reps + [t_batch])
    print(f"one grad.onnx batch ({batch} rows): {t_batch * 1e3:.0f} ms = {t_batch / batch * 1e3:.1f} ms per evaluation")
    print(f"RSS after loading: {rss_mib():.0f} MiB")

    rows = []
    maps_by_steps = {}
    for steps in args.steps:
        t = time.perf_counter()
        integrated_gradients(sess, batch, cells[:1], targets[:1], steps=steps, baseline=args.baseline)
        t_cell = time.perf_counter() - t
        tracemalloc.start()
        t = time.perf_counter()
        res = integrated_gradients(sess, batch, cells, targets, steps=steps, baseline=args.baseline)
        t_req = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rel = np.array([m.completeness_rel for r in res for m in r])
        ab = np.array([m.completeness_abs for r in res for m in r])
        maps_by_steps[steps] = [r[0].attribution for r in res]
        rows.append((steps, t_cell, t_req, len(cells) * (steps + 1) / t_req, rel, ab, peak / 2**20, rss_mib()))
    ref_steps = max(args.steps)
    print()
    print(
        f"{'steps':>5} {'s/cell':>7} {'s/request':>9} {'eval/s':>7} {'compl. rel median':>17} {'p90':>9} "
        f"{'max':>9} {'abs max':>9} {'corr to ' + str(ref_steps):>11} {'tracemalloc':>11} {'peak RSS':>9}"
    )
    for steps, t_cell, t_req, eps, rel, ab, peak, rss in rows:
        corr = min(
            float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
            for a, b in zip(maps_by_steps[steps], maps_by_steps[ref_steps], strict=True)
        )
        print(
            f"{steps:>5} {t_cell:>7.2f} {t_req:>9.2f} {eps:>7.0f} {np.median(rel):>17.2e} "
            f"{np.percentile(rel, 90):>9.2e} {rel.max():>9.2e} {ab.max():>9.2e} {corr:>11.6f} "
            f"{peak:>9.1f}Mi {rss:>7.0f}Mi"
        )
    print("\ncompleteness: per-cell relative errors at each step count")
    for steps, _t_cell, _t_req, _eps, rel, *_ in rows:
        print(f"  {steps:>4}: " + " ".join(f"{e:.1e}" for e in rel))
    if args.tolerance > 0:
        print(
            f"\nwith tolerance {args.tolerance:g} (the service's default; refined by midpoints up to {args.max_steps} "
            "steps: a map refined to n steps cost n + 1 evaluations)"
        )
        print(
            f"{'start':>5} {'s/request':>9} {'evals':>7} {'compl. rel median':>17} {'p90':>9} {'max':>9} "
            f"{'corr to ' + str(ref_steps):>11}  steps used"
        )
        for steps in args.steps:
            t = time.perf_counter()
            res_t = integrated_gradients(
                sess,
                batch,
                cells,
                targets,
                steps=steps,
                baseline=args.baseline,
                tolerance=args.tolerance,
                max_steps=max(steps, args.max_steps),
            )
            t_req = time.perf_counter() - t
            maps = [r[0] for r in res_t]
            rel = np.array([m.completeness_rel for m in maps])
            used = [m.steps for m in maps]
            corr = min(
                float(np.corrcoef(m.attribution.ravel(), b.ravel())[0, 1])
                for m, b in zip(maps, maps_by_steps[ref_steps], strict=True)
            )
            hist = ", ".join(f"{k}: {used.count(k)}" for k in sorted(set(used)))
            print(
                f"{steps:>5} {t_req:>9.2f} {sum(u + 1 for u in used):>7} {np.median(rel):>17.2e} "
                f"{np.percentile(rel, 90):>9.2e} {rel.max():>9.2e} {corr:>11.6f}  {hist}"
            )
    f_delta = [abs(m.f_input - m.f_baseline) for m in (r[0] for r in res)]
    print(f"|f(x) - f(baseline)| over the cells: median {np.median(f_delta):.3f}, min {np.min(f_delta):.3g}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
