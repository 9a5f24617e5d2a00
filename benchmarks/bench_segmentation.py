"""Segmentation benchmark: quality against ground truth and speed, and the overlay pictures.

Run from the repository root::

    python benchmarks/bench_segmentation.py                      # HPA-sim, 20 fields at 512², 5 at 2048²
    python benchmarks/bench_segmentation.py --n512 5 --n2048 1   # quicker
    python benchmarks/bench_segmentation.py --overlays docs      # also write the overlay PNGs
    python benchmarks/bench_segmentation.py --iou 0.6 --seed 2022 --start 100008 --n512 48 --n2048 48
                                   # the competition's IoU on the held-out fields of locus default-model

Prints, per field size: cell F1 and mean IoU of matched cells (one-to-one matches
at IoU >= ``--iou``, 0.5 by default), the same for nuclei, precision/recall, the
share of mitotic cells matched (HPA-sim marks them) and seconds per field
(single thread). Fields come from HPA-sim (``locus.training.sim.generator``) when it is
importable, otherwise from the simple drawn fields of the tests. It prints
numbers; it does not assert anything.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from locus.service.metric import label_iou, segmentation_scores  # noqa: E402
from locus.service.segmentation import make_segmenter  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "hpa-samples"


Field = tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]


def fields(n: int, side: int, seed: int, start: int = 0) -> tuple[str, Iterator[Field]]:
    """(source name, iterator of (image, true cells, true nuclei, ids of mitotic cells)) at ``side``²."""
    try:
        from locus.training.sim.generator import SimConfig, generate_field

        config = SimConfig(size=side)

        def gen() -> Iterator[Field]:
            for i in range(start, start + n):
                f = generate_field(i, seed, config)
                yield np.asarray(f.image), np.asarray(f.cells), np.asarray(f.nuclei), list(f.mitotic)

        return "HPA-sim", gen()
    except ImportError:
        from tests.service.test_segmentation import draw_field

        def drawn() -> Iterator[Field]:
            for i in range(start, start + n):
                yield (*draw_field((side, side), seed=seed + i), [])

        return "drawn test fields (HPA-sim not importable)", drawn()


def _matched_ids(pred: np.ndarray, true: np.ndarray, iou: float) -> set[int]:
    """True cell ids with a predicted cell at IoU >= ``iou`` (at most one can be, for ``iou`` > 0.5)."""
    _, tids, m = label_iou(pred, true)
    if not m.size:
        return set()
    return {int(t) for t, best in zip(tids, m.max(axis=0), strict=True) if best >= iou}


def run(n: int, side: int, seed: int, options: dict, iou: float = 0.5, start: int = 0) -> dict[str, float]:
    """Segment ``n`` fields at ``side``² and print and return averaged scores."""
    source, it = fields(n, side, seed, start)
    seg = make_segmenter("classical", **options)
    rows = []
    mitotic = mitotic_matched = 0
    for image, true_cells, true_nuclei, mitotic_ids in it:
        t0 = time.perf_counter()
        cells, nuclei = seg.segment(image)
        dt = time.perf_counter() - t0
        c = segmentation_scores(cells, true_cells, iou)
        nu = segmentation_scores(nuclei, true_nuclei, iou)
        rows.append((c["f1"], c["mean_iou"], c["precision"], c["recall"], nu["f1"], nu["mean_iou"], dt))
        if mitotic_ids:
            mitotic += len(mitotic_ids)
            mitotic_matched += len(_matched_ids(cells, true_cells, iou) & set(mitotic_ids))
    a = np.array(rows, dtype=np.float64)
    m = np.nanmean(a, axis=0)
    shape = image.shape
    print(
        f"{shape[0]}x{shape[1]} x{len(rows)} [{source}] IoU >= {iou}: cell F1 {m[0]:.3f}  mean IoU {m[1]:.3f}  "
        f"P {m[2]:.3f} R {m[3]:.3f} | nucleus F1 {m[4]:.3f} IoU {m[5]:.3f} | "
        f"mitotic cells matched {mitotic_matched}/{mitotic} | {m[6]:.3f} s/field (min F1 {a[:, 0].min():.3f})"
    )
    return {
        "f1": m[0],
        "mean_iou": m[1],
        "nuclei_f1": m[4],
        "seconds": m[6],
        "recall": m[3],
        "mitotic": mitotic,
        "mitotic_matched": mitotic_matched,
    }


def overlay(image: np.ndarray, cells: np.ndarray, nuclei: np.ndarray, side: int = 800) -> np.ndarray:
    """RGB composite (red+yellow -> R, green+yellow -> G, blue -> B) with cell outlines white, nuclei cyan.

    Returns
    -------
    numpy.ndarray
        (h, w, 3) uint8 RGB, long side ``side`` (never enlarged).
    """
    from skimage.segmentation import find_boundaries

    from locus.service.imaging import to_unit255

    img = to_unit255(image)
    r, g, b, y = (img[:, :, k] for k in range(4))
    rgb = np.stack([np.maximum(r, y) * 0.85, np.maximum(g, 0.6 * y), b], axis=-1)
    rgb = np.clip(rgb * (255.0 / max(np.percentile(rgb, 99.8), 1.0)), 0, 255).astype(np.uint8)
    h, w = cells.shape
    f = min(1.0, side / max(h, w))
    size = (max(1, round(w * f)), max(1, round(h * f)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    cs = cv2.resize(cells.astype(np.int32), size, interpolation=cv2.INTER_NEAREST_EXACT)
    ns = cv2.resize(nuclei.astype(np.int32), size, interpolation=cv2.INTER_NEAREST_EXACT)
    small[find_boundaries(ns, mode="inner")] = (0, 255, 255)
    small[find_boundaries(cs, mode="inner")] = (255, 255, 255)
    return small


def load_sample() -> np.ndarray:
    """The real HPA sample field (website JPEGs) as HxWx4 uint8."""
    from locus.service.imaging import decode_channel, stack_channels

    channels = {}
    for c in ("red", "green", "blue", "yellow"):
        data = (SAMPLE / f"89_B5_1_{c}.jpg").read_bytes()
        try:
            channels[c] = decode_channel(data, field=c)
        except ValueError:  # decoder refuses JPEG colour noise: the channel is the max over colour
            channels[c] = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).max(axis=2)
    return stack_channels(channels)


def write_overlays(folder: Path, options: dict, seed: int) -> None:
    """Write segmentation_real.png (the HPA sample) and segmentation_sim.png (one field)."""
    folder.mkdir(parents=True, exist_ok=True)
    seg = make_segmenter("classical", **options)
    if SAMPLE.is_dir():
        image = load_sample()
        cells, nuclei = seg.segment(image)
        cv2.imwrite(str(folder / "segmentation_real.png"), overlay(image, cells, nuclei)[:, :, ::-1])
        areas = np.bincount(cells.ravel())[1:]
        print(f"real sample {image.shape[:2]}: {cells.max()} cells, areas {areas.min()}-{areas.max()} px")
    else:
        print(f"real sample folder {SAMPLE} absent; segmentation_real.png not written")
    _, it = fields(1, 2048, seed)
    image, true_cells, _, _ = next(it)
    cells, nuclei = seg.segment(image)
    cv2.imwrite(str(folder / "segmentation_sim.png"), overlay(image, cells, nuclei)[:, :, ::-1])
    print(f"sim field {image.shape[:2]}: {cells.max()} cells predicted, {int(true_cells.max())} true")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n512", type=int, default=20, help="fields at 512x512")
    p.add_argument("--n2048", type=int, default=5, help="fields at 2048x2048")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--start", type=int, default=0, help="first HPA-sim field index (held-out sets: 100008)")
    p.add_argument("--iou", type=float, default=0.5, help="IoU of a match (the competition's: 0.6)")
    p.add_argument("--overlays", type=Path, default=None, help="folder to write the overlay PNGs into")
    p.add_argument("--option", action="append", default=[], help="classical option KEY=VALUE (repeatable)")
    args = p.parse_args(argv)
    cv2.setNumThreads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = eval(value, {}, {})  # noqa: S307 - a developer's own command line
    print(f"scores: locus.service.metric.segmentation_scores; options: {options or 'defaults'}")
    if args.n512:
        run(args.n512, 512, args.seed, options, args.iou, args.start)
    if args.n2048:
        run(args.n2048, 2048, args.seed, options, args.iou, args.start)
    if args.overlays is not None:
        write_overlays(args.overlays, options, args.seed)


if __name__ == "__main__":
    main()
