"""Test-time augmentation: a cell's scores averaged over flipped and transposed copies of its crop.

A cell has no preferred orientation under the microscope, so the classifier's answer should not
depend on it; averaging its probabilities over the symmetries of the square (the dihedral group:
identity, the flips, the transposes) removes what does. On the held-out HPA-sim fields of the
default model 3.0.0 (48 per size) the competition mAP at 512² / 1024² / 2048² was 0.666 / 0.681 /
0.685 with one view, 0.714 / 0.711 / 0.709 with four (identity and the three flips) and 0.719 /
0.717 / 0.719 with eight; on the five real validation fields eight views lowered the image-level
mAP from 0.900 to 0.833 (five images: one rank moves it) and left one field instead of two with a
wrong majority class. So it is an option (``LOCUS_TTA``, the request's ``tta``), not the default.
The price is the classify stage run on 4 or 8 times the crops: milliseconds on a GPU, about 4-8x
the stage (40 ms for a 2048² field's 20 cells here) on a CPU.

Labels are called with the model's thresholds for the number of views averaged (the manifest's
``view_thresholds``, tuned on the same mean of views; :meth:`locus.service.pipeline.Pipeline.thresholds`):
a mean of views is less extreme than one view, so one-view thresholds under-call confident classes.

Views, in order: identity, columns reversed (left-right flip), rows reversed (up-down flip), both
(a 180° rotation), then the transpose and its three flips. ``n`` views are the first ``n``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TTA_VIEWS", "average_views", "check_views", "stack_views"]

#: The view counts allowed: 1 (no augmentation), 2, 4 or 8.
TTA_VIEWS: tuple[int, ...] = (1, 2, 4, 8)


def check_views(n: int) -> int:
    """Return ``n`` when it is an allowed view count.

    Parameters
    ----------
    n : int
        The number of views.

    Returns
    -------
    int
        ``n``.

    Raises
    ------
    ValueError
        ``n`` is not 1, 2, 4 or 8.
    """
    if isinstance(n, bool) or int(n) != n or int(n) not in TTA_VIEWS:
        raise ValueError(f"tta must be one of {', '.join(map(str, TTA_VIEWS))} views, got {n!r}")
    return int(n)


def stack_views(batch: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` dihedral views of every crop, view after view.

    Parameters
    ----------
    batch : numpy.ndarray
        (N, S, S, C) square crops.
    n : int
        Views (1, 2, 4 or 8).

    Returns
    -------
    numpy.ndarray
        (n * N, S, S, C), contiguous: rows ``v * N`` to ``(v + 1) * N - 1`` hold view ``v``.
        With ``n == 1`` the batch itself.
    """
    n = check_views(n)
    if n == 1:
        return batch
    if batch.ndim != 4 or batch.shape[1] != batch.shape[2]:
        raise ValueError(f"expected (N, S, S, C) square crops, got shape {batch.shape}")
    out = np.empty((n * batch.shape[0],) + batch.shape[1:], dtype=batch.dtype)
    k = batch.shape[0]
    for v in range(n):
        view = batch.transpose(0, 2, 1, 3) if v >= 4 else batch
        if v % 4 in (1, 3):
            view = view[:, :, ::-1]
        if v % 4 in (2, 3):
            view = view[:, ::-1]
        out[v * k : (v + 1) * k] = view
    return out


def average_views(probs: np.ndarray, n: int) -> np.ndarray:
    """Average the scores of the ``n`` views of each crop (the inverse of :func:`stack_views`' layout).

    Parameters
    ----------
    probs : numpy.ndarray
        (n * N, K) scores, view after view.
    n : int
        Views.

    Returns
    -------
    numpy.ndarray
        (N, K) ``float32`` mean over the views.
    """
    n = check_views(n)
    if n == 1:
        return probs
    if probs.shape[0] % n:
        raise ValueError(f"{probs.shape[0]} rows of scores are not {n} views of the same cells")
    return probs.reshape(n, probs.shape[0] // n, -1).mean(axis=0, dtype=np.float64).astype(np.float32)
