"""Benchmark: fields per second for single-process ``locus predict`` and for ``--engine ray`` with 1 and 2 actors.

Run with ``python benchmarks/bench_ray.py [--fields 8] [--size 1024] [--actors 1,2] [--model DIR]``
(needs the ``[ray]`` extra). It writes ``--fields`` HPA-sim fields of ``--size``² to a temporary
folder, then prints:

* where one field's time goes in one process (median over the fields): reading the four files
  (from the page cache here: a lower bound on storage), decoding them, and the pipeline's stages
  (segment, crop, classify, encode) as :meth:`locus.service.pipeline.Pipeline.run` reports them;
* single-process ``predict_folder``: wall time, the pipeline's build, fields/s with and without it;
* Ray start-up (``ray.init`` of a local cluster, no dashboard), counted apart;
* for each actor count: the job's wall time (actors' start included), the time until the first
  actor had built its pipeline, fields/s over the whole job and over the busy part (first actor
  ready to last field done), and the mean seconds per field inside an actor;
* a projection for N GPU nodes from the per-actor rate and the per-field stage times.

The numbers are measurements, not assertions; on a small shared machine they vary run to run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from locus.service.config import PipelineSettings  # noqa: E402
from locus.service.encoding import format_prediction_string  # noqa: E402
from locus.service.factory import build_pipeline  # noqa: E402
from locus.service.imaging import decode_field  # noqa: E402
from locus.service.pipeline import ClassifyOptions  # noqa: E402
from locus.service.predict import predict_folder  # noqa: E402
from locus.service.readers import find_fields  # noqa: E402
from locus.service.submission import SubmissionWriter, read_submission  # noqa: E402
from locus.training.sim.generator import SimConfig, write_dataset  # noqa: E402


def stage_times(folder: Path, model: str | None, segmenter: str) -> dict[str, float]:
    """Median milliseconds per field for read, decode and each pipeline stage (one process)."""
    settings = PipelineSettings()
    pipeline = build_pipeline(settings, model_dir=model, segmenter=segmenter)
    options = ClassifyOptions(include_masks=True, include_scores=True)
    rows: list[dict[str, float]] = []
    for ref in find_fields(folder):
        t = time.perf_counter()
        blobs = {c: Path(p).read_bytes() for c, p in ref.paths.items()}
        read_ms = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        image = decode_field(blobs, max_pixels=settings.max_image_pixels)
        decode_ms = (time.perf_counter() - t) * 1e3
        result = pipeline.run(image, options)
        rows.append({"read": read_ms, "decode": decode_ms, **result.timings_ms, "cells": len(result.cells)})
    pipeline.close()
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--actors", default="1,2", help="comma-separated actor counts")
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--segmenter", default="classical")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2, help="runs per configuration; the fastest is shown")
    args = parser.parse_args()
    actor_counts = [int(a) for a in args.actors.split(",") if a]
    cores = len(os.sched_getaffinity(0))

    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        tmp_path = Path(tmp)
        t = time.perf_counter()
        folder = write_dataset(
            tmp_path / "fields", n=args.fields, seed=args.seed, config=SimConfig(size=args.size), progress=False
        )
        print(
            f"# {args.fields} HPA-sim fields at {args.size}² written in {time.perf_counter() - t:.1f} s; {cores} cores"
        )
        print("# load average at start: " + " ".join(f"{v:.1f}" for v in os.getloadavg()) + f"; best of {args.repeat}")

        stages = stage_times(folder, args.model, args.segmenter)
        total = sum(v for k, v in stages.items() if k != "cells")
        print(f"\n## one field in one process (median ms; {stages['cells']:.0f} cells)")
        for k, v in stages.items():
            if k != "cells":
                print(f"  {k:10s} {v:8.1f}  ({100 * v / total:4.1f} %)")

        t = time.perf_counter()
        build_pipeline(PipelineSettings(), model_dir=args.model, segmenter=args.segmenter).close()
        build_s = time.perf_counter() - t
        local_s = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            stats = predict_folder(folder, tmp_path / "local.csv", model_dir=args.model, segmenter=args.segmenter,
                                   resume=False, progress=False)  # fmt: skip
            local_s = min(local_s, time.perf_counter() - t)
        n = stats["done"]
        print("\n## single-process locus predict")
        print(f"  wall {local_s:.2f} s (pipeline build {build_s:.2f} s): {n / local_s:.3f} fields/s, "
              f"{n / max(local_s - build_s, 1e-9):.3f} fields/s without the build")  # fmt: skip

        # the Ray driver's share: it appends every field's row, formatted by the actor, to the one CSV (fsync)
        from locus.service.batch_ray import FormattedRow

        rows = read_submission(tmp_path / "local.csv")
        texts = {i: format_prediction_string(r.predictions) for i, r in rows.items()}
        t = time.perf_counter()
        with SubmissionWriter(tmp_path / "driver.csv", resume=False) as w:
            for i, row in rows.items():
                w.write(FormattedRow(i, row.width, row.height, prediction_string=texts[i]))
        driver_ms = (time.perf_counter() - t) * 1e3 / len(rows)
        size_kb = (tmp_path / "local.csv").stat().st_size / 1024 / len(rows)
        print(f"  Ray driver: {driver_ms:.1f} ms per field to append its CSV row ({size_kb:.0f} KiB per row)")

        try:
            import ray

            from locus.service.batch_ray import predict_ray
        except ImportError as exc:
            print(f"\nRay is not installed ({exc}); pip install 'locus[ray]'")
            return 1
        t = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        print(f"\n## Ray\n  start-up (ray.init, local, {cores} CPUs): {time.perf_counter() - t:.2f} s")
        per_actor_rate = None
        try:
            for k in actor_counts:
                out = tmp_path / f"ray{k}.csv"
                runs = [
                    predict_ray(
                        folder,
                        out,
                        model_dir=args.model,
                        segmenter=args.segmenter,
                        actors=k,
                        resume=False,
                        progress=False,
                    )  # fmt: skip
                    for _ in range(args.repeat)
                ]
                s = min(runs, key=lambda r: r["busy_s"] or r["run_s"])
                busy = s["busy_s"] or s["run_s"]
                mean_field = statistics.mean(s["field_seconds"])
                print(
                    f"  {k} actor(s): job {s['run_s']:.2f} s (first actor ready after {s['ready_s']:.2f} s): "
                    f"{s['done'] / s['run_s']:.3f} fields/s whole job, {s['done'] / busy:.3f} fields/s busy; "
                    f"{mean_field:.2f} s per field in an actor; fields per actor {sorted(s['per_actor'].values())}"
                )
                if k == 1:
                    per_actor_rate = 1.0 / mean_field
        finally:
            ray.shutdown()

        if per_actor_rate:
            gpu_share = (stages.get("classify", 0.0)) / total
            print("\n## projection (classical segmentation; see README 'Scaling out')")
            print(f"  per actor here: {per_actor_rate:.3f} fields/s at {args.size}² on 1 CPU")
            print(f"  model inference is {100 * gpu_share:.0f} % of a field's time; read + decode "
                  f"{100 * (stages['read'] + stages['decode']) / total:.0f} %, segmentation "
                  f"{100 * stages['segment'] / total:.0f} %")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
