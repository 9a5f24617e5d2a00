"""Per-class decision thresholds and per-class average precision on validation cells.

Thresholds are tuned for the scores they will be applied to. With test-time augmentation a
cell's scores are the mean over 2, 4 or 8 flipped and transposed views of its crop
(:mod:`locus.service.tta`); a mean of views is less extreme than one view, so a class tuned at
0.90 on one view can miss cells whose averaged score is 0.85. :func:`tune_view_thresholds`
tunes one set per view count on the same validation cells, from one pass over all eight views
(the first ``n`` views are the ``n``-view answer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from locus.service.tta import TTA_VIEWS, check_views, stack_views

__all__ = [
    "THRESHOLD_RULES",
    "f1_standard_error",
    "plateau_f1_threshold",
    "tune_thresholds",
    "tune_view_thresholds",
    "best_f1_threshold",
    "average_precision",
    "per_class_ap",
    "mean_ap",
]

#: The view counts that get their own thresholds (one view uses the manifest's ``thresholds``).
VIEW_COUNTS: tuple[int, ...] = tuple(n for n in TTA_VIEWS if n > 1)


def _f1_cuts(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F1 and threshold of every cut between distinct scores (best first is not implied).

    Returns
    -------
    f1 : numpy.ndarray
        F1 when the cells down to each distinct score are called.
    thresholds : numpy.ndarray
        The threshold of each cut: half way between its lowest called and highest uncalled score.
    """
    n_pos = int(y_true.sum())
    order = np.argsort(-y_prob, kind="mergesort")
    p = y_prob[order]
    tp = np.cumsum(y_true[order])
    k = np.arange(1, p.size + 1)
    last = np.flatnonzero(np.r_[p[1:] != p[:-1], True])
    f1 = 2.0 * tp[last] / (k[last] + n_pos)
    below = np.r_[p[1:], 0.0][last]
    return f1, np.clip((p[last] + below) / 2.0, 0.0, 1.0)


def best_f1_threshold(y_true: np.ndarray, y_prob: np.ndarray, default: float = 0.5) -> tuple[float, float]:
    """The threshold maximising F1 for one class.

    Parameters
    ----------
    y_true : numpy.ndarray
        (N,) 0/1 targets.
    y_prob : numpy.ndarray
        (N,) probabilities.
    default : float
        Returned when there are no positives.

    Returns
    -------
    threshold : float
        A cell is called positive when its probability is ``>= threshold``. It lies
        half way between the lowest accepted and the highest rejected probability,
        so it generalises a little better than the bare score.
    f1 : float
        F1 at that threshold (0 without positives).
    """
    return plateau_f1_threshold(y_true, y_prob, 0.0, default)


def f1_standard_error(y_true: np.ndarray, y_prob: np.ndarray, n_boot: int = 200, seed: int = 0) -> float:
    """Bootstrap standard error of one class's best F1 on these cells.

    Parameters
    ----------
    y_true : numpy.ndarray
        (N,) 0/1 targets.
    y_prob : numpy.ndarray
        (N,) probabilities.
    n_boot : int
        Resamples of the cells (with replacement).
    seed : int
        Seed of the resampling, so the result is reproducible.

    Returns
    -------
    float
        Standard deviation of the best F1 over the resamples (0 without positives).
    """
    y_true = np.asarray(y_true).astype(bool).ravel()
    y_prob = np.asarray(y_prob, dtype=np.float64).ravel()
    if not y_true.any():
        return 0.0
    rng = np.random.default_rng(seed)
    best = np.empty(n_boot)
    for b in range(n_boot):
        i = rng.integers(0, y_true.size, y_true.size)
        best[b] = best_f1_threshold(y_true[i], y_prob[i])[1]
    return float(best.std())


def plateau_f1_threshold(
    y_true: np.ndarray, y_prob: np.ndarray, tolerance: float, default: float = 0.5
) -> tuple[float, float]:
    """The threshold in the middle of the cuts whose F1 is within ``tolerance`` of the best.

    Parameters
    ----------
    y_true : numpy.ndarray
        (N,) 0/1 targets.
    y_prob : numpy.ndarray
        (N,) probabilities.
    tolerance : float
        F1 below the best that still counts as as good (0: the best cut itself, :func:`best_f1_threshold`).
    default : float
        Returned when there are no positives.

    Returns
    -------
    threshold : float
        Of the cuts with F1 >= best - ``tolerance``, the one whose threshold is nearest the middle
        of their range (so it is itself one of them, even when they are not contiguous).
    f1 : float
        F1 at that threshold.
    """
    y_true = np.asarray(y_true).astype(bool).ravel()
    y_prob = np.asarray(y_prob, dtype=np.float64).ravel()
    if not y_true.any() or y_prob.size == 0:
        return float(default), 0.0
    f1, cut = _f1_cuts(y_true, y_prob)
    if tolerance <= 0:
        i = int(np.argmax(f1))  # the best cut, the highest threshold among equals
    else:
        good = np.flatnonzero(f1 >= f1.max() - tolerance)
        middle = (cut[good].min() + cut[good].max()) / 2.0
        i = int(good[np.argmin(np.abs(cut[good] - middle))])
    return float(cut[i]), float(f1[i])


