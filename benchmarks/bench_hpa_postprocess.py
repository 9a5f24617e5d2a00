"""Benchmark: HPA post-processing (``label_cell``), default mode vs ``hpa_compat``, against truth and in time.

Run from the repository root::

    python benchmarks/bench_hpa_postprocess.py                 # quality and time, ~1 min
    python benchmarks/bench_hpa_postprocess.py --reference     # also HPA's procedure read literally (slow, ~4 s/field)
    python benchmarks/bench_hpa_postprocess.py --fields 2 --repeats 3   # quicker

Probability maps are built at the networks' 1/4 scale (a 2048² field -> 512² maps)
from label images, with the helpers of ``tests/service/test_hpa_postprocess.py``:

* ``clean``: HPA-sim truth (``locus.training.sim``), smoothed interior and border bands;
* ``noisy``: the same through logit noise (``sigma=1.0``, ``floor=0.01``: a cell's border
  probability exceeds HPA's 0.05 over ~15% of its interior, in patches);
* ``very noisy``: ``sigma=1.5``, ``floor=0.02`` (~30% of the interior);
* ``touching``: 64 pairs of freshly divided cells (128 cells), touching along a line, their
  nuclei touching across it, the networks more or less sure of that line (border 0.5-1.0);
* ``touching noisy``: the same through the ``noisy`` logit noise.

Printed per map kind and mode: cells found vs truth (one-to-one matches at IoU >= 0.5),
F1 and the mean IoU of the matches, and nuclei F1; with ``--reference`` also the literal
full-resolution reading of HPA's procedure and the share of its cells the compat mode
matches at IoU >= 0.9. Modes: ``compat`` (HPA's procedure, defects included), ``default``
(defects fixed, watershed regrowth), ``nearest`` (the default with regrowth to the nearest cell).

Then milliseconds per 2048² field on one core (the process pinned to one CPU, OpenCV on one
thread): ``label_cell`` on 512² maps with ``output_shape=(2048, 2048)``, median of ``--repeats``
runs per field, as CPU time and wall time, for an HPA-sim field and the dense touching scene.
It prints numbers; it does not assert anything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from locus.service.metric import segmentation_scores  # noqa: E402
from locus.service.segmentation.hpa_postprocess import HpaPostprocessConfig, label_cell  # noqa: E402
from tests.service.test_hpa_postprocess import (  # noqa: E402
    NOISE,
    dividing_cells_scene,
    full_size,
    maps_from_labels,
    noisy_maps,
    reference_label_cell,
    sim_truth,
    upsample_labels,
)

MODES = {
    "compat": dict(hpa_compat=True),
    "default": dict(),
    "nearest": dict(config=HpaPostprocessConfig(regrow="nearest")),
}


KINDS = {
    "clean": ("sim", None),
    "noisy": ("sim", "noisy"),
    "very noisy": ("sim", "very noisy"),
    "touching": ("touching", None),
    "touching noisy": ("touching", "noisy"),
}


def scenes(kind: str, n: int):
    """Yield (truth cells, truth nuclei, nuclei map, cell map) at 1/4 scale for one map kind."""
    scene, noise = KINDS[kind]
    for i in range(n):
        if scene == "touching":
            cells, nuclei, peak = dividing_cells_scene(i)
            nm, cm = maps_from_labels(nuclei, border_peak=peak), maps_from_labels(cells, border_peak=peak)
        else:
            cells, nuclei = sim_truth(i)
            nm, cm = maps_from_labels(nuclei), maps_from_labels(cells)
        if noise:
            nm, cm = noisy_maps(nm, 1000 + i, **NOISE[noise]), noisy_maps(cm, 2000 + i, **NOISE[noise])
        yield cells, nuclei, nm, cm


class Tally:
    """Sums of one-to-one matches over fields."""

    def __init__(self) -> None:
        self.matched = self.pred = self.true = 0
        self.ious: list[float] = []

    def add(self, pred: np.ndarray, true: np.ndarray, threshold: float = 0.5) -> None:
        s = segmentation_scores(pred, true, threshold)
        self.matched += s["n_matched"]
        self.pred += s["n_pred"]
        self.true += s["n_true"]
        if s["n_matched"]:
            self.ious += [s["mean_iou"]] * s["n_matched"]

    @property
    def f1(self) -> float:
        return 2 * self.matched / (self.pred + self.true) if self.pred + self.true else 1.0

    @property
    def mean_iou(self) -> float:
        return float(np.mean(self.ious)) if self.ious else float("nan")


def quality(kinds: list[str], fields: int, touching: int, reference: bool) -> None:
    print("Cells vs truth (matches at IoU >= 0.5); maps at 1/4 of a 2048² field, labels compared at 2048²")
    header = (
        f"{'maps':15s} {'mode':9s} {'cells found/truth (pred)':>25s} {'F1':>6s} {'mean IoU':>9s} {'nuclei F1':>10s}"
    )
    print(header)
    print("-" * len(header))
    for kind in kinds:
        n = touching if kind.startswith("touching") else fields
        cells_t = {m: Tally() for m in [*MODES, "reference"]}
        nuc_t = {m: Tally() for m in [*MODES, "reference"]}
        agree = Tally()
        for truth, truth_nuc, nm, cm in scenes(kind, n):
            T, TN = upsample_labels(truth), upsample_labels(truth_nuc)
            shape = T.shape
            out = {m: label_cell(nm, cm, 0.25, output_shape=shape, **kw) for m, kw in MODES.items()}
            if reference:
                out["reference"] = reference_label_cell(full_size(nm), full_size(cm))
                agree.add(out["compat"][1], out["reference"][1], 0.9)
            for m, (nuc, cells) in out.items():
                cells_t[m].add(cells, T)
                nuc_t[m].add(nuc, TN)
        for m in cells_t:
            if m == "reference" and not reference:
                continue
            t = cells_t[m]
            print(
                f"{kind:15s} {m:9s} {f'{t.matched}/{t.true} ({t.pred})':>25s} {t.f1:6.3f} {t.mean_iou:9.3f} "
                f"{nuc_t[m].f1:10.3f}"
            )
        if reference:
            share = agree.matched / agree.true if agree.true else float("nan")
            print(
                f"{kind:15s} compat matches {agree.matched}/{agree.true} = {share:.1%} of the reference's cells "
                f"at IoU >= 0.9 (mean IoU {agree.mean_iou:.3f})"
            )
        print()


def timing(repeats: int) -> None:
    with contextlib.suppress(AttributeError, OSError):  # Linux only
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    cv2.setNumThreads(1)
    print(
        f"Milliseconds per 2048² field on one core (512² maps -> labels at 2048², median of {repeats} runs): "
        "CPU time of this process (what one core spends; robust to other processes on a shared host) / wall time"
    )
    fields = [
        ("HPA-sim field 0", "clean"),
        ("HPA-sim field 0, noisy", "noisy"),
        ("touching scene (128 cells)", "touching"),
        ("touching scene, noisy", "touching noisy"),
    ]
    for name, kind in fields:
        _, _, nm, cm = next(scenes(kind, 1))
        row = []
        for m, kw in MODES.items():
            label_cell(nm, cm, 0.25, output_shape=(2048, 2048), **kw)  # warm up
            cpu, wall = [], []
            for _ in range(repeats):
                c, w = time.process_time(), time.perf_counter()
                label_cell(nm, cm, 0.25, output_shape=(2048, 2048), **kw)
                cpu.append((time.process_time() - c) * 1e3)
                wall.append((time.perf_counter() - w) * 1e3)
            row.append(f"{m} {statistics.median(cpu):5.1f} / {statistics.median(wall):5.1f}")
        print(f"{name:28s} " + "   ".join(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fields", type=int, default=6, help="HPA-sim fields per map kind")
    ap.add_argument("--touching", type=int, default=2, help="touching scenes per map kind")
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per field and mode")
    ap.add_argument("--reference", action="store_true", help="also run the literal full-resolution reading (slow)")
    ap.add_argument(
        "--kinds",
        default="clean,noisy,very noisy,touching,touching noisy",
        help="comma-separated map kinds",
    )
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    quality([k.strip() for k in args.kinds.split(",") if k.strip()], args.fields, args.touching, args.reference)
    if not args.no_timing:
        timing(args.repeats)


if __name__ == "__main__":
    main()
