"""The 4-channel EfficientNet: shapes, names, 0-255 input, and ImageNet-style init from a local file."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from locus.training.model import build_backbone, build_model, load_imagenet_stem  # noqa: E402

pytestmark = [pytest.mark.train, pytest.mark.slow]  # TensorFlow: slow to import and to build


@pytest.fixture(scope="module")
def model():
    return build_model("b0", 32)


def test_names_shapes_and_range(model):
    assert model.input_shape == (None, 32, 32, 4)
    assert model.output_shape == (None, 19)
    assert model.inputs[0].name == "image"
    assert model.layers[-1].name == "probabilities"
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 4)).astype(np.float32)
    p = np.asarray(model(x, training=False))
    assert p.shape == (3, 19)
    assert np.all((p > 0) & (p < 1))


def test_normalization_is_per_channel_identity_for_four_channels(model):
    norm = next(layer for layer in model.layers if layer.__class__.__name__ == "Normalization")
    mean, var = norm.get_weights()[:2]
    assert mean.shape == (4,) and var.shape == (4,)
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_array_equal(var, 1.0)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="b0"):
        build_model("b9", 32)


@pytest.mark.slow
def test_imagenet_init_copies_weights_and_yellow_from_blue(tmp_path, model):
    twin = build_backbone("b0", 32, 3)
    rng = np.random.default_rng(1)
    # distinct values everywhere, including the input Normalization statistics
    for layer in twin.layers:
        ws = layer.get_weights()
        if ws:
            layer.set_weights(
                [
                    rng.normal(0, 0.1, w.shape).astype(w.dtype) + (1.0 if "variance" in v.path else 0.0)
                    for w, v in zip(ws, layer.weights, strict=True)
                ]
            )
    path = tmp_path / "b0_notop.weights.h5"
    twin.save_weights(path)
    m = build_model("b0", 32)
    info = load_imagenet_stem(m, path, fold_imagenet_scale=False)
    assert info["stem"] == "stem_conv"
    stem_src = twin.get_layer("stem_conv").get_weights()[0]
    stem_dst = m.get_layer("stem_conv").get_weights()[0]
    assert stem_src.shape[2] == 3 and stem_dst.shape[2] == 4
    np.testing.assert_array_equal(stem_dst[:, :, :3], stem_src)
    np.testing.assert_array_equal(stem_dst[:, :, 3], stem_src[:, :, 2])  # yellow == blue
    # every other backbone layer equal
    names = [la.name for la in twin.layers if la.get_weights() and la.name != "stem_conv"]
    assert len(names) > 100
    for name in names:
        if twin.get_layer(name).__class__.__name__ == "Normalization":
            continue
        for a, b in zip(twin.get_layer(name).get_weights(), m.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    src_norm = next(la for la in twin.layers if la.__class__.__name__ == "Normalization").get_weights()
    dst_norm = next(la for la in m.layers if la.__class__.__name__ == "Normalization").get_weights()
    np.testing.assert_array_equal(dst_norm[0][:3], src_norm[0])
    assert dst_norm[0][3] == src_norm[0][2]


def test_imagenet_file_missing(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_imagenet_stem(model, tmp_path / "nope.h5")
