"""The model on a GPU: ONNX Runtime's CUDA provider against its CPU provider and against the floor.

For a model folder (default ``models/locus-sim-b0``) and batches of crops as fields make them
(cells x test-time views, e.g. 10 cells x 1 view up to 30 cells x 8 views), prints per batch size:

- ``cpu``: the CPU provider with every core, the service's session options (a host without a GPU);
- ``cuda``: the CUDA provider as the service runs it (``HEURISTIC`` search; numpy in, numpy out: the upload and
  download count);
- ``cuda floor``: the same session with the input already on the GPU and the output left there (I/O binding),
  the GPU's own compute and launches, the least any caller could pay;
- ``first call``: the first call of each new batch size, for each cuDNN convolution algorithm search
  (``EXHAUSTIVE``, ONNX Runtime's default, ``HEURISTIC``, ``DEFAULT``): a service meets a new batch size with
  almost every field, since cells per field vary.

Then fields as the service classifies them (``Classifier.predict`` on the crops x 8 views of the five real
fields: 152, 88, 136, 136 and 80 rows in chunks of ``max_batch``), two passes, with ``fixed_batch`` off and on:
without it every change of batch shape between calls costs a new cuDNN algorithm search. Then integrated
gradients: the gradient model (``grad.onnx``, fixed batch) per gradient evaluation on each provider.
Without a GPU the CUDA rows are skipped with a note. Prints numbers; asserts nothing.

Examples
--------
``python benchmarks/bench_gpu.py``
``python benchmarks/bench_gpu.py --batches 10 30 80 240 --repeats 20 --json gpu.json``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


def _median_ms(fn, repeats: int) -> float:
    """Median ms of ``repeats`` calls after one warm-up (:func:`bench_inference._time`)."""
    from bench_inference import _time

    return 1000 * _time(fn, repeats)


def _once_ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t)


def _floor_ms(session, input_name: str, output_name: str, x: np.ndarray, repeats: int) -> float:
    """Median ms of ``run_with_iobinding`` with the input on the GPU and the output left there."""
    import onnxruntime as ort

    binding = session.io_binding()
    binding.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    binding.bind_output(output_name, "cuda", 0)

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return _median_ms(run, repeats)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print tables.

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
    parser.add_argument("--model", type=Path, default=REPO / "models" / "locus-sim-b0")
    parser.add_argument("--batches", type=int, nargs="+", default=[10, 30, 80, 240])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from locus.service.inference import create_session
    from locus.service.manifest import load_manifest

    manifest = load_manifest(args.model)
    size = manifest.input_size
    rng = np.random.default_rng(0)
    gpu = "CUDAExecutionProvider" in ort.get_available_providers() and any(
        Path(p).exists() for p in ("/dev/nvidia0", "/proc/driver/nvidia")
    )
    print(f"onnxruntime {ort.__version__}, available {ort.get_available_providers()}, cores {os.cpu_count()}")
    print(f"model {manifest.name} {manifest.version}: input {size}x{size}x4")
    out: dict = {"onnxruntime": ort.__version__, "cores": os.cpu_count(), "model": manifest.version, "rows": []}

    path = args.model / "model.onnx"
    cpu, _ = create_session(path, ["CPUExecutionProvider"])
    sessions = {}
    if gpu:
        for search in SEARCHES:
            sessions[search], report = create_session(
                path,
                ["CUDAExecutionProvider", "CPUExecutionProvider"],
                provider_options={"CUDAExecutionProvider": {"cudnn_conv_algo_search": search}},
            )
            print(f"cuda session ({search}): obtained {list(report.obtained)}")
    else:
        print("no GPU here: the CUDA rows are skipped")

    iname, oname = manifest.input_name, manifest.output_name
    head = f"{'crops':>6} {'cpu ms':>9} {'cuda ms':>9} {'floor ms':>9} {'per crop us cpu/cuda':>22}  first call ms"
    print("\n" + head, end="")
    print("  " + " / ".join(SEARCHES) if gpu else "")
    for n in args.batches:
        x = rng.uniform(0, 255, (n, size, size, 4)).astype(np.float32)
        row: dict = {"crops": n}
        row["cpu_ms"] = _median_ms(lambda x=x: cpu.run([oname], {iname: x}), max(3, args.repeats // 4))
        line = f"{n:>6} {row['cpu_ms']:>9.2f}"
        if gpu:
            first = {s: _once_ms(lambda s=s, x=x: sessions[s].run([oname], {iname: x})) for s in SEARCHES}
            main_s = sessions["HEURISTIC"]  # the service's default search
            row["cuda_ms"] = _median_ms(lambda x=x, m=main_s: m.run([oname], {iname: x}), args.repeats)
            row["floor_ms"] = _floor_ms(main_s, iname, oname, x, args.repeats)
            row["first_call_ms"] = first
            row["cuda_ms_by_search"] = {
                s: _median_ms(lambda s=s, x=x: sessions[s].run([oname], {iname: x}), args.repeats) for s in SEARCHES
            }
            ref = cpu.run([oname], {iname: x})[0]
            row["max_abs_diff_vs_cpu"] = float(np.abs(main_s.run([oname], {iname: x})[0] - ref).max())
            line += f" {row['cuda_ms']:>9.2f} {row['floor_ms']:>9.2f}"
            line += f" {1000 * row['cpu_ms'] / n:>10.0f} / {1000 * row['cuda_ms'] / n:<9.0f}  "
            line += " / ".join(f"{first[s]:.0f}" for s in SEARCHES)
            line += "   steady " + " / ".join(f"{row['cuda_ms_by_search'][s]:.2f}" for s in SEARCHES)
            line += f"   max |cuda-cpu| {row['max_abs_diff_vs_cpu']:.1e}"
        out["rows"].append(row)
        print(line)

    print("\nfields as the service classifies them (ms per field, crops 152 / 88 / 136 / 136 / 80, max_batch 64)")
    from locus.service.inference import Classifier

    variants = [("cpu", ["CPUExecutionProvider"], False)]
    if gpu:
        cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        variants += [("cuda, fixed_batch off", cuda, False), ("cuda, fixed_batch on", cuda, True)]
    out["fields"] = {}
    for label, prov, fixed in variants:
        t = time.perf_counter()
        clf = Classifier(args.model, prov, fixed_batch=fixed)
        load_ms = 1000 * (time.perf_counter() - t)
        passes = []
        for _ in range(2):
            passes.append(
                [
                    _once_ms(lambda n=n, c=clf: c.predict(rng.uniform(0, 255, (n, size, size, 4)).astype(np.float32)))
                    for n in (152, 88, 136, 136, 80)
                ]
            )
        out["fields"][label] = {"load_ms": load_ms, "passes_ms": passes}
        print(
            f"{label:>22}: load {load_ms:.0f} ms; pass 1 "
            + " / ".join(f"{v:.0f}" for v in passes[0])
            + "; pass 2 "
            + " / ".join(f"{v:.1f}" for v in passes[1])
        )

    if manifest.grad is not None:
        gpath = args.model / manifest.grad.file
        providers = [["CPUExecutionProvider"]] + ([["CUDAExecutionProvider", "CPUExecutionProvider"]] if gpu else [])
        print("\nintegrated gradients: one call of grad.onnx evaluates a batch of gradients (HEURISTIC search)")
        for prov in providers:
            sess, report = create_session(
                gpath, prov, provider_options={"CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC"}}
            )
            feeds = {}
            for inp in sess.get_inputs():
                shape = [d if isinstance(d, int) else manifest.grad.batch for d in inp.shape]
                feeds[inp.name] = rng.uniform(0, 1 if len(shape) == 2 else 255, shape).astype(np.float32)
            b = manifest.grad.batch
            ms = _median_ms(lambda s=sess, f=feeds: s.run(None, f), max(3, args.repeats // 4))
            print(f"{report.primary:>22}: {ms:.2f} ms per call of {b}, {1000 * ms / b:.0f} us per gradient evaluation")
            out[f"grad_{report.primary}"] = {"ms_per_call": ms, "batch": b, "us_per_evaluation": 1000 * ms / b}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
