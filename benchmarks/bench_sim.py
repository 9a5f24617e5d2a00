"""Benchmark HPA-sim: seconds per field at 512² and 2048² (single process), and fields per minute.

Run with ``python benchmarks/bench_sim.py [--n512 N] [--n2048 N] [--workers W]``. Not a test.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import cv2

from locus.training.sim.generator import SimConfig, generate_field, write_dataset


def bench_generate(size: int, n: int, seed: int = 0) -> tuple[float, float]:
    """Mean wall and CPU seconds to generate one field of ``size``² in this process (no disk writes).

    Parameters
    ----------
    size : int
        Field side.
    n : int
        Number of fields timed (after one warm-up field).
    seed : int
        Dataset seed.

    Returns
    -------
    tuple of float
        Wall seconds and CPU seconds per field (OpenCV limited to one thread, so CPU ~ single-core time).
    """
    cfg = SimConfig(size=size)
    generate_field(10_000, seed, cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        generate_field(i, seed, cfg)
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def bench_write(size: int, n: int, workers: int) -> float:
    """Mean wall seconds per field for :func:`write_dataset` with PNG output and ``workers`` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_dataset(tmp, n, 0, SimConfig(size=size), workers=workers, progress=False)
        return (time.perf_counter() - t0) / n


def main() -> None:
    """Print the timings."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n512", type=int, default=40)
    ap.add_argument("--n2048", type=int, default=5)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    print(f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    cv2.setNumThreads(1)
    for size, n in ((512, args.n512), (2048, args.n2048)):
        wall, cpu = bench_generate(size, n)
        print(
            f"generate {size}x{size}: {wall:.3f} s/field wall, {cpu:.3f} s/field CPU, single process "
            f"({60 / wall:.0f} fields/min wall), n={n}"
        )
    for size, n in ((512, args.n512), (2048, args.n2048)):
        s = bench_write(size, n, args.workers)
        print(
            f"write_dataset {size}x{size}, {args.workers} workers, with PNGs: {s:.3f} s/field wall "
            f"({60 / s:.0f} fields/min), n={n}"
        )


if __name__ == "__main__":
    main()
