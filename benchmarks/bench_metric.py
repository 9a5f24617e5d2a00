"""Benchmark: score one 2048x2048 field with ~30 cells and ~60 predictions, and encode its masks.

Run with ``python benchmarks/bench_metric.py``. Prints seconds (best of ``--repeat``) for:

* ``encode_label_masks``: every cell of the label image to COCO RLE (fast path);
* per-cell ``encode_mask_coco(labels == k)`` (naive, for comparison);
* Kaggle mask strings of the 60 predictions (``rle_to_kaggle`` on the RLEs);
* ``evaluate`` of the 60 predictions against the 30 GT cells (Kaggle strings in, full-resolution IoU).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from locus.service.encoding import encode_binary_mask, encode_label_masks, encode_mask_coco, rle_to_kaggle
from locus.service.metric import evaluate, truth_from_labels


def make_field(size: int = 2048, n_cells: int = 30, seed: int = 0) -> np.ndarray:
    """A label image of ``n_cells`` touching, irregular cells (Voronoi regions cut by ellipses)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(150, size - 150, (n_cells, 2))
    yy, xx = np.mgrid[0:size:4, 0:size:4].astype(np.float32)
    d = np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 for cy, cx in centres])
    nearest = d.argmin(0)
    inside = d.min(0) < (rng.uniform(140, 220) ** 2)
    small = np.where(inside, nearest + 1, 0).astype(np.uint16)
    return np.kron(small, np.ones((4, 4), np.uint16))[:size, :size]


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--cells", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    labels = make_field(args.size, args.cells)
    ids = sorted(set(np.unique(labels).tolist()) - {0})
    rng = np.random.default_rng(1)
    cell_labels = {k: sorted(set(rng.choice(19, size=rng.integers(1, 3)).tolist())) for k in ids}
    truth = {"field": truth_from_labels(labels, cell_labels)}

    # ~60 predictions: two classes per cell, masks = the cell eroded a little (shifted by 3 px).
    shifted = np.roll(labels, 3, axis=1)
    pred_rles = encode_label_masks(shifted, ids)
    strings = {k: rle_to_kaggle(pred_rles[k]) for k in ids}
    preds = []
    for k in ids:
        for c in (cell_labels[k][0], int(rng.integers(19))):
            preds.append((c, float(rng.random()), strings[k]))
    predictions = {"field": preds}

    t_fast = best(lambda: encode_label_masks(labels, ids), args.repeat)
    t_naive = best(lambda: [encode_mask_coco(labels == k) for k in ids], 1)
    t_kaggle = best(lambda: [rle_to_kaggle(r) for r in encode_label_masks(labels, ids).values()], args.repeat)
    t_kaggle_naive = best(lambda: [encode_binary_mask(labels == k) for k in ids], 1)
    t_eval = best(lambda: evaluate(truth, predictions), args.repeat)
    res = evaluate(truth, predictions)

    print(f"field {args.size}x{args.size}, {len(ids)} cells, {len(preds)} predictions")
    print(f"encode_label_masks (all cells, COCO RLE):      {t_fast:.4f} s")
    print(f"naive encode_mask_coco(labels == k) per cell:  {t_naive:.4f} s")
    print(f"Kaggle strings via fast path:                  {t_kaggle:.4f} s")
    print(f"naive encode_binary_mask per cell:             {t_kaggle_naive:.4f} s")
    print(f"evaluate (decode strings to RLE, IoU, AP):     {t_eval:.4f} s   (mAP {res.mean_ap:.3f})")
    t_total = best(lambda: evaluate({"field": truth_from_labels(labels, cell_labels)}, predictions), args.repeat)
    print(f"GT encoding + evaluate (one field end to end): {t_total:.4f} s")


if __name__ == "__main__":
    main()
