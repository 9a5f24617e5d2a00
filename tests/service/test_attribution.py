"""Tests for :mod:`locus.service.attribution` (integrated gradients through ``grad.onnx``).

The TensorFlow-free tests use a hand-built ONNX gradient model (linear logits + sigmoid,
analytic gradient) whose integrated gradients have a closed form. The ``train`` tests export
a real EfficientNet-B0 (32 px) with :mod:`locus.training.grad_export` and compare against a
``tf.GradientTape`` reference.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from locus.service.attribution import (
    DEFAULT_STEPS,
    ENCODING,
    decode_map,
    encode_map,
    integrated_gradients,
    make_baseline,
    map_to_box,
)
from locus.service.classes import NUM_CLASSES
from locus.service.crop import CropRule, square_window

HAS_TF = importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("tf2onnx") is not None


def _session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------------------------------
# A linear-sigmoid gradient model in plain ONNX: p = sigmoid(flat(x) @ W / 255), grad = ((w * p * (1 - p)) @ W.T) / 255
# --------------------------------------------------------------------------------------------------------------------


def _linear_grad_model(path, batch: int, size: int, seed: int = 0) -> np.ndarray:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    d = size * size * 4
    W = (np.random.default_rng(seed).normal(0, 1, (d, NUM_CLASSES)) / np.sqrt(d) * 8).astype(np.float32)
    inits = [
        numpy_helper.from_array(W / 255.0, "W"),
        numpy_helper.from_array(np.ascontiguousarray(W.T / 255.0), "WT"),
        numpy_helper.from_array(np.array([batch, d], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([batch, size, size, 4], np.int64), "img_shape"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Reshape", ["image", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["probabilities"]),
        helper.make_node("Sub", ["one", "probabilities"], ["q"]),
        helper.make_node("Mul", ["probabilities", "q"], ["dp"]),
        helper.make_node("Mul", ["dp", "weights"], ["dz"]),
        helper.make_node("MatMul", ["dz", "WT"], ["gflat"]),
        helper.make_node("Reshape", ["gflat", "img_shape"], ["gradients"]),
    ]
    graph = helper.make_graph(
        nodes,
        "linear_grad",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, size, size, 4]),
            helper.make_tensor_value_info("weights", TensorProto.FLOAT, [batch, NUM_CLASSES]),
        ],
        [
            helper.make_tensor_value_info("gradients", TensorProto.FLOAT, [batch, size, size, 4]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, NUM_CLASSES]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return W


def _linear_exact_ig(W: np.ndarray, x: np.ndarray, b: np.ndarray, c: int) -> np.ndarray:
    """Closed form IG of sigmoid(flat(x) @ W / 255)[c]: (x - b) * W_c / 255 * (s(z1) - s(z0)) / (z1 - z0)."""
    wc = W[:, c].astype(np.float64) / 255.0
    z0, z1 = b.ravel().astype(np.float64) @ wc, x.ravel().astype(np.float64) @ wc
    s0, s1 = 1 / (1 + np.exp(-z0)), 1 / (1 + np.exp(-z1))
    factor = (s1 - s0) / (z1 - z0)
    return ((x - b).astype(np.float64) * (wc.reshape(x.shape) * factor)).sum(axis=2)


def _cells(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.zeros((n, size, size, 4), np.float32)
    for i in range(n):
        cy, cx, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.15, 0.3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        for ch in range(4):
            out[i, :, :, ch] = 255 * blob * rng.uniform(0.3, 1.0) + rng.normal(0, 6, (size, size))
    return np.clip(out, 0, 255)


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    path = tmp_path_factory.mktemp("linear") / "grad.onnx"
    W = _linear_grad_model(path, batch=8, size=16)
    return _session(path), W


@pytest.mark.parametrize("baseline", ["black", "blur"])
def test_linear_model_matches_closed_form(linear, baseline):
    sess, W = linear
    x = _cells(5, 16, seed=3)
    targets = [[0], [1, 5], [], [18], [2, 3, 4]]  # 8 pairs: pads the last batch, spans groups
    res = integrated_gradients(sess, 8, x, targets, steps=64, baseline=baseline, pair_group=3)
    base = make_baseline(x, baseline)
    assert [len(r) for r in res] == [len(t) for t in targets]
    for i, maps in enumerate(res):
        for m, c in zip(maps, targets[i], strict=True):
            assert m.class_id == c and m.cell_index == i and m.attribution.shape == (16, 16)
            exact = _linear_exact_ig(W, x[i], base[i], c)
            scale = np.abs(exact).max()
            assert np.abs(m.attribution - exact).max() <= 2e-3 * scale + 1e-7
            assert m.completeness_rel < 1e-2
            assert m.total == pytest.approx(m.f_input - m.f_baseline, abs=1e-4)


def test_tolerance_refines_steps(linear):
    sess, _ = linear
    x = _cells(3, 16, seed=8)
    coarse = integrated_gradients(sess, 8, x, [[0], [1], [2]], steps=1)
    fine = integrated_gradients(sess, 8, x, [[0], [1], [2]], steps=1, tolerance=1e-3, max_steps=256)
    for c, f in zip(coarse, fine, strict=True):
        assert c[0].steps == 1
        assert f[0].completeness_rel <= max(1e-3, c[0].completeness_rel)
        assert f[0].steps == 1 or c[0].completeness_rel > 1e-3
        assert f[0].completeness_rel <= 1e-3 or f[0].steps == 256


def test_refined_maps_equal_a_fresh_run_at_their_steps(linear):
    """Refinement reuses the evaluated points (midpoints only) and gives the trapezoid sum of a fresh run."""
    sess, _ = linear
    x = _cells(4, 16, seed=11)
    targets = [[0, 7], [1], [2, 18], [3]]
    refined = integrated_gradients(sess, 8, x, targets, steps=2, tolerance=1e-4, max_steps=64, pair_group=3)
    steps_seen = {m.steps for maps in refined for m in maps}
    assert max(steps_seen) > 2, "no pair was refined: the test needs a coarse start"
    for i, maps in enumerate(refined):
        for m in maps:
            fresh = integrated_gradients(sess, 8, x[i : i + 1], [[m.class_id]], steps=m.steps)[0][0]
            np.testing.assert_allclose(m.attribution, fresh.attribution, rtol=1e-5, atol=1e-9)
            assert m.completeness_rel == pytest.approx(fresh.completeness_rel, rel=1e-4, abs=1e-9)
            assert m.completeness_rel <= 1e-4 or m.steps == 64


def test_refinement_stays_within_the_evaluation_budget(linear):
    """With a budget, the first pass is paid in full and refinement takes the worst pairs first while it fits."""

    class Counting:
        def __init__(self, inner):
            self.inner, self.rows = inner, 0

        def run(self, names, feeds):
            self.rows += int((feeds["weights"].sum(axis=1) > 0).sum())
            return self.inner.run(names, feeds)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    sess, _ = linear
    x = _cells(6, 16, seed=12)
    targets = [[c] for c in range(6)]
    budget = 6 * 3 + 2 * 2  # the first pass at 2 steps (3 evaluations per pair) and two refinements to 4 steps
    counting = Counting(sess)
    res = integrated_gradients(counting, 8, x, targets, steps=2, tolerance=1e-6, max_steps=64, max_evaluations=budget)
    assert counting.rows <= budget
    coarse = integrated_gradients(sess, 8, x, targets, steps=2)
    refined = [j for j, maps in enumerate(res) if maps[0].steps > 2]
    assert len(refined) == 2 and all(res[j][0].steps == 4 for j in refined)
    worst_two = sorted(range(6), key=lambda j: -coarse[j][0].completeness_rel)[:2]
    assert sorted(refined) == sorted(worst_two)


def test_argument_checks(linear):
    sess, _ = linear
    x = _cells(2, 16)
    with pytest.raises(ValueError, match="steps"):
        integrated_gradients(sess, 8, x, [[0], [1]], steps=0)
    with pytest.raises(ValueError, match="steps"):
        integrated_gradients(sess, 8, x, [[0], [1]], steps=10_000)
    with pytest.raises(ValueError, match="target"):
        integrated_gradients(sess, 8, x, [[0]])
    with pytest.raises(ValueError, match="class id"):
        integrated_gradients(sess, 8, x, [[0], [19]])
    with pytest.raises(ValueError, match="fixed batch"):
        integrated_gradients(sess, 4, x, [[0], [1]])
    with pytest.raises(ValueError, match="baseline"):
        integrated_gradients(sess, 8, x, [[0], [1]], baseline="white")


def test_encode_decode_roundtrip():
    rng = np.random.default_rng(0)
    arr = (rng.normal(0, 1e-4, (37, 53))).astype(np.float32)
    arr[3, 4] = -5e-4
    d = encode_map(arr)
    assert d["encoding"] == ENCODING and d["shape"] == [37, 53]
    assert set(d) == {"encoding", "shape", "scale", "data"}
    back = decode_map(d)
    assert back.shape == arr.shape and back.dtype == np.float32
    assert np.abs(back - arr).max() <= d["scale"] / 2 + 1e-12
    # the documented two-line client decode
    import base64

    import cv2

    img = cv2.imdecode(np.frombuffer(base64.b64decode(d["data"]), np.uint8), cv2.IMREAD_UNCHANGED)
    client = (img.astype(np.float32) - 32768.0) * d["scale"]
    np.testing.assert_array_equal(client, back)
    zero = decode_map(encode_map(np.zeros((4, 4))))
    assert np.all(zero == 0)
    with pytest.raises(ValueError):
        encode_map(np.full((2, 2), np.nan))
    with pytest.raises(ValueError):
        decode_map({**d, "encoding": "f16"})


@pytest.mark.parametrize("box", [(10, 20, 50, 45), (0, 0, 7, 30), (100, 3, 161, 64)])
def test_map_to_box(box):
    rule = CropRule(size=32, padding=0.1)
    attr = np.random.default_rng(1).normal(size=(32, 32)).astype(np.float32)
    out = map_to_box(attr, box, rule)
    assert out.shape == (box[2] - box[0], box[3] - box[1])
    assert out.dtype == np.float32
    # a constant map stays constant; conserve_sum rescales by (S / side)^2
    side = square_window(box, rule)[2] - square_window(box, rule)[0]
    ones = map_to_box(np.ones((32, 32), np.float32), box, rule, conserve_sum=True)
    np.testing.assert_allclose(ones, (32 / side) ** 2, rtol=1e-5)


def test_map_to_box_places_values():
    rule = CropRule(size=20, padding=0.0, min_side=1)
    box = (5, 5, 25, 25)  # window == box, side 20 == S: the map is returned as is
    attr = np.arange(400, dtype=np.float32).reshape(20, 20)
    np.testing.assert_array_equal(map_to_box(attr, box, rule), attr)


def test_attribution_does_not_import_tensorflow():
    code = "import sys, locus.service.attribution; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------------------------------
# Real EfficientNet-B0 through locus.training.grad_export vs a tf.GradientTape reference.
# --------------------------------------------------------------------------------------------------------------------

SIZE = 32
BATCH = 8


def _conditioned_effnet(size: int, seed: int = 0):
    """EfficientNet-B0 (random weights) + GAP + Dense(19, sigmoid) whose outputs depend on the input.

    Random-init EfficientNet outputs are constant to 1e-7. The BatchNorm statistics are set from a batch of
    cell-like crops (variance floored at 0.1 to keep the network well conditioned) and the head is scaled, so
    probabilities spread over ~0.1-0.9 and gradients are smooth, like a trained model's.
    """
    import keras

    keras.utils.set_random_seed(seed)
    base = keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=(size, size, 4))
    feats = keras.layers.GlobalAveragePooling2D()(base.output)
    model = keras.Model(base.input, keras.layers.Dense(NUM_CLASSES, activation="sigmoid")(feats))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    model(_cells(16, size, seed=11), training=True)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_variance.assign(np.maximum(layer.moving_variance.numpy(), 0.1))
    head = model.layers[-1]
    head.kernel.assign(head.kernel.numpy() * 40.0)
    return model


@pytest.fixture(scope="module")
def effnet(tmp_path_factory):
    if not HAS_TF:
        pytest.skip("tensorflow / tf2onnx not installed")
    from locus.training.grad_export import export_grad_model

    model = _conditioned_effnet(SIZE)
    path = tmp_path_factory.mktemp("effnet") / "grad.onnx"
    entry = export_grad_model(model, path, batch=BATCH)
    return model, _session(path), entry


def _tf_ig(model, x: np.ndarray, b: np.ndarray, c: int, steps: int) -> np.ndarray:
    import tensorflow as tf

    alphas = np.linspace(0, 1, steps + 1).astype(np.float32)
    pts = tf.constant(b[None] + alphas[:, None, None, None] * (x - b)[None])
    with tf.GradientTape() as tape:
        tape.watch(pts)
        p = tf.reduce_sum(model(pts, training=False)[:, c])
    g = tape.gradient(p, pts).numpy().astype(np.float64)
    w = np.full(steps + 1, 1.0 / steps)
    w[0] = w[-1] = 0.5 / steps
    return ((g * w[:, None, None, None]).sum(0) * (x - b)).sum(axis=2)


@pytest.mark.train
@pytest.mark.slow
def test_effnet_matches_tensorflow_ig(effnet):
    model, sess, entry = effnet
    assert entry["batch"] == BATCH and entry["parity"]["correlation"] >= 0.999
    x = _cells(3, SIZE, seed=5)
    targets = [[0, 7], [16], [3]]
    res = integrated_gradients(sess, BATCH, x, targets)
    worst = 0.0
    for i, maps in enumerate(res):
        for m in maps:
            ref = _tf_ig(model, x[i], np.zeros_like(x[i]), m.class_id, DEFAULT_STEPS)
            corr = np.corrcoef(ref.ravel(), m.attribution.ravel())[0, 1]
            diff = float(np.abs(ref - m.attribution).max())
            worst = max(worst, diff / np.abs(ref).max())
            print(
                f"cell {i} class {m.class_id}: corr {corr:.6f} max abs diff {diff:.3g} "
                f"completeness {m.completeness_rel:.2e}"
            )
            assert corr >= 0.99
    assert worst < 0.05


@pytest.mark.train
@pytest.mark.slow
def test_effnet_completeness_at_default_steps(effnet):
    _, sess, _ = effnet
    x = _cells(6, SIZE, seed=21)
    res = integrated_gradients(sess, BATCH, x, [[c] for c in range(6)])
    errs = [m.completeness_rel for maps in res for m in maps]
    print("completeness (relative) at default steps:", [f"{e:.2e}" for e in errs])
    assert max(errs) < 0.05
    assert res[0][0].attribution.shape[:2] == (SIZE, SIZE) and res[0][0].steps == DEFAULT_STEPS
