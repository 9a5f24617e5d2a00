"""Tests for :mod:`locus.service.overlay`: rendering, PNG output and the ``locus overlay`` subcommand."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from locus.service.classes import CHANNELS, NUM_CLASSES
from locus.service.crop import cell_boxes
from locus.service.manifest import sha256_file
from locus.service.overlay import composite, configure_parser, render_overlay, run, save_png


def _field(h: int = 600, w: int = 800, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic uint8 field with six round cells and their label image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = rng.integers(0, 12, (h, w, 4)).astype(np.float32)
    labels = np.zeros((h, w), np.int32)
    centres = [(150, 150), (150, 400), (150, 650), (430, 150), (430, 400), (430, 650)]
    for k, (cy, cx) in enumerate(centres, start=1):
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        cell = d2 < 100**2
        labels[cell] = k
        image[..., 0] += 120 * cell
        image[..., 3] += 90 * cell * np.exp(-d2 / 8000)
        image[..., 2] += 200 * (d2 < 40**2)
        image[..., 1] += 160 * cell * (rng.uniform() > 0.5) * np.exp(-d2 / 3000)
    return np.clip(image, 0, 255).astype(np.uint8), labels


def test_composite_colours():
    img = np.zeros((2, 2, 4), np.uint8)
    img[0, 0, 0] = 255  # red
    img[0, 1, 3] = 255  # yellow -> red + green
    img[1, 0, 2] = 255  # blue
    rgb = composite(img, percentile=100, min_range=1)
    np.testing.assert_allclose(rgb[0, 0], [1, 0, 0])
    np.testing.assert_allclose(rgb[0, 1], [1, 1, 0])
    np.testing.assert_allclose(rgb[1, 0], [0, 0, 1])


@pytest.mark.parametrize(("max_side", "expected"), [(1024, (600, 800)), (400, (300, 400))])
def test_render_overlay_shape_labels_heatmap(max_side, expected):
    image, labels = _field()
    boxes = cell_boxes(labels)
    box = boxes[2]
    rows, cols = np.mgrid[box[0] : box[2], box[1] : box[3]]
    amap = np.sin(rows / 15.0) * np.cos(cols / 20.0)  # signed
    cells = [{"id": 1, "labels": ["Nucleoplasm", "Cytosol"]}, {"id": 2, "labels": [6]}, {"id": 3, "labels": []}]
    plain = render_overlay(image, labels, cells, None, max_side=max_side)
    heat = render_overlay(image, labels, cells, {2: (box, amap)}, max_side=max_side)
    assert plain.shape == (*expected, 3) and plain.dtype == np.uint8
    assert heat.shape == plain.shape
    f = expected[0] / 600
    # the heatmap changes only cell 2's box
    changed = np.any(heat != plain, axis=2)
    r, c = np.nonzero(changed)
    assert changed.any()
    assert r.min() >= int(box[0] * f) - 1 and r.max() <= int(np.ceil(box[2] * f)) + 1
    assert c.min() >= int(box[1] * f) - 1 and c.max() <= int(np.ceil(box[3] * f)) + 1
    # outlines are drawn in white
    assert np.any(np.all(plain == 255, axis=2))
    # text: cell 1 gets its names drawn (label colour present near its box), cell 3 none
    no_text = render_overlay(image, labels, [], None, max_side=max_side)
    diff = np.any(plain != no_text, axis=2)
    b1, b3 = boxes[1], boxes[3]
    assert diff[int(b1[0] * f) : int(b1[2] * f), int(b1[1] * f) : int(b1[3] * f)].any()
    assert not diff[int(b3[0] * f) : int(b3[2] * f), int(b3[1] * f) : int(b3[3] * f)].any()


def test_render_overlay_rejects_bad_map():
    image, labels = _field()
    box = cell_boxes(labels)[1]
    with pytest.raises(ValueError, match="box"):
        render_overlay(image, labels, [], {1: (box, np.zeros((3, 3)))})


def test_save_png_roundtrip(tmp_path):
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[..., 0] = 200
    path = save_png(rgb, tmp_path / "sub" / "o.png")
    back = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, rgb)
    with pytest.raises(ValueError):
        save_png(rgb[..., 0], tmp_path / "x.png")


# --------------------------------------------------------------------------------------------------------------------
# `locus overlay` end to end on a linear test model folder, with a hand-written grad.onnx for it.
# --------------------------------------------------------------------------------------------------------------------


def _write_linear_grad(folder: Path, size: int, batch: int) -> None:
    """grad.onnx for p = sigmoid(mean_hw(x) @ W + b): d sum(p * w) / dx = ((w * p * (1 - p)) @ W.T) / S^2."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(folder / "model.onnx")).graph.initializer}
    W, b = inits["W"], inits["B"]
    consts = [
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
        numpy_helper.from_array(W, "W"),
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(np.ascontiguousarray(W.T) / np.float32(size * size), "WTs"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array([batch, 1, 1, 4], np.int64), "s1"),
        numpy_helper.from_array(np.array([batch, size, size, 4], np.int64), "s2"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["m"], keepdims=0),
        helper.make_node("MatMul", ["m", "W"], ["z0"]),
        helper.make_node("Add", ["z0", "B"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["probabilities"]),
        helper.make_node("Sub", ["one", "probabilities"], ["q"]),
        helper.make_node("Mul", ["probabilities", "q"], ["dp"]),
        helper.make_node("Mul", ["dp", "weights"], ["dz"]),
        helper.make_node("MatMul", ["dz", "WTs"], ["gm"]),
        helper.make_node("Reshape", ["gm", "s1"], ["g1"]),
        helper.make_node("Expand", ["g1", "s2"], ["gradients"]),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "linear_grad",
        [
            helper.make_tensor_value_info("image", f, [batch, size, size, 4]),
            helper.make_tensor_value_info("weights", f, [batch, NUM_CLASSES]),
        ],
        [
            helper.make_tensor_value_info("gradients", f, [batch, size, size, 4]),
            helper.make_tensor_value_info("probabilities", f, [batch, NUM_CLASSES]),
        ],
        initializer=consts,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(folder / "grad.onnx"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["grad.onnx"] = sha256_file(folder / "grad.onnx")
    manifest["grad"] = {
        "file": "grad.onnx",
        "batch": batch,
        "inputs": ["image", "weights"],
        "outputs": ["gradients", "probabilities"],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def model_with_grad(tmp_path_factory):
    from tests.modelfolder import write_model_folder

    folder = write_model_folder(tmp_path_factory.mktemp("m") / "lin", input_size=32, thresholds=0.3)
    _write_linear_grad(folder, 32, 8)
    return folder


@pytest.fixture(scope="module")
def field_dir(tmp_path_factory):
    image, _ = _field()
    d = tmp_path_factory.mktemp("field")
    for k, c in enumerate(CHANNELS):
        cv2.imwrite(str(d / f"F1_{c}.png"), image[..., k])
    return d


def _args(argv):
    p = argparse.ArgumentParser()
    configure_parser(p)
    return p.parse_args(argv)


def test_cli_overlay_with_attributions(model_with_grad, field_dir, tmp_path, capsys):
    out = tmp_path / "o.png"
    argv = [
        "--field",
        str(field_dir),
        "F1",
        "--model",
        str(model_with_grad),
        "--out",
        str(out),
        "--attributions",
        "--steps",
        "16",
        "--max-side",
        "400",
    ]
    assert run(_args(argv)) == 0
    printed = capsys.readouterr().out
    assert "attributions:" in printed
    img = cv2.imread(str(out))
    assert img is not None and img.shape == (300, 400, 3)


def test_cli_overlay_channel_files(model_with_grad, field_dir, tmp_path):
    out = tmp_path / "plain.png"
    argv = [f"--{c}={field_dir / f'F1_{c}.png'}" for c in CHANNELS] + [
        "--model",
        str(model_with_grad),
        "--out",
        str(out),
    ]
    assert run(_args(argv)) == 0
    assert cv2.imread(str(out)).shape == (600, 800, 3)


def test_cli_overlay_errors(model_with_grad, field_dir, tmp_path, capsys):
    assert run(_args(["--field", str(field_dir), "NOPE", "--model", str(model_with_grad)])) == 2
    assert run(_args(["--red", "x.png", "--model", str(model_with_grad)])) == 2
    from tests.modelfolder import write_model_folder

    no_grad = write_model_folder(tmp_path / "nograd", input_size=32)
    argv = ["--field", str(field_dir), "F1", "--model", str(no_grad), "--attributions"]
    assert run(_args(argv)) == 2
    assert "grad.onnx" in capsys.readouterr().err


def test_locus_cli_dispatches_overlay(model_with_grad, field_dir, tmp_path):
    from locus.cli import main

    out = tmp_path / "cli.png"
    assert main(["overlay", "--field", str(field_dir), "F1", "--model", str(model_with_grad), "--out", str(out)]) == 0
    assert out.is_file()
