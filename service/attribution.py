"""Integrated gradients (IG) per cell through ``grad.onnx``, with ONNX Runtime only.

The gradient model (:mod:`locus.training.grad_export`) has a fixed batch B, inputs
``image`` (B, S, S, 4) float32 0-255 and ``weights`` (B, 19), and outputs
``gradients`` = d sum(p * w) / d image and ``probabilities`` (B, 19). IG of class
``c`` for a crop ``x`` against a baseline ``x'`` is

    IG_c(x) = (x - x') * integral_0^1 d p_c(x' + a (x - x')) / dx da,

approximated here by the trapezoid rule over ``steps`` intervals (``steps + 1``
gradient evaluations; the two end points also give ``f(x')`` and ``f(x)`` for free).
Every (cell, class) pair is one row of the fixed batch per interpolation point, with a
one-hot ``weights`` row; the rows of several pairs share each batch, the last batch
is padded. Pairs are processed in groups so that memory stays bounded by
``pair_group`` accumulators of (S, S, 4) float64 plus one batch; the
``steps x N x S x S x 4`` interpolation tensor is never built.

Completeness: the attributions of a pair sum to ``f(x) - f(x')`` up to the quadrature
error. Every :class:`AttributionMap` reports it, absolute and relative
(``|sum - delta| / max(|delta|, eps)``). A confident model's probability can rise steeply
over a short stretch of the path, where a fixed step count converges slowly; with
``tolerance`` the pairs still over it are refined (midpoints only, so ``2n`` steps cost
``n`` more evaluations) until they meet it or reach ``max_steps``, within an optional
budget of evaluations. The service does this by default (``LOCUS_IG_TOLERANCE``, 5 %);
``benchmarks/bench_attribution.py`` measures the error against the step count.

Encoding (:func:`encode_map` / :func:`decode_map`): ``"png16-signed"``, a JSON object
``{"encoding": "png16-signed", "shape": [h, w], "scale": s, "data": <base64 16-bit PNG>}``
where ``value = (pixel - 32768) * scale``. A client decodes it in two lines::

    img = cv2.imdecode(np.frombuffer(base64.b64decode(d["data"]), np.uint8), cv2.IMREAD_UNCHANGED)
    arr = (img.astype(np.float32) - 32768.0) * d["scale"]

(or ``np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(d["data"]))), np.float32)``
for the first line). The quantisation error is at most ``scale / 2`` (``scale`` is the
map's largest absolute value / 32767).

This module imports numpy, OpenCV and ONNX Runtime only: never TensorFlow.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from locus.service.classes import CLASS_NAMES, NUM_CLASSES
from locus.service.config import IG_MAX_STEPS, IG_STEPS
from locus.service.crop import MAX_WINDOW_SIDE, CropRule, square_window

__all__ = [
    "AttributionMap",
    "Cancelled",
    "gradient_evaluations",
    "DEFAULT_STEPS",
    "MAX_STEPS",
    "ENCODING",
    "integrated_gradients",
    "make_baseline",
    "encode_map",
    "decode_map",
    "map_to_box",
]

DEFAULT_STEPS = IG_STEPS
"""Default number of trapezoid intervals (``steps + 1`` gradient evaluations per cell and class)."""

MAX_STEPS = IG_MAX_STEPS
"""Largest accepted step count (cost grows linearly with it)."""

ENCODING = "png16-signed"
"""Name of the map encoding written by :func:`encode_map`."""

COMPLETENESS_EPS = 1e-4
"""Floor of ``|f(x) - f(baseline)|`` in the relative completeness error."""

Baseline = Literal["black", "blur"]


@dataclass
class AttributionMap:
    """The IG attribution of one class for one cell.

    Attributes
    ----------
    cell_index : int
        Row of the cell in the ``inputs`` batch.
    class_id : int
        The attributed class (0-18).
    attribution : numpy.ndarray
        (S, S) ``float32``, signed, summed over the four channels (crop coordinates).
    channel_totals : numpy.ndarray
        (4,) ``float64``: the attribution summed over the map, per channel (R, G, B, Y).
    f_input : float
        ``p_c(x)``.
    f_baseline : float
        ``p_c(baseline)``.
    completeness_abs : float
        ``|sum(attribution) - (f_input - f_baseline)|``.
    completeness_rel : float
        ``completeness_abs / max(|f_input - f_baseline|, 1e-4)``.
    steps : int
        Trapezoid intervals used.
    baseline : str
        ``"black"``, ``"blur"`` or ``"custom"``.
    """

    cell_index: int
    class_id: int
    attribution: np.ndarray
    channel_totals: np.ndarray
    f_input: float
    f_baseline: float
    completeness_abs: float
    completeness_rel: float
    steps: int
    baseline: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        """The class name, e.g. ``"Nucleoplasm"``."""
        return CLASS_NAMES[self.class_id]

    @property
    def total(self) -> float:
        """Sum of the attribution (``~ f_input - f_baseline``)."""
        return float(self.channel_totals.sum())


def make_baseline(inputs: np.ndarray, kind: Baseline | np.ndarray = "black", sigma: float | None = None) -> np.ndarray:
    """The IG baseline for a batch of crops.

    Parameters
    ----------
    inputs : numpy.ndarray
        (N, S, S, 4) ``float32`` 0-255.
    kind : {"black", "blur"} or numpy.ndarray
        ``"black"``: all zeros. ``"blur"``: each crop Gaussian-blurred (per channel). An array
        of the inputs' shape (or (S, S, 4), broadcast) is used as given.
    sigma : float, optional
        Blur standard deviation in pixels (default ``S / 8``).

    Returns
    -------
    numpy.ndarray
        (N, S, S, 4) ``float32``.
    """
    inputs = np.asarray(inputs, np.float32)
    if isinstance(kind, np.ndarray):
        return np.ascontiguousarray(np.broadcast_to(kind.astype(np.float32), inputs.shape))
    if kind == "black":
        return np.zeros_like(inputs)
    if kind == "blur":
        s = float(sigma) if sigma is not None else inputs.shape[1] / 8.0
        out = np.empty_like(inputs)
        for i in range(inputs.shape[0]):
            out[i] = cv2.GaussianBlur(inputs[i], (0, 0), sigmaX=s, sigmaY=s, borderType=cv2.BORDER_REFLECT)
        return out
    raise ValueError(f"unknown baseline {kind!r}; use 'black', 'blur' or an array")


def _check_session(session: Any, batch_size: int, size: int, input_names: Sequence[str]) -> None:
    shapes = {i.name: i.shape for i in session.get_inputs()}
    for name in input_names:
        if name not in shapes:
            raise ValueError(f"the gradient model has no input {name!r} (inputs: {sorted(shapes)})")
    img = shapes[input_names[0]]
    if isinstance(img[0], int) and img[0] != batch_size:
        raise ValueError(f"batch_size {batch_size} differs from the gradient model's fixed batch {img[0]}")
    if len(img) == 4 and isinstance(img[1], int) and img[1] != size:
        raise ValueError(f"the crops are {size} px but the gradient model expects {img[1]} px")


class Cancelled(RuntimeError):  # noqa: N818 - a state, not an error of the caller
    """The work was stopped from outside (a request past its time limit)."""


def gradient_evaluations(cells: int, classes: int, steps: int) -> int:
    """Cost of integrated gradients: gradient-model evaluations for ``cells`` x ``classes`` maps.

    Parameters
    ----------
    cells, classes, steps : int
        Cells attributed, classes per cell, trapezoid steps.

    Returns
    -------
    int
        ``cells * classes * (steps + 1)``; one evaluation costs about 20 ms of one CPU core for
        the default B0 at 96 px (0.2 ms on a GPU), so the service's budget bounds a request's time.
    """
    return int(cells) * int(classes) * (int(steps) + 1)


def integrated_gradients(
    session: Any,
    batch_size: int,
    inputs: np.ndarray,
    targets: Sequence[Sequence[int]],
    steps: int = DEFAULT_STEPS,
    baseline: Baseline | np.ndarray = "black",
    *,
    pair_group: int = 16,
    max_steps: int = MAX_STEPS,
    tolerance: float | None = None,
    max_evaluations: int | None = None,
    input_names: Sequence[str] = ("image", "weights"),
    output_names: Sequence[str] = ("gradients", "probabilities"),
    stop: Callable[[], bool] | None = None,
) -> list[list[AttributionMap]]:
    """Integrated-gradient maps for each cell and each of its target classes.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        Session on ``grad.onnx``.
    batch_size : int
        The gradient model's fixed batch B (``manifest.grad.batch``).
    inputs : numpy.ndarray
        (N, S, S, 4) ``float32`` crops, 0-255 (as made by :func:`locus.service.crop.crop_cells`).
    targets : sequence of sequence of int
        Classes to attribute, per cell (``len(targets) == N``); an empty list gives no maps.
    steps : int
        Trapezoid intervals between baseline and input (``steps + 1`` gradient evaluations per
        (cell, class) pair), 1 to ``max_steps``.
    baseline : {"black", "blur"} or numpy.ndarray
        The baseline (see :func:`make_baseline`).
    pair_group : int
        (cell, class) pairs integrated together; bounds memory to ``pair_group`` (S, S, 4)
        float64 accumulators plus one (B, S, S, 4) batch.
    max_steps : int
        Upper limit on ``steps`` (and on the refinement below).
    tolerance : float, optional
        When set, pairs whose relative completeness error exceeds it are refined to twice the
        steps, repeatedly, while the step count stays within ``max_steps``: each refinement
        evaluates only the midpoints of the current intervals (``n`` more evaluations for ``2n``
        steps; the trapezoid sum at ``2n`` is half the one at ``n`` plus the midpoint sum over
        ``2n``). Each map reports the steps it finally used.
    max_evaluations : int, optional
        Most gradient-model evaluations in all (the first pass included); refinement stops
        where the next one would go over it, refining the worst pairs first. The first pass is
        not bounded here (the caller checks its cost, :func:`gradient_evaluations`).
    input_names, output_names : sequence of str
        Names of the gradient model's inputs (image, weights) and outputs (gradients, probabilities).
    stop : callable, optional
        Checked before every batch of the gradient model; when it returns True the work stops
        with :class:`Cancelled` (a request past its time limit frees its worker within one batch).

    Returns
    -------
    list of list of AttributionMap
        ``result[i][k]`` is the map of cell ``i`` for class ``targets[i][k]``.

    Raises
    ------
    ValueError
        Bad shapes, step count, class ids, or a session that does not match ``batch_size``.
    """
    inputs = np.asarray(inputs, np.float32)
    if inputs.ndim != 4 or inputs.shape[1] != inputs.shape[2] or inputs.shape[3] != 4:
        raise ValueError(f"inputs must be (N, S, S, 4), got {inputs.shape}")
    n, size = inputs.shape[0], inputs.shape[1]
    if len(targets) != n:
        raise ValueError(f"{len(targets)} target lists for {n} cells")
    steps = int(steps)
    if not 1 <= steps <= max_steps:
        raise ValueError(f"steps must be in 1-{max_steps}, got {steps}")
    if batch_size < 1 or pair_group < 1:
        raise ValueError("batch_size and pair_group must be >= 1")
    _check_session(session, batch_size, size, input_names)
    pairs = [(i, int(c)) for i, cls in enumerate(targets) for c in cls]
    for _, c in pairs:
        if not 0 <= c < NUM_CLASSES:
            raise ValueError(f"class id {c} is outside 0-{NUM_CLASSES - 1}")
    base_name = "custom" if isinstance(baseline, np.ndarray) else str(baseline)
    base = make_baseline(inputs, baseline)
    diff = inputs - base
    run = _Runner(session, batch_size, size, input_names, output_names, pair_group, stop)
    maps = run.pairs(
        base, diff, pairs, steps, base_name, tolerance=tolerance, max_steps=max_steps, max_evaluations=max_evaluations
    )
    results: list[list[AttributionMap]] = [[] for _ in range(n)]
    for m in maps:
        results[m.cell_index].append(m)
    return results


class _Runner:
    """Evaluates the trapezoid IG of (cell, class) pairs through the fixed-batch gradient model."""

    def __init__(
        self,
        session: Any,
        batch_size: int,
        size: int,
        input_names: Sequence[str],
        output_names: Sequence[str],
        pair_group: int,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        self.stop = stop
        self.session = session
        self.batch_size = batch_size
        self.size = size
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.pair_group = pair_group
        self.spent = 0  # gradient-model evaluations so far (rows with a pair; padding not counted)

    def pairs(
        self,
        base: np.ndarray,
        diff: np.ndarray,
        pairs: list[tuple[int, int]],
        steps: int,
        base_name: str,
        *,
        tolerance: float | None = None,
        max_steps: int = MAX_STEPS,
        max_evaluations: int | None = None,
    ) -> list[AttributionMap]:
        """IG maps of ``pairs`` (cell index, class id), in order, refined group by group (see ``tolerance``)."""
        alphas = np.linspace(0.0, 1.0, steps + 1, dtype=np.float64)
        quad = np.full(steps + 1, 1.0 / steps)
        quad[0] = quad[-1] = 0.5 / steps
        out: list[AttributionMap] = []
        for g0 in range(0, len(pairs), self.pair_group):
            group = pairs[g0 : g0 + self.pair_group]
            trap, probs = self._weighted_sum(base, diff, group, alphas, quad)
            f_end = probs[:, [0, -1]]  # p_c(baseline), p_c(x)
            used = np.full(len(group), steps)
            rel = np.array([self._errors(trap[j], diff[c], f_end[j])[1] for j, (c, _) in enumerate(group)])
            current = steps
            while tolerance is not None and current * 2 <= max_steps:
                todo = [j for j in np.argsort(-rel) if rel[j] > tolerance and used[j] == current]
                if max_evaluations is not None:  # the worst pairs first, as many as the budget still pays for
                    todo = todo[: max(0, (max_evaluations - self.spent) // current)]
                if not todo:
                    break
                # T_2n = T_n / 2 + (1 / 2n) * sum of the gradients at the n midpoints: the n + 1 points already
                # evaluated are reused, a refinement costs n evaluations per pair
                mids = (np.arange(current, dtype=np.float64) + 0.5) / current
                sub = [group[j] for j in todo]
                mid_sum, _ = self._weighted_sum(base, diff, sub, mids, np.full(current, 0.5 / current))
                for r, j in enumerate(todo):
                    trap[j] = 0.5 * trap[j] + mid_sum[r]
                    used[j] = 2 * current
                    rel[j] = self._errors(trap[j], diff[group[j][0]], f_end[j])[1]
                current *= 2
            for j, (cell, cls) in enumerate(group):
                attr = trap[j] * diff[cell]
                err, err_rel = self._errors(trap[j], diff[cell], f_end[j])
                out.append(
                    AttributionMap(
                        cell_index=cell,
                        class_id=cls,
                        attribution=attr.sum(axis=2).astype(np.float32),
                        channel_totals=attr.sum(axis=(0, 1)),
                        f_input=float(f_end[j, 1]),
                        f_baseline=float(f_end[j, 0]),
                        completeness_abs=err,
                        completeness_rel=err_rel,
                        steps=int(used[j]),
                        baseline=base_name,
                    )
                )
            del trap
        return out

    @staticmethod
    def _errors(trap: np.ndarray, diff: np.ndarray, f_end: np.ndarray) -> tuple[float, float]:
        """Absolute and relative completeness error of one pair's quadrature ``trap`` (S, S, 4)."""
        delta = float(f_end[1] - f_end[0])
        err = abs(float((trap * diff).sum()) - delta)
        return err, err / max(abs(delta), COMPLETENESS_EPS)

    def _weighted_sum(
        self,
        base: np.ndarray,
        diff: np.ndarray,
        group: list[tuple[int, int]],
        alphas: np.ndarray,
        weights: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``sum_k weights[k] * grad p_c(base + alphas[k] * diff)`` per pair, and ``p_c`` at every alpha.

        Returns
        -------
        sums : numpy.ndarray
            (len(group), S, S, 4) ``float64``.
        probs : numpy.ndarray
            (len(group), len(alphas)) ``float64``: the pair's class probability at each point.
        """
        bsz, size = self.batch_size, self.size
        per_pair = len(alphas)
        image_buf = np.zeros((bsz, size, size, 4), np.float32)
        weight_buf = np.zeros((bsz, NUM_CLASSES), np.float32)
        acc = np.zeros((len(group), size, size, 4), np.float64)
        probs_at = np.zeros((len(group), per_pair), np.float64)
        total = len(group) * per_pair
        for r0 in range(0, total, bsz):
            if self.stop is not None and self.stop():
                raise Cancelled("integrated gradients stopped: the request ran past its time limit")
            rows = np.arange(r0, min(r0 + bsz, total))
            j_idx, k_idx = np.divmod(rows, per_pair)
            weight_buf[:] = 0.0
            for r, (j, k) in enumerate(zip(j_idx, k_idx, strict=True)):
                cell, cls = group[j]
                image_buf[r] = base[cell] + np.float32(alphas[k]) * diff[cell]
                weight_buf[r, cls] = 1.0
            if len(rows) < bsz:  # pad the last batch; padded rows have zero weight
                image_buf[len(rows) :] = 0.0
            grads, probs = self.session.run(
                self.output_names, {self.input_names[0]: image_buf, self.input_names[1]: weight_buf}
            )
            for r, (j, k) in enumerate(zip(j_idx, k_idx, strict=True)):
                acc[j] += weights[k] * grads[r]
                probs_at[j, k] = probs[r, group[j][1]]
        self.spent += total
        return acc, probs_at


def encode_map(arr: np.ndarray) -> dict[str, Any]:
    """Encode a signed 2-D map as a base64 16-bit PNG (``"png16-signed"``).

    ``pixel = round(value / scale) + 32768`` with ``scale = max|value| / 32767`` (1.0 for an
    all-zero map), so the quantisation error is at most ``scale / 2``.

    Decode in two lines (see also :func:`decode_map`)::

        img = cv2.imdecode(np.frombuffer(base64.b64decode(d["data"]), np.uint8), cv2.IMREAD_UNCHANGED)
        arr = (img.astype(np.float32) - 32768.0) * d["scale"]

    Parameters
    ----------
    arr : numpy.ndarray
        (h, w) finite real map.

    Returns
    -------
    dict
        ``{"encoding": "png16-signed", "shape": [h, w], "scale": s, "data": "<base64 PNG>"}``.

    Raises
    ------
    ValueError
        Not 2-D, empty, or not finite.
    """
    a = np.asarray(arr, np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"expected a non-empty 2-D map, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("the map has NaN or infinite values")
    peak = float(np.max(np.abs(a)))
    scale = peak / 32767.0 if peak > 0 else 1.0
    pix = np.clip(np.rint(a / scale) + 32768.0, 0, 65535).astype(np.uint16)
    ok, buf = cv2.imencode(".png", pix)
    if not ok:  # pragma: no cover
        raise RuntimeError("PNG encoding failed")
    return {
        "encoding": ENCODING,
        "shape": [int(a.shape[0]), int(a.shape[1])],
        "scale": scale,
        "data": base64.b64encode(buf.tobytes()).decode("ascii"),
    }


def decode_map(d: dict[str, Any]) -> np.ndarray:
    """Decode :func:`encode_map` output.

    Parameters
    ----------
    d : dict
        ``{"encoding": "png16-signed", "shape": [h, w], "scale": s, "data": ...}``.

    Returns
    -------
    numpy.ndarray
        (h, w) ``float32``.

    Raises
    ------
    ValueError
        Unknown encoding, undecodable data, or a shape that does not match.
    """
    if d.get("encoding") != ENCODING:
        raise ValueError(f"unknown map encoding {d.get('encoding')!r}; expected {ENCODING!r}")
    img = cv2.imdecode(np.frombuffer(base64.b64decode(d["data"]), np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.dtype != np.uint16 or list(img.shape) != list(d["shape"]):
        raise ValueError("the map data is not a 16-bit PNG of the declared shape")
    return (img.astype(np.float32) - 32768.0) * np.float32(d["scale"])


def map_to_box(
    attr: np.ndarray,
    box: tuple[int, int, int, int],
    rule: CropRule,
    *,
    conserve_sum: bool = False,
) -> np.ndarray:
    """Bring a crop-space map back onto the cell's bounding box in image coordinates.

    The crop is the square window :func:`locus.service.crop.square_window` cuts around ``box``,
    resized to S x S; this resizes the map to the window's side (linear) and cuts the box out.

    Parameters
    ----------
    attr : numpy.ndarray
        (S, S) map in crop coordinates.
    box : tuple of int
        The cell's bounding box (row0, col0, row1, col1), end-exclusive, image coordinates.
    rule : CropRule
        The crop rule the crop was made with.
    conserve_sum : bool
        Scale values by ``(S / side) ** 2`` so the map sums to (about) the same total over
        the whole window (attribution per image pixel instead of per crop pixel).

    Returns
    -------
    numpy.ndarray
        (row1 - row0, col1 - col0) ``float32``; pixel (i, j) lies at image (row0 + i, col0 + j).
    """
    attr = np.asarray(attr, np.float32)
    if attr.ndim != 2 or attr.shape[0] != attr.shape[1]:
        raise ValueError(f"expected a square (S, S) map, got {attr.shape}")
    r0, c0, r1, c1 = (int(v) for v in box)
    wr0, wc0, wr1, _ = square_window((r0, c0, r1, c1), rule)
    side = wr1 - wr0
    s = attr.shape[0]
    if side > MAX_WINDOW_SIDE:
        # Only the box, never the whole (huge) window: the same linear map, sampled where the box lies.
        f = s / side
        m = np.array([[f, 0.0, (c0 - wc0 + 0.5) * f - 0.5], [0.0, f, (r0 - wr0 + 0.5) * f - 0.5]], dtype=np.float64)
        out = cv2.warpAffine(
            attr, m, (c1 - c0, r1 - r0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
        )
        return np.ascontiguousarray(out * np.float32(f * f) if conserve_sum else out, dtype=np.float32)
    if side != s:
        interp = cv2.INTER_AREA if side < s else cv2.INTER_LINEAR
        win = cv2.resize(attr, (side, side), interpolation=interp)
    else:
        win = attr
    if conserve_sum:
        win = win * np.float32((s / side) ** 2)
    return np.ascontiguousarray(win[r0 - wr0 : r1 - wr0, c0 - wc0 : c1 - wc0], dtype=np.float32)
