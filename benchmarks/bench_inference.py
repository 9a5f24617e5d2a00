"""Per-cell inference time: the exported ONNX model in ONNX Runtime vs the Keras model, side by side.

Usage::

    python benchmarks/bench_inference.py                       # fresh B0 at 64 px, exported to a temp folder
    python benchmarks/bench_inference.py --checkpoint runs/x/best.keras [--onnx models/x/model.onnx]
    python benchmarks/bench_inference.py --input-size 224 --batches 1 8 32 --repeats 10

Prints, per batch size, the median time per batch and per cell of ONNX Runtime
(``session.run``), Keras ``model.predict`` and a direct Keras call
(``model(x, training=False)``), on the same inputs. Numbers only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (graph tracing, allocations)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments.

    Returns
    -------
    int
        0.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="Keras model (.keras); default: a fresh B0")
    parser.add_argument("--onnx", default=None, help="its ONNX export; default: exported now to a temp folder")
    parser.add_argument("--input-size", type=int, default=64, help="input side of the fresh model")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)

    import keras
    import onnxruntime as ort

    from locus.training.export import convert_to_onnx
    from locus.training.model import build_model

    model = (
        keras.models.load_model(args.checkpoint, compile=False)
        if args.checkpoint
        else build_model("b0", args.input_size)
    )
    size = int(model.input_shape[1])
    tmp = None
    onnx_path = args.onnx
    if onnx_path is None:
        tmp = tempfile.TemporaryDirectory()
        onnx_path = convert_to_onnx(model, Path(tmp.name) / "model.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    print(
        f"EfficientNet {model.name}, input {size}x{size}x4, {model.count_params() / 1e6:.2f}M parameters; "
        f"ONNX Runtime {ort.__version__} {sess.get_providers()[0]} ({args.threads} threads), "
        f"Keras {keras.__version__}; {os.cpu_count()} CPU cores; median of {args.repeats}"
    )
    head = (
        f"{'batch':>5} | {'ORT ms/batch':>12} {'ms/cell':>8} | {'predict ms/batch':>16} {'ms/cell':>8} "
        f"{'x ORT':>6} | {'call ms/batch':>13} {'ms/cell':>8} {'x ORT':>6} | {'max|diff|':>9}"
    )
    print(head)
    print("-" * len(head))
    for b in args.batches:
        x = rng.uniform(0, 255, (b, size, size, 4)).astype(np.float32)
        t_ort = _time(lambda x=x: sess.run(["probabilities"], {"image": x}), args.repeats)
        t_pred = _time(lambda x=x, b=b: model.predict(x, batch_size=b, verbose=0), args.repeats)
        t_call = _time(lambda x=x: model(x, training=False), args.repeats)
        diff = float(np.abs(sess.run(["probabilities"], {"image": x})[0] - np.asarray(model(x, training=False))).max())
        print(
            f"{b:>5} | {t_ort * 1e3:>12.1f} {t_ort * 1e3 / b:>8.2f} | {t_pred * 1e3:>16.1f} {t_pred * 1e3 / b:>8.2f} "
            f"{t_pred / t_ort:>6.1f} | {t_call * 1e3:>13.1f} {t_call * 1e3 / b:>8.2f} {t_call / t_ort:>6.1f} | "
            f"{diff:>9.1e}"
        )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
