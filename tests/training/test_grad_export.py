"""Tests for :mod:`locus.training.grad_export`: ``grad.onnx`` with the custom tf2onnx handlers."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

import keras  # noqa: E402

from locus.service.classes import NUM_CLASSES  # noqa: E402
from locus.service.manifest import GradSpec  # noqa: E402
from locus.training import grad_export  # noqa: E402
from locus.training.grad_export import GradExportError, export_grad_model  # noqa: E402

pytestmark = [pytest.mark.train, pytest.mark.slow]


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _counting_handlers(monkeypatch) -> dict[str, int]:
    counts = dict.fromkeys(grad_export.CUSTOM_OP_HANDLERS, 0)
    for op, (fn, args) in list(grad_export.CUSTOM_OP_HANDLERS.items()):

        def wrapped(ctx, node, name, a, _fn=fn, _op=op):
            counts[_op] += 1
            return _fn(ctx, node, name, a)

        monkeypatch.setitem(grad_export.CUSTOM_OP_HANDLERS, op, (wrapped, args))
    return counts


def _small_model(size: int) -> keras.Model:
    """Depthwise convolutions with SAME (asymmetric at stride 2), VALID and multiplier 2, sigmoid, Normalization."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((size, size, 4))
    x = keras.layers.Rescaling(1.0 / 255.0)(inp)
    x = keras.layers.Normalization(mean=[0.4, 0.5, 0.3, 0.45], variance=[0.05, 0.08, 0.04, 0.06])(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)  # 16 -> 8, pads (0, 1)
    x = keras.layers.Activation("sigmoid")(x)
    x = keras.layers.DepthwiseConv2D(5, padding="same", depth_multiplier=2)(x)
    x = keras.layers.Conv2D(12, 1, activation="swish")(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="valid")(x)  # 8 -> 3
    x = keras.layers.DepthwiseConv2D(4, strides=2, padding="same")(x)  # 3 -> 2, pads (1, 2)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(NUM_CLASSES, activation="sigmoid")(x)
    return keras.Model(inp, out)


def test_small_model_parity_and_manifest_entry(tmp_path, monkeypatch):
    counts = _counting_handlers(monkeypatch)
    model = _small_model(16)
    entry = export_grad_model(model, tmp_path, batch=4)
    assert (tmp_path / "grad.onnx").is_file()
    parity = entry.pop("parity")
    print("small model parity:", parity)
    assert entry == {
        "file": "grad.onnx",
        "batch": 4,
        "inputs": ["image", "weights"],
        "outputs": ["gradients", "probabilities"],
    }
    GradSpec.model_validate(entry)
    assert parity["correlation"] >= 0.999 and parity["rel_error"] < 1e-3
    assert counts["SigmoidGrad"] > 0 and counts["DepthwiseConv2dNativeBackpropInput"] >= 4

    sess = _session(tmp_path / "grad.onnx")
    assert [i.name for i in sess.get_inputs()] == ["image", "weights"]  # Normalization folded, no captures
    assert [o.name for o in sess.get_outputs()] == ["gradients", "probabilities"]
    assert sess.get_inputs()[0].shape == [4, 16, 16, 4]

    # one-hot weights: the gradient of a single class probability, against tf.GradientTape
    import tensorflow as tf

    x = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 4)).astype(np.float32)
    w = np.zeros((4, NUM_CLASSES), np.float32)
    w[np.arange(4), [0, 5, 11, 18]] = 1.0
    g, p = sess.run(None, {"image": x, "weights": w})
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        obj = tf.reduce_sum(model(xt, training=False) * w)
    ref = tape.gradient(obj, xt).numpy()
    np.testing.assert_allclose(p, model(x).numpy(), atol=1e-5)
    assert np.abs(g - ref).max() <= 1e-3 * np.abs(ref).max()


def test_efficientnet_b0_exercises_all_handlers(tmp_path, monkeypatch):
    counts = _counting_handlers(monkeypatch)
    model = keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=(32, 32, 4))
    out = keras.layers.Dense(NUM_CLASSES, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(model.output))
    model = keras.Model(model.input, out)
    real = np.random.default_rng(2).uniform(0, 255, (3, 32, 32, 4)).astype(np.float32)
    entry = export_grad_model(model, tmp_path / "grad.onnx", batch=4, parity_images=real)
    print("EfficientNet-B0 parity:", entry["parity"], "handler calls:", counts)
    assert all(v > 0 for v in counts.values()), counts
    assert entry["parity"]["correlation"] >= 0.999
    assert entry["parity"]["prob_max_abs_diff"] < 1e-5


def test_rejects_non_square_input(tmp_path):
    inp = keras.Input((16, 12, 4))
    out = keras.layers.Dense(NUM_CLASSES, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(inp))
    with pytest.raises(GradExportError, match="input"):
        export_grad_model(keras.Model(inp, out), tmp_path / "grad.onnx")


def test_same_pads():
    # TF SAME: total = max((out - 1) * s + k - in, 0), begin = total // 2
    assert grad_export._same_pads(16, 8, 3, 2, 1, "SAME") == (0, 1)
    assert grad_export._same_pads(15, 8, 3, 2, 1, "SAME") == (1, 1)
    assert grad_export._same_pads(8, 8, 5, 1, 1, "SAME") == (2, 2)
    assert grad_export._same_pads(8, 3, 3, 2, 1, "VALID") == (0, 0)
    with pytest.raises(GradExportError):
        grad_export._same_pads(8, 8, 3, 1, 1, "EXPLICIT")