#: How thresholds are tuned: ``"one-se"`` (the default) or ``"argmax"``.
THRESHOLD_RULES: tuple[str, ...] = ("one-se", "argmax")


def tune_thresholds(y_true: np.ndarray, y_prob: np.ndarray, default: float = 0.5, rule: str = "one-se") -> list[float]:
    """Per-class thresholds tuned for F1 on validation cells.

    Parameters
    ----------
    y_true : numpy.ndarray
        (N, C) 0/1 targets.
    y_prob : numpy.ndarray
        (N, C) probabilities.
    default : float
        Threshold of a class without positives in ``y_true``.
    rule : {"one-se", "argmax"}
        ``"argmax"``: the cut of highest F1 (:func:`best_f1_threshold`). ``"one-se"``: the
        one-standard-error rule (Breiman et al. 1984; Hastie, Tibshirani and Friedman, *The
        Elements of Statistical Learning*, 7.10): every cut whose F1 is within one bootstrap
        standard error of the best (:func:`f1_standard_error`) is as good as the data can tell,
        and the middle of them is taken (:func:`plateau_f1_threshold`). F1 is often flat over a
        wide range of scores, and the argmax then sits wherever one validation cell happens to
        fall; the middle of the flat range moves less between view counts, resamples and data.

    Returns
    -------
    list of float
        C thresholds in [0, 1].
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, got {rule!r}")
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob)
    out = []
    for c in range(y_true.shape[1]):
        if rule == "argmax":
            out.append(best_f1_threshold(y_true[:, c], y_prob[:, c], default)[0])
        else:
            se = f1_standard_error(y_true[:, c], y_prob[:, c])
            out.append(plateau_f1_threshold(y_true[:, c], y_prob[:, c], se, default)[0])
    return out


def tune_view_thresholds(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    y_true: np.ndarray,
    views: Sequence[int] = VIEW_COUNTS,
    batch_size: int = 512,
    rule: str = "one-se",
) -> dict[int, list[float]]:
    """Per-class thresholds for scores averaged over ``n`` views, for each ``n`` in ``views``.

    Parameters
    ----------
    predict : callable
        Maps a (B, S, S, 4) batch of crops to (B, C) probabilities (the model).
    images : numpy.ndarray
        (N, S, S, 4) validation crops, as the model takes them.
    y_true : numpy.ndarray
        (N, C) 0/1 targets of those crops.
    views : sequence of int
        View counts to tune for (each 2, 4 or 8).
    batch_size : int
        Crops per call of ``predict`` (each call sees the views of ``batch_size`` cells).
    rule : {"one-se", "argmax"}
        How each set is tuned (:func:`tune_thresholds`).

    Returns
    -------
    dict of int to list of float
        ``{n: C thresholds}`` maximising F1 on the ``n``-view mean of each cell's scores, the
        mean the service computes with ``tta = n``.
    """
    views = sorted({check_views(n) for n in views})
    if not views:
        return {}
    most = views[-1]
    y_true = np.asarray(y_true)
    n_cells = int(images.shape[0])
    # per view: (N, C) scores, from batches of cells stacked view after view
    per_view = np.zeros((most, n_cells, y_true.shape[1]), dtype=np.float64)
    for start in range(0, n_cells, batch_size):
        chunk = images[start : start + batch_size]
        probs = np.asarray(predict(stack_views(chunk, most)), dtype=np.float64)
        per_view[:, start : start + chunk.shape[0]] = probs.reshape(most, chunk.shape[0], -1)
    return {n: tune_thresholds(y_true, per_view[:n].mean(axis=0), rule=rule) for n in views}


def average_precision(y_true: np.ndarray, y_prob: np.ndarray) -> float | None:
    """Average precision (area under the step precision-recall curve) of one class.

    Parameters
    ----------
    y_true : numpy.ndarray
        (N,) 0/1 targets.
    y_prob : numpy.ndarray
        (N,) scores.

    Returns
    -------
    float or None
        ``sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds (the
        scikit-learn definition); None when there are no positives.
    """
    y_true = np.asarray(y_true).astype(bool).ravel()
    y_prob = np.asarray(y_prob, dtype=np.float64).ravel()
    n_pos = int(y_true.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-y_prob, kind="mergesort")
    p = y_prob[order]
    t = y_true[order]
    last = np.r_[p[1:] != p[:-1], True]
    tp = np.cumsum(t)[last]
    k = np.arange(1, p.size + 1)[last]
    precision = tp / k
    recall = tp / n_pos
    recall_prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - recall_prev) * precision))


def per_class_ap(y_true: np.ndarray, y_prob: np.ndarray) -> list[float | None]:
    """Average precision of every class.

    Parameters
    ----------
    y_true : numpy.ndarray
        (N, C) 0/1 targets.
    y_prob : numpy.ndarray
        (N, C) scores.

    Returns
    -------
    list of float or None
        C values; None for a class without positives.
    """
    return [average_precision(y_true[:, c], y_prob[:, c]) for c in range(np.asarray(y_true).shape[1])]


def mean_ap(aps: list[float | None]) -> float | None:
    """Mean of the defined per-class APs (None when no class has positives)."""
    vals = [a for a in aps if a is not None]
    return float(np.mean(vals)) if vals else None
