"""The competition metric: mean average precision over the 19 classes at mask IoU >= 0.6.

This follows the OpenImages instance-segmentation challenge evaluation that
the Kaggle "HPA Single-Cell Image Classification" (2021) task used:

* A ground-truth (GT) cell labelled with k classes is one GT instance of each
  of those k classes. A prediction is a (class, confidence, mask) triple.
* Per class and per image, predictions are taken in decreasing confidence
  (stable sort: ties keep their input order). Each prediction is compared with
  every GT instance of its class in that image; the GT with the highest IoU
  (first one on ties) is its candidate. If that IoU is >= the threshold (0.6)
  and the candidate is not matched yet, the prediction is a true positive (TP)
  and the GT becomes matched; if the candidate is already matched, the
  prediction is a duplicate and a false positive (FP); below the threshold it
  is an FP. Predictions of a class in an image without GT of that class are
  FPs: every class counts as verified in every image (there are no
  image-level "not verified" labels here).
* Per class, all predictions over all images are ranked by confidence
  (stable sort; ties keep image order, then the per-image order); precision
  and recall are accumulated down the ranking, precision is made
  monotonically non-increasing (from the right) and AP is the area under that
  precision-recall step curve (VOC 2010+/OpenImages style, no 11-point
  interpolation).
* **Classes absent from the truth** (no GT instance in any image): their AP is
  undefined. As in OpenImages (``np.nanmean`` over classes) they get AP = NaN,
  are shown as "n/a" and are *excluded* from the mean; their predictions are
  still counted in ``n_pred``. If no class has GT, mAP is NaN.
* Masks are compared at full resolution as COCO RLEs with
  ``pycocotools.mask.iou`` (no pixel decoding of predictions: the Kaggle mask
  strings are only unzipped to RLE counts).

Also here: :func:`segmentation_scores`, the segmentation quality of a predicted
label image against the true one (one-to-one matches at IoU >= threshold).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

from locus.service.classes import CLASS_NAMES, NUM_CLASSES
from locus.service.encoding import as_pycoco, encode_label_masks, kaggle_to_rle

__all__ = [
    "IOU_THRESHOLD",
    "MetricResult",
    "average_precision",
    "match_image",
    "mask_ious",
    "evaluate",
    "evaluate_folder",
    "read_truth_folder",
    "map_interval",
    "paired_maps",
    "MapDifference",
    "map_difference",
    "truth_from_labels",
    "segmentation_scores",
    "WRONG_CALL_SHARE",
    "FieldCalls",
    "ImageLevelResult",
    "field_calls",
    "evaluate_image_level",
    "evaluate_image_level_csv",
    "cell_probabilities_from_submission",
]

IOU_THRESHOLD: float = 0.6
"""IoU at or above which a prediction can match a GT cell (the competition's value)."""

#: One GT instance: (COCO RLE dict, class ids of the cell).
GTCell = tuple[dict, Sequence[int]]
#: One prediction: (class id, confidence, mask as COCO RLE dict or Kaggle mask string).
Prediction = tuple[int, float, "dict | str"]


def mask_ious(pred_rles: Sequence[dict], gt_rles: Sequence[dict]) -> np.ndarray:
    """IoU of every prediction mask with every GT mask.

    Parameters
    ----------
    pred_rles, gt_rles : sequence of dict
        COCO RLEs (compressed counts as str/bytes, or uncompressed lists), all of one image size.

    Returns
    -------
    numpy.ndarray
        Shape (len(pred_rles), len(gt_rles)), float64.
    """
    if len(pred_rles) == 0 or len(gt_rles) == 0:
        return np.zeros((len(pred_rles), len(gt_rles)), dtype=np.float64)
    dts = [as_pycoco(r) for r in pred_rles]
    gts = [as_pycoco(r) for r in gt_rles]
    sizes = {tuple(r["size"]) for r in dts} | {tuple(r["size"]) for r in gts}
    if len(sizes) != 1:
        raise ValueError(f"masks of one image must share one size; got {sorted(sizes)}")
    ious = mask_utils.iou(dts, gts, [0] * len(gts))
    return np.asarray(ious, dtype=np.float64).reshape(len(dts), len(gts))


def match_image(
    pred_rles: Sequence[dict] | None,
    pred_scores: Sequence[float] | np.ndarray,
    gt_rles: Sequence[dict] | None,
    iou_threshold: float = IOU_THRESHOLD,
    *,
    ious: np.ndarray | None = None,
) -> np.ndarray:
    """Match the predictions of one class in one image to that class's GT instances.

    Parameters
    ----------
    pred_rles : sequence of dict or None
        Prediction masks (COCO RLE); may be None when ``ious`` is given.
    pred_scores : array-like of float
        Confidences, same length as the predictions.
    gt_rles : sequence of dict or None
        GT masks of this class in this image; may be None when ``ious`` is given.
    iou_threshold : float
        Minimum IoU for a match (inclusive).
    ious : numpy.ndarray, optional
        Precomputed IoU matrix, shape (n_pred, n_gt).

    Returns
    -------
    numpy.ndarray
        ``bool`` array in the input order of the predictions: True for a TP.
        Predictions are processed by decreasing confidence (stable); each
        takes its best-IoU GT (first on ties); TP if that IoU >= threshold
        and that GT is unmatched, otherwise FP (duplicates are FPs).
    """
    scores = np.asarray(pred_scores, dtype=np.float64).ravel()
    if ious is None:
        ious = mask_ious(list(pred_rles or []), list(gt_rles or []))
    ious = np.asarray(ious, dtype=np.float64).reshape(len(scores), -1) if len(scores) else np.zeros((0, 0))
    tp = np.zeros(len(scores), dtype=bool)
    if len(scores) == 0 or ious.shape[1] == 0:
        return tp
    matched = np.zeros(ious.shape[1], dtype=bool)
    for k in np.argsort(-scores, kind="stable"):
        j = int(np.argmax(ious[k]))
        if ious[k, j] >= iou_threshold and not matched[j]:
            matched[j] = True
            tp[k] = True
    return tp


def average_precision(scores: Sequence[float] | np.ndarray, tp: Sequence[bool] | np.ndarray, n_gt: int) -> float:
    """Average precision of one class (OpenImages / VOC 2010+ style).

    Parameters
    ----------
    scores : array-like of float
        Confidences of all predictions of the class, over all images.
    tp : array-like of bool
        Whether each prediction is a true positive.
    n_gt : int
        Number of GT instances of the class.

    Returns
    -------
    float
        Area under the precision-recall curve with precision made
        monotonically non-increasing; predictions ranked by decreasing
        confidence with a stable sort. NaN when ``n_gt == 0`` (undefined),
        0.0 when there are GT instances but no prediction.

    Raises
    ------
    ValueError
        Lengths differ, or more TPs than GT instances.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    tp = np.asarray(tp, dtype=bool).ravel()
    if scores.shape != tp.shape:
        raise ValueError(f"scores and tp differ in length ({len(scores)} vs {len(tp)})")
    if int(tp.sum()) > n_gt:
        raise ValueError(f"{int(tp.sum())} true positives but only {n_gt} GT instances")
    if n_gt == 0:
        return math.nan
    if len(scores) == 0:
        return 0.0
    tp = tp[np.argsort(-scores, kind="stable")]
    tp_cum = np.cumsum(tp)
    precision = tp_cum / np.arange(1, len(tp) + 1)
    recall = tp_cum / n_gt
    recall = np.concatenate(([0.0], recall, [1.0]))
    precision = np.concatenate(([0.0], precision, [0.0]))
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


@dataclass
class MetricResult:
    """The metric's result.

    Attributes
    ----------
    ap : dict of int to float
        AP per class id 0-18; NaN where the class has no GT instance.
    n_gt, n_pred, n_tp : dict of int to int
        GT instances, predictions and true positives per class.
    mean_ap : float
        Mean of the defined APs (NaN classes excluded); NaN if none is defined.
    iou_threshold : float
        The IoU threshold used.
    n_images : int
        Images scored (those in the truth).
    missing_ids : list of str
        Truth images with no row in the predictions (scored as no predictions).
    extra_ids : list of str
        Prediction images not in the truth (ignored).
    """

    ap: dict[int, float]
    n_gt: dict[int, int]
    n_pred: dict[int, int]
    n_tp: dict[int, int]
    mean_ap: float
    iou_threshold: float = IOU_THRESHOLD
    n_images: int = 0
    missing_ids: list[str] = field(default_factory=list)
    extra_ids: list[str] = field(default_factory=list)

    @property
    def mAP(self) -> float:  # noqa: N802 - the metric's usual name
        """Alias of :attr:`mean_ap`."""
        return self.mean_ap

    def table(self) -> str:
        """Format a per-class table and the final ``mAP: 0.xxx`` line.

        Returns
        -------
        str
        """
        lines = [f"{'id':>2}  {'class':<42} {'n GT':>7} {'n pred':>7} {'AP':>7}"]
        for c in range(NUM_CLASSES):
            ap = self.ap[c]
            ap_text = "n/a" if math.isnan(ap) else f"{ap:.3f}"
            lines.append(f"{c:>2}  {CLASS_NAMES[c]:<42} {self.n_gt[c]:>7} {self.n_pred[c]:>7} {ap_text:>7}")
        n_def = sum(not math.isnan(v) for v in self.ap.values())
        lines.append(
            f"{n_def} of {NUM_CLASSES} classes have ground truth (n/a: excluded from the mean); "
            f"{self.n_images} images; IoU >= {self.iou_threshold:g}"
        )
        if self.missing_ids:
            lines.append(
                f"{len(self.missing_ids)} truth image(s) without predictions: {', '.join(self.missing_ids[:10])}"
            )
        if self.extra_ids:
            lines.append(
                f"{len(self.extra_ids)} predicted image(s) not in the truth (ignored): {', '.join(self.extra_ids[:10])}"
            )
        lines.append("mAP: n/a" if math.isnan(self.mean_ap) else f"mAP: {self.mean_ap:.3f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN written as None).

        Returns
        -------
        dict
        """

        def num(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        return {
            "mAP": num(self.mean_ap),
            "iou_threshold": self.iou_threshold,
            "n_images": self.n_images,
            "classes": [
                {
                    "id": c,
                    "name": CLASS_NAMES[c],
                    "ap": num(self.ap[c]),
                    "n_gt": self.n_gt[c],
                    "n_pred": self.n_pred[c],
                    "n_tp": self.n_tp[c],
                }
                for c in range(NUM_CLASSES)
            ],
            "missing_ids": list(self.missing_ids),
            "extra_ids": list(self.extra_ids),
        }


def _predictions_of(value: Any) -> tuple[list[tuple[int, float, Any]], tuple[int, int] | None]:
    """Predictions and (height, width) of one image from a SubmissionRow-like object or a list."""
    if hasattr(value, "predictions") and hasattr(value, "height") and hasattr(value, "width"):
        return list(value.predictions), (int(value.height), int(value.width))
    return list(value), None


def _match_images(
    truth: Mapping[str, Sequence[GTCell]],
    predictions: Mapping[str, Any],
    iou_threshold: float,
    sizes: Mapping[str, tuple[int, int]] | None,
) -> tuple[dict[str, dict[int, tuple[np.ndarray, np.ndarray]]], dict[str, np.ndarray], list[str], list[str]]:
    """Match every image's predictions to its truth, class by class (the metric's per-image step).

    Returns
    -------
    matched : dict
        Per image ID, per predicted class: (confidences, TP flags).
    n_gt : dict
        Per image ID, (19,) GT instances per class.
    missing, extra : list of str
        Truth images without predictions; predicted images not in the truth.
    """
    matched: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    n_gt: dict[str, np.ndarray] = {}
    sizes = dict(sizes or {})
    missing = [i for i in truth if i not in predictions]
    extra = [i for i in predictions if i not in truth]
    if extra:
        warnings.warn(
            f"{len(extra)} predicted image(s) are not in the truth and are ignored: {extra[:5]}", stacklevel=2
        )
    for image_id, cells in truth.items():
        cells = list(cells)
        gt_classes = [sorted({int(c) for c in classes}) for _, classes in cells]
        n_gt[image_id] = np.zeros(NUM_CLASSES, np.int64)
        matched[image_id] = {}
        for classes in gt_classes:
            for c in classes:
                if not 0 <= c < NUM_CLASSES:
                    raise ValueError(f"{image_id}: GT class id {c} is outside 0-{NUM_CLASSES - 1}")
                n_gt[image_id][c] += 1
        preds, pred_size = _predictions_of(predictions.get(image_id, []))
        if not preds:
            continue
        size = tuple(int(v) for v in cells[0][0]["size"]) if cells else sizes.get(image_id, pred_size)
        if pred_size is not None and size is not None and tuple(size) != pred_size:
            raise ValueError(
                f"{image_id}: the prediction is for a {pred_size[1]}x{pred_size[0]} image "
                f"but the truth is {size[1]}x{size[0]}"
            )
        pred_cls = np.array([int(p[0]) for p in preds], dtype=np.int64)
        if np.any((pred_cls < 0) | (pred_cls >= NUM_CLASSES)):
            raise ValueError(f"{image_id}: predicted class id outside 0-{NUM_CLASSES - 1}")
        pred_conf = np.array([float(p[1]) for p in preds], dtype=np.float64)
        if cells:
            rles = [kaggle_to_rle(m, size[0], size[1]) if isinstance(m, str) else m for _, _, m in preds]
            ious = mask_ious(rles, [rle for rle, _ in cells])
        else:
            ious = np.zeros((len(preds), 0))
        for c in np.unique(pred_cls).tolist():
            pi = np.flatnonzero(pred_cls == c)
            gi = [j for j, classes in enumerate(gt_classes) if c in classes]
            tp = match_image(None, pred_conf[pi], None, iou_threshold, ious=ious[np.ix_(pi, gi)])
            matched[image_id][c] = (pred_conf[pi], tp)
    return matched, n_gt, missing, extra


def _pool(
    matched: Mapping[str, Mapping[int, tuple[np.ndarray, np.ndarray]]],
    n_gt_img: Mapping[str, np.ndarray],
    ids: Sequence[str],
) -> tuple[dict[int, float], dict[int, int], dict[int, int], dict[int, int]]:
    """Per-class AP over the pooled matches of ``ids`` (in that order; an ID listed twice counts twice).

    Returns
    -------
    ap, n_gt, n_pred, n_tp : dict of int
        Per class: AP (NaN without GT), GT instances, predictions and true positives.
    """
    ap: dict[int, float] = {}
    n_gt: dict[int, int] = {}
    n_pred: dict[int, int] = {}
    n_tp: dict[int, int] = {}
    for c in range(NUM_CLASSES):
        parts = [matched[i][c] for i in ids if c in matched[i]]
        s = np.concatenate([q[0] for q in parts]) if parts else np.zeros(0)
        t = np.concatenate([q[1] for q in parts]) if parts else np.zeros(0, dtype=bool)
        n_gt[c] = int(sum(int(n_gt_img[i][c]) for i in ids))
        ap[c] = average_precision(s, t, n_gt[c])
        n_pred[c] = len(s)
        n_tp[c] = int(t.sum())
    return ap, n_gt, n_pred, n_tp


def _mean_defined(ap: Mapping[int, float]) -> float:
    """Mean of the per-class APs that are defined (classes with GT); NaN when none is."""
    defined = [v for v in ap.values() if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def evaluate(
    truth: Mapping[str, Sequence[GTCell]],
    predictions: Mapping[str, Any],
    iou_threshold: float = IOU_THRESHOLD,
    *,
    sizes: Mapping[str, tuple[int, int]] | None = None,
) -> MetricResult:
    """Score predictions against ground truth.

    Parameters
    ----------
    truth : mapping of str to sequence of (dict, sequence of int)
        Per image ID, its GT cells as (COCO RLE, class ids). An image with no
        cells is an empty sequence. Image order (the mapping's order) breaks
        confidence ties across images.
    predictions : mapping of str to sequence of (int, float, dict or str), or to SubmissionRow
        Per image ID, (class, confidence, mask) with the mask as COCO RLE or
        Kaggle mask string; or :class:`locus.service.submission.SubmissionRow`
        objects (their width/height are checked against the truth).
    iou_threshold : float
        Match threshold (0.6 in the competition).
    sizes : mapping of str to (int, int), optional
        (height, width) per image, needed only to decode Kaggle strings of an
        image whose truth has no cells (otherwise the GT RLE size is used).

    Returns
    -------
    MetricResult

    Raises
    ------
    ValueError
        A class id outside 0-18, or an image size that differs between
        prediction and truth.
    """
    matched, n_gt_img, missing, extra = _match_images(truth, predictions, iou_threshold, sizes)
    ap, n_gt, n_pred, n_tp = _pool(matched, n_gt_img, list(truth))
    mean_ap = _mean_defined(ap)
    return MetricResult(
        ap=ap,
        n_gt=n_gt,
        n_pred=n_pred,
        n_tp=n_tp,
        mean_ap=mean_ap,
        iou_threshold=iou_threshold,
        n_images=len(truth),
        missing_ids=missing,
        extra_ids=extra,
    )


def paired_maps(
    truth: Mapping[str, Sequence[GTCell]],
    predictions: Sequence[Mapping[str, Any]],
    iou_threshold: float = IOU_THRESHOLD,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    sizes: Mapping[str, tuple[int, int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Competition mAP of one or more prediction sets on all the images and on the same bootstrap resamples.

    Each resample draws the images with replacement (a field drawn twice counts twice: its predictions,
    matches and GT instances) and is scored as :func:`evaluate` scores (per-class AP over the pooled
    predictions, mean over classes with GT). Every prediction set is scored on the same resamples, so
    the sets' mAPs can be compared resample by resample (a paired bootstrap: how hard the drawn fields
    are cancels out of the difference). Each set is matched to the truth once.

    Parameters
    ----------
    truth, iou_threshold, sizes
        As for :func:`evaluate`.
    predictions : sequence of mapping
        One or more prediction sets, each as for :func:`evaluate`.
    n_boot : int
        Resamples.
    seed : int
        Seed of the resampling (reproducible).

    Returns
    -------
    full : numpy.ndarray
        (len(predictions),) mAP on all the images (:func:`evaluate`'s); NaN without images.
    draws : numpy.ndarray
        (len(predictions), n_boot) resampled mAPs; (len(predictions), 0) without images.
    """
    if not truth:
        return np.full(len(predictions), math.nan), np.zeros((len(predictions), 0))
    ids = list(truth)
    matches = [_match_images(truth, p, iou_threshold, sizes)[:2] for p in predictions]
    full = np.array([_mean_defined(_pool(matched, n_gt, ids)[0]) for matched, n_gt in matches])
    return full, _resampled_maps(matches, ids, n_boot, seed)


def _resampled_maps(
    matches: Sequence[tuple[Mapping[str, Mapping[int, tuple[np.ndarray, np.ndarray]]], Mapping[str, np.ndarray]]],
    ids: Sequence[str],
    n_boot: int,
    seed: int,
) -> np.ndarray:
    """(len(matches), n_boot) mAPs of each matched set on the same resamples of ``ids``."""
    rng = np.random.default_rng(seed)
    maps = np.empty((len(matches), n_boot))
    for b in range(n_boot):
        pick = [ids[i] for i in rng.integers(0, len(ids), len(ids))]
        for k, (matched, n_gt) in enumerate(matches):
            maps[k, b] = _mean_defined(_pool(matched, n_gt, pick)[0])
    return maps


def _central(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` of ``values`` (NaNs ignored); (nan, nan) when empty."""
    if values.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.nanpercentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def map_interval(
    truth: Mapping[str, Sequence[GTCell]],
    predictions: Mapping[str, Any],
    iou_threshold: float = IOU_THRESHOLD,
    *,
    level: float = 0.9,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of the competition mAP over images.

    The images are resampled with replacement and each resample is scored with the competition
    metric (:func:`paired_maps`); the central ``level`` of the resampled mAPs is returned. It says
    how much a mAP measured on these fields could move on other fields drawn the same way.

    Parameters
    ----------
    truth, predictions, iou_threshold
        As for :func:`evaluate`.
    level : float
        Coverage of the interval (0.9: the 5th and 95th percentiles).
    n_boot : int
        Resamples.
    seed : int
        Seed of the resampling (the interval is reproducible).

    Returns
    -------
    (float, float)
        Lower and upper ends; (nan, nan) without images.
    """
    draws = paired_maps(truth, [predictions], iou_threshold, n_boot=n_boot, seed=seed)[1]
    return _central(draws[0], level)


@dataclass(frozen=True)
class MapDifference:
    """mAP of predictions A minus that of predictions B on the same images, with its paired bootstrap interval.

    Attributes
    ----------
    difference : float
        mAP(A) - mAP(B) on all the images.
    interval : tuple of float
        Central ``level`` of the difference over paired resamples (both sets scored on the same draw).
    a_better, b_better : float
        Shares of the resamples in which A's mAP is above B's, and below it (the rest are ties).
    level : float
        Coverage of ``interval``.
    n_images : int
        Images scored.
    """

    difference: float
    interval: tuple[float, float]
    a_better: float
    b_better: float
    level: float
    n_images: int

    @classmethod
    def from_draws(cls, a: float, b: float, draws: np.ndarray, level: float, n_images: int) -> MapDifference:
        """The comparison from both mAPs on all the images and their paired resamples.

        Parameters
        ----------
        a, b : float
            mAP of A and of B on all the images.
        draws : numpy.ndarray
            (2, n_boot): A's and B's mAP on the same resamples (:func:`paired_maps`).
        level : float
            Coverage of the interval.
        n_images : int
            Images the resamples draw from.

        Returns
        -------
        MapDifference
            NaN interval and shares without resamples.
        """
        diff = np.asarray(draws[0]) - np.asarray(draws[1])
        ahead = behind = math.nan
        if diff.size:
            ahead, behind = float(np.mean(diff > 0)), float(np.mean(diff < 0))
        return cls(float(a - b), _central(diff, level), ahead, behind, level, n_images)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "difference": self.difference,
            "interval": list(self.interval),
            "a_better": self.a_better,
            "b_better": self.b_better,
            "level": self.level,
            "n_images": self.n_images,
        }

    def text(self, a: str = "A", b: str = "B") -> str:
        """One line: the difference, its interval and how often A came out ahead."""
        lo, hi = self.interval
        return (
            f"mAP {a} - {b}: {self.difference:+.3f}, {self.level:.0%} paired bootstrap interval over "
            f"{self.n_images} images {lo:+.3f} to {hi:+.3f}; {a} higher in {self.a_better:.0%} of resamples"
        )


def map_difference(
    truth: Mapping[str, Sequence[GTCell]],
    predictions_a: Mapping[str, Any],
    predictions_b: Mapping[str, Any],
    iou_threshold: float = IOU_THRESHOLD,
    *,
    level: float = 0.9,
    n_boot: int = 1000,
    seed: int = 0,
    sizes: Mapping[str, tuple[int, int]] | None = None,
) -> MapDifference:
    """Compare two prediction sets on the same images: the mAP difference and its paired bootstrap interval.

    Two models scored on the same fields share those fields' difficulty, so their difference is known
    much more precisely than either mAP alone (:func:`map_interval`). Both sets are scored on every
    resample of the images (:func:`paired_maps`) and the interval is taken over the differences.

    Parameters
    ----------
    truth, iou_threshold, sizes
        As for :func:`evaluate`.
    predictions_a, predictions_b : mapping
        The two prediction sets, each as for :func:`evaluate`.
    level, n_boot, seed
        As for :func:`map_interval`.

    Returns
    -------
    MapDifference
        NaN difference and interval without images.
    """
    pair = [predictions_a, predictions_b]
    full, draws = paired_maps(truth, pair, iou_threshold, n_boot=n_boot, seed=seed, sizes=sizes)
    return MapDifference.from_draws(full[0], full[1], draws, level, len(truth))


def truth_from_labels(cells: np.ndarray, cell_labels: Mapping[int, Sequence[int]]) -> list[GTCell]:
    """Build one image's GT cells from a label image and per-cell classes.

    Parameters
    ----------
    cells : numpy.ndarray
        (H, W) cell label image, 0 = background.
    cell_labels : mapping of int to sequence of int
        Class ids per cell id. Cells of the image without an entry are
        skipped with a warning (they are instances of no class); entries for
        cells not in the image become empty-mask instances, also with a warning.

    Returns
    -------
    list of (dict, list of int)
        (COCO RLE, class ids) per cell, in cell id order.
    """
    present = set(np.unique(cells).tolist()) - {0}
    unlabelled = sorted(present - set(cell_labels))
    absent = sorted(set(cell_labels) - present)
    if unlabelled:
        warnings.warn(
            f"{len(unlabelled)} cell(s) have no labels and are not GT instances: {unlabelled[:10]}", stacklevel=2
        )
    if absent:
        warnings.warn(f"{len(absent)} labelled cell(s) are not in the label image: {absent[:10]}", stacklevel=2)
    ids = sorted(cell_labels)
    rles = encode_label_masks(cells, ids)
    return [(rles[i], sorted({int(c) for c in cell_labels[i]})) for i in ids]


def read_truth_folder(
    truth_dir: str | os.PathLike,
) -> tuple[dict[str, list[GTCell]], dict[str, tuple[int, int]]]:
    """Ground truth of a dataset folder, as :func:`evaluate` takes it.

    Parameters
    ----------
    truth_dir : path-like
        Dataset folder containing ``truth/`` (``{ID}_cells.png`` and
        ``cells.csv``), or the ``truth/`` folder itself.

    Returns
    -------
    truth : dict
        Per image ID, its GT cells.
    sizes : dict
        Per image ID, (height, width).

    Raises
    ------
    ValueError
        No truth images in the folder.
    """
    from locus.service.readers import load_truth, read_cell_labels, truth_ids

    ids = truth_ids(truth_dir)
    if not ids:
        raise ValueError(f"{truth_dir}: no truth/{{ID}}_cells.png found")
    labels = read_cell_labels(truth_dir)
    truth: dict[str, list[GTCell]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for image_id in ids:
        t = load_truth(truth_dir, image_id, cell_labels=labels.get(image_id, {}))
        truth[image_id] = truth_from_labels(t.cells, t.cell_labels)
        sizes[image_id] = (int(t.cells.shape[0]), int(t.cells.shape[1]))
    return truth, sizes


def evaluate_folder(
    truth_dir: str | os.PathLike, submission_csv: str | os.PathLike, iou_threshold: float = IOU_THRESHOLD
) -> MetricResult:
    """Score a submission CSV against a ground-truth folder.

    Parameters
    ----------
    truth_dir : path-like
        Dataset folder containing ``truth/`` (``{ID}_cells.png`` and
        ``cells.csv``), or the ``truth/`` folder itself.
    submission_csv : path-like
        Submission CSV (``ID,ImageWidth,ImageHeight,PredictionString``).
    iou_threshold : float
        Match threshold.

    Returns
    -------
    MetricResult
    """
    from locus.service.submission import read_submission

    truth, sizes = read_truth_folder(truth_dir)
    return evaluate(truth, read_submission(submission_csv), iou_threshold, sizes=sizes)


def label_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every pair of labels of two label images (the one label-overlap matcher of Locus).

    Parameters
    ----------
    a, b : numpy.ndarray
        (H, W) integer label images, 0 = background, same shape.

    Returns
    -------
    a_ids, b_ids : numpy.ndarray
        The non-zero labels present in ``a`` and in ``b``, increasing.
    iou : numpy.ndarray
        (len(a_ids), len(b_ids)) ``float64`` intersection over union.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label images differ in shape: {a.shape} vs {b.shape}")
    a_ids, a_inv = np.unique(a.ravel(), return_inverse=True)
    b_ids, b_inv = np.unique(b.ravel(), return_inverse=True)
    a_area = np.bincount(a_inv, minlength=len(a_ids))
    b_area = np.bincount(b_inv, minlength=len(b_ids))
    both = (a.ravel() != 0) & (b.ravel() != 0)
    inter = np.bincount(a_inv[both] * len(b_ids) + b_inv[both], minlength=len(a_ids) * len(b_ids))
    inter = inter.reshape(len(a_ids), len(b_ids)).astype(np.float64)
    a_keep = a_ids != 0
    b_keep = b_ids != 0
    inter = inter[np.ix_(a_keep, b_keep)]
    union = a_area[a_keep][:, None] + b_area[b_keep][None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return a_ids[a_keep], b_ids[b_keep], iou


def segmentation_scores(
    pred_labels: np.ndarray, true_labels: np.ndarray, iou_threshold: float = 0.5
) -> dict[str, float | int]:
    """Segmentation quality: one-to-one matches of predicted and true cells at IoU >= threshold.

    Parameters
    ----------
    pred_labels, true_labels : numpy.ndarray
        (H, W) label images, 0 = background, same shape.
    iou_threshold : float
        Minimum IoU of a match (inclusive).

    Returns
    -------
    dict
        ``n_pred``, ``n_true``, ``n_matched``; ``precision`` = matched / n_pred,
        ``recall`` = matched / n_true, ``f1`` = 2 matched / (n_pred + n_true)
        (1.0 when both are empty; precision is 1.0 with no predictions only if
        there is no true cell, likewise recall); ``mean_iou``: mean IoU of the
        matched pairs (NaN without matches); ``iou_threshold``. Matches are
        the IoU-maximising one-to-one assignment among pairs over the threshold.
    """
    _, _, iou = label_iou(pred_labels, true_labels)
    n_pred, n_true = iou.shape
    matched_ious = np.zeros(0)
    if n_pred and n_true:
        cand = np.where(iou >= iou_threshold, iou, 0.0)
        rows, cols = linear_sum_assignment(cand, maximize=True)
        ok = (iou[rows, cols] >= iou_threshold) & (iou[rows, cols] > 0)
        matched_ious = iou[rows[ok], cols[ok]]
    n_matched = len(matched_ious)
    precision = n_matched / n_pred if n_pred else float(n_true == 0)
    recall = n_matched / n_true if n_true else float(n_pred == 0)
    f1 = 2 * n_matched / (n_pred + n_true) if (n_pred + n_true) else 1.0
    return {
        "n_pred": n_pred,
        "n_true": n_true,
        "n_matched": n_matched,
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "mean_iou": float(matched_ious.mean()) if n_matched else math.nan,
        "iou_threshold": float(iou_threshold),
    }


# ----------------------------------------------------------------------------------------------
# Image-level mode: fields with image labels only (real HPA / Kaggle train.csv), no cell truth.
# ----------------------------------------------------------------------------------------------

WRONG_CALL_SHARE: float = 0.4
"""A wrong class called on at least this share of a field's cells counts as a dominant wrong call."""


@dataclass
class FieldCalls:
    """What a model called on one field that has only image-level labels.

    Attributes
    ----------
    id : str
        Field ID.
    true_labels : list of int
        The field's image labels.
    n_cells : int
        Cells classified.
    called : dict of int to int
        Class id -> cells on which it is called (probability at or above its threshold); every class called.
    top : dict of int to int
        Class id -> cells on which it is the most probable class.
    found : list of int
        True labels called on at least one cell.
    missed : list of int
        True labels called on no cell.
    wrong_dominant : list of int
        Classes not among the true labels called on at least ``WRONG_CALL_SHARE`` of the cells.
    image_scores : list of float
        Per class, the field's score: the highest cell probability.
    """

    id: str
    true_labels: list[int]
    n_cells: int
    called: dict[int, int]
    top: dict[int, int]
    found: list[int]
    missed: list[int]
    wrong_dominant: list[int]
    image_scores: list[float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, with class names."""
        return {
            "id": self.id,
            "true_labels": [CLASS_NAMES[c] for c in self.true_labels],
            "n_cells": self.n_cells,
            "called": {CLASS_NAMES[c]: n for c, n in sorted(self.called.items(), key=lambda kv: -kv[1])},
            "top": {CLASS_NAMES[c]: n for c, n in sorted(self.top.items(), key=lambda kv: -kv[1])},
            "found": [CLASS_NAMES[c] for c in self.found],
            "missed": [CLASS_NAMES[c] for c in self.missed],
            "wrong_dominant": [CLASS_NAMES[c] for c in self.wrong_dominant],
        }


@dataclass
class ImageLevelResult:
    """Image-level scores over fields with image labels only.

    Attributes
    ----------
    ap : dict of int to float
        Per class, AP over images where an image's score is its highest cell probability; NaN for a class
        no image carries (or that every image carries: no negatives to rank against).
    fields : list of FieldCalls
        Per field, the calls.
    """

    ap: dict[int, float]
    fields: list[FieldCalls]

    @property
    def mAP(self) -> float:  # noqa: N802 - the metric's usual name
        """Mean of the defined per-class image-level APs (NaN when none is defined)."""
        vals = [v for v in self.ap.values() if not math.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def labels_found(self) -> tuple[int, int]:
        """(true image labels called on at least one cell, all true image labels)."""
        return sum(len(f.found) for f in self.fields), sum(len(f.true_labels) for f in self.fields)

    @property
    def fields_with_wrong_dominant(self) -> int:
        """Fields where some wrong class is called on at least ``WRONG_CALL_SHARE`` of the cells."""
        return sum(1 for f in self.fields if f.wrong_dominant)

    def table(self) -> str:
        """Per-field lines and the summary lines."""
        lines = []
        for f in self.fields:
            d = f.to_dict()
            called = ", ".join(f"{k} {v}" for k, v in d["called"].items()) or "-"
            top = ", ".join(f"{k} {v}" for k, v in d["top"].items()) or "-"
            lines.append(f"{f.id}: {f.n_cells} cells; true: {', '.join(d['true_labels'])}")
            lines.append(f"  called: {called}")
            lines.append(f"  top label: {top}")
            lines.append(
                f"  found {len(f.found)}/{len(f.true_labels)}"
                + (f"; missed: {', '.join(d['missed'])}" if f.missed else "")
                + (
                    f"; wrong on >= {WRONG_CALL_SHARE:.0%}: {', '.join(d['wrong_dominant'])}"
                    if f.wrong_dominant
                    else ""
                )
            )
        found, total = self.labels_found
        lines.append(f"true labels called on >= 1 cell: {found}/{total}")
        lines.append(
            f"fields with a wrong class on >= {WRONG_CALL_SHARE:.0%} of cells: {self.fields_with_wrong_dominant}"
        )
        lines.append(f"image-level mAP: {self.mAP:.3f}" if not math.isnan(self.mAP) else "image-level mAP: n/a")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        found, total = self.labels_found
        return {
            "image_level_mAP": None if math.isnan(self.mAP) else self.mAP,
            "ap": {CLASS_NAMES[c]: (None if math.isnan(v) else v) for c, v in self.ap.items()},
            "labels_found": found,
            "labels_total": total,
            "fields_with_wrong_dominant": self.fields_with_wrong_dominant,
            "fields": [f.to_dict() for f in self.fields],
        }


def field_calls(
    image_id: str, true_labels: Sequence[int], probabilities: np.ndarray, thresholds: np.ndarray | Sequence[float]
) -> FieldCalls:
    """The calls of one field with image labels only.

    Parameters
    ----------
    image_id : str
        Field ID.
    true_labels : sequence of int
        Image labels.
    probabilities : numpy.ndarray
        (n_cells, 19) cell probabilities.
    thresholds : array-like
        (19,) per-class decision thresholds.

    Returns
    -------
    FieldCalls
    """
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1, NUM_CLASSES)
    thr = np.asarray(thresholds, dtype=np.float64).reshape(NUM_CLASSES)
    n = p.shape[0]
    calls = p >= thr[None, :]
    n_called = calls.sum(axis=0)
    called = {int(k): int(n_called[k]) for k in np.flatnonzero(n_called)}
    top_counts = np.bincount(p.argmax(axis=1), minlength=NUM_CLASSES) if n else np.zeros(NUM_CLASSES, int)
    top = {int(k): int(top_counts[k]) for k in np.flatnonzero(top_counts)}
    truth = sorted({int(c) for c in true_labels})
    found = [c for c in truth if called.get(c, 0) > 0]
    wrong = [c for c, k in called.items() if c not in truth and n and k >= WRONG_CALL_SHARE * n]
    scores = p.max(axis=0) if n else np.zeros(NUM_CLASSES)
    return FieldCalls(
        id=image_id,
        true_labels=truth,
        n_cells=n,
        called=called,
        top=top,
        found=found,
        missed=[c for c in truth if c not in found],
        wrong_dominant=sorted(wrong),
        image_scores=[float(v) for v in scores],
    )


def evaluate_image_level(
    image_labels: Mapping[str, Sequence[int]],
    cell_probabilities: Mapping[str, np.ndarray],
    thresholds: np.ndarray | Sequence[float],
) -> ImageLevelResult:
    """Score fields that have image-level labels only.

    Per class: AP over images, an image's score being its highest cell probability (positives: the images
    labelled with the class). Per field: :func:`field_calls`.

    Parameters
    ----------
    image_labels : mapping
        Field ID -> image labels (class ids).
    cell_probabilities : mapping
        Field ID -> (n_cells, 19) probabilities; a field without predictions counts as no cells.
    thresholds : array-like
        (19,) per-class decision thresholds (the model manifest's).

    Returns
    -------
    ImageLevelResult
    """
    fields = [
        field_calls(i, image_labels[i], cell_probabilities.get(i, np.zeros((0, NUM_CLASSES))), thresholds)
        for i in sorted(image_labels)
    ]
    ap: dict[int, float] = {}
    for k in range(NUM_CLASSES):
        positive = np.array([k in f.true_labels for f in fields], dtype=bool)
        if not positive.any() or positive.all():
            ap[k] = float("nan")
            continue
        scores = np.array([f.image_scores[k] for f in fields])
        order = np.argsort(-scores, kind="stable")
        ap[k] = average_precision(scores[order], positive[order], int(positive.sum()))
    return ImageLevelResult(ap=ap, fields=fields)


def cell_probabilities_from_submission(row_predictions: Sequence[tuple[int, float, str]]) -> np.ndarray:
    """Per-cell probabilities from one submission row: a cell is one distinct mask string.

    Parameters
    ----------
    row_predictions : sequence of (int, float, str)
        (class, confidence, Kaggle mask string) triples of one field; classes a cell does not list score 0.

    Returns
    -------
    numpy.ndarray
        (n_cells, 19) float64, cells in order of first appearance.
    """
    index: dict[str, int] = {}
    rows: list[np.ndarray] = []
    for c, conf, mask in row_predictions:
        i = index.setdefault(mask, len(index))
        if i == len(rows):
            rows.append(np.zeros(NUM_CLASSES))
        rows[i][int(c)] = max(rows[i][int(c)], float(conf))
    return np.stack(rows) if rows else np.zeros((0, NUM_CLASSES))


def evaluate_image_level_csv(
    labels_csv: str | os.PathLike, submission_csv: str | os.PathLike, thresholds: np.ndarray | Sequence[float]
) -> ImageLevelResult:
    """:func:`evaluate_image_level` from a Kaggle ``train.csv`` and a submission CSV.

    Parameters
    ----------
    labels_csv : path-like
        ``ID,Label`` image labels; only the IDs also in the submission are scored.
    submission_csv : path-like
        Submission CSV of the same fields.
    thresholds : array-like
        (19,) per-class thresholds.

    Returns
    -------
    ImageLevelResult
    """
    from locus.service.readers import read_labels_csv
    from locus.service.submission import read_submission

    labels = read_labels_csv(labels_csv)
    rows = read_submission(submission_csv)
    scored = {i: labels[i] for i in rows if i in labels}
    if not scored:
        raise ValueError(f"{submission_csv}: no field ID in common with {labels_csv}")
    probs = {i: cell_probabilities_from_submission(rows[i].predictions) for i in scored}
    return evaluate_image_level(scored, probs, thresholds)
