"""Build small but real model folders for tests: ONNX graphs written with ``onnx.helper``.

The classifier is a real ONNX model with the contract of ``model.onnx``
(input ``image`` [N, S, S, 4] float32 0-255, output ``probabilities`` [N, 19]):
per-channel means of the crop feed a linear layer and a sigmoid. It runs in
ONNX Runtime like the exported EfficientNet, fast enough for every service test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from locus.service.classes import CHANNELS, CLASS_NAMES
from locus.service.crop import CropRule
from locus.service.manifest import sha256_file

__all__ = ["build_linear_onnx", "write_model_folder"]


def build_linear_onnx(path: Path, input_size: int, weights: np.ndarray, bias: np.ndarray) -> None:
    """Write p = sigmoid(mean_hw(x) @ W + b) as ONNX.

    Parameters
    ----------
    path : Path
        Output file.
    input_size : int
        S of [N, S, S, 4].
    weights : numpy.ndarray
        (4, 19) float32.
    bias : numpy.ndarray
        (19,) float32.
    """
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", input_size, input_size, 4])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 19])
    axes = numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes")
    w = numpy_helper.from_array(weights.astype(np.float32), "W")
    b = numpy_helper.from_array(bias.astype(np.float32), "B")
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["m"], keepdims=0),
        helper.make_node("MatMul", ["m", "W"], ["z0"]),
        helper.make_node("Add", ["z0", "B"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["probabilities"]),
    ]
    graph = helper.make_graph(nodes, "linear", [x], [y], initializer=[axes, w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_model_folder(folder: Path, input_size: int = 32, seed: int = 0, thresholds: float = 0.5) -> Path:
    """Write a complete, valid model folder (model.onnx, manifest.json, MODEL_CARD.md).

    Parameters
    ----------
    folder : Path
        Created if needed.
    input_size : int
        Model input side.
    seed : int
        Seed of the random linear weights.
    thresholds : float
        Every class's decision threshold.

    Returns
    -------
    Path
        The folder.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 0.05, size=(4, 19)).astype(np.float32)
    bias = rng.normal(0, 1.0, size=19).astype(np.float32)
    build_linear_onnx(folder / "model.onnx", input_size, weights, bias)
    rule = CropRule(size=input_size)
    manifest = {
        "name": "test-linear",
        "version": "0.0.1",
        "architecture": "linear-test",
        "input_size": input_size,
        "channels": list(CHANNELS),
        "crop": rule.to_dict(),
        "class_names": list(CLASS_NAMES),
        "thresholds": [thresholds] * 19,
        "files": {"model.onnx": sha256_file(folder / "model.onnx")},
        "training": {"note": "test model, random weights"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (folder / "MODEL_CARD.md").write_text("# test-linear\n\nRandom weights, for tests only.\n")
    return folder
