"""Export the gradient model ``grad.onnx`` used for integrated gradients at serving time.

The service runs ONNX Runtime only, so the gradient of the classifier is exported
as its own ONNX graph: a FIXED-batch model with inputs

* ``image``: ``float32`` (B, S, S, 4), R, G, B, Y, values 0-255;
* ``weights``: ``float32`` (B, 19), per-sample class weights ``w``;

and outputs

* ``gradients``: ``float32`` (B, S, S, 4) = d sum(p * w) / d image;
* ``probabilities``: ``float32`` (B, 19), the sigmoid outputs ``p``.

With one-hot ``weights`` the gradient of each sample is the gradient of one class
probability; the service (:mod:`locus.service.attribution`) interpolates and averages in numpy.

``tf.GradientTape`` inside a ``tf.function`` does not convert with tf2onnx as is:
the backward graph holds ``SigmoidGrad``, ``ShapeN`` and
``DepthwiseConv2dNativeBackpropInput``, which tf2onnx lacks. This module supplies
three small handlers for them (passed through ``custom_op_handlers``):

* ``SigmoidGrad(y, dy)`` -> ``dy * y * (1 - y)``;
* ``ShapeN(x_1..x_n)`` -> ``Cast(Shape(x_i))`` per input;
* ``DepthwiseConv2dNativeBackpropInput(sizes, filter, dy)`` -> ``ConvTranspose`` with
  ``group = C`` on NCHW tensors, the (kh, kw, C, M) filter reshaped to (C * M, 1, kh, kw),
  explicit (possibly asymmetric) pads that reproduce TF's SAME/VALID padding.

The concrete function is frozen (variables and captured tensors such as the
Normalization layer's mean and variance become constants) before conversion, so the
ONNX graph has exactly the two inputs above. A parity check against
``tf.GradientTape`` runs at export and fails loudly when the graphs disagree.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from locus.service.classes import NUM_CLASSES

__all__ = ["GradExportError", "export_grad_model", "gradient_parity", "CUSTOM_OP_HANDLERS", "GRAD_FILE"]

logger = logging.getLogger(__name__)

GRAD_FILE = "grad.onnx"
INPUT_NAMES = ("image", "weights")
OUTPUT_NAMES = ("gradients", "probabilities")


class GradExportError(RuntimeError):
    """The gradient model could not be exported, or it disagrees with TensorFlow."""


# --------------------------------------------------------------------------------------------------------------------
# Custom tf2onnx handlers (old-style API: ``handler(ctx, node, name, args)``).
# --------------------------------------------------------------------------------------------------------------------


def _np_dtype(ctx: Any, tensor: str) -> np.dtype:
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(ctx.get_dtype(tensor)))


def _sigmoid_grad(ctx: Any, node: Any, name: str, args: list) -> None:
    """``SigmoidGrad(y, dy)`` -> ``dy * (y * (1 - y))``."""
    y, dy = node.input[0], node.input[1]
    one = ctx.make_const(f"{name}__one", np.array(1.0, dtype=_np_dtype(ctx, y)))
    one_minus = ctx.make_node("Sub", [one.output[0], y], name=f"{name}__one_minus_y")
    dsig = ctx.make_node("Mul", [y, one_minus.output[0]], name=f"{name}__y_one_minus_y")
    node.type = "Mul"
    ctx.replace_inputs(node, [dy, dsig.output[0]])
    node.attr.clear()


def _shape_n(ctx: Any, node: Any, name: str, args: list) -> None:
    """``ShapeN(x_1, ..., x_n)`` -> ``Cast(Shape(x_i), out_type)`` for each input."""
    from onnx import TensorProto

    out_type = node.get_attr_value("out_type", TensorProto.INT32)
    inputs = list(node.input)
    outputs = list(node.output)
    shapes = [ctx.get_shape(o) for o in outputs]
    dtypes = [ctx.get_dtype(o) for o in outputs]
    ctx.remove_node(node.name)
    for i, (inp, out) in enumerate(zip(inputs, outputs, strict=True)):
        shape = ctx.make_node("Shape", [inp], name=f"{name}__shape_{i}")
        ctx.make_node(
            "Cast",
            [shape.output[0]],
            attr={"to": out_type},
            outputs=[out],
            shapes=[shapes[i]],
            dtypes=[dtypes[i]],
            name=f"{name}__cast_{i}",
        )


def _same_pads(in_size: int, out_size: int, kernel: int, stride: int, dilation: int, padding: str) -> tuple[int, int]:
    """Begin/end padding TF applies to the forward convolution (``in_size`` -> ``out_size``)."""
    eff_k = (kernel - 1) * dilation + 1
    if padding == "VALID":
        return 0, 0
    if padding != "SAME":
        raise GradExportError(f"unsupported padding {padding!r} in DepthwiseConv2dNativeBackpropInput")
    total = max((out_size - 1) * stride + eff_k - in_size, 0)
    return total // 2, total - total // 2


def _depthwise_backprop_input(ctx: Any, node: Any, name: str, args: list) -> None:
    """``DepthwiseConv2dNativeBackpropInput(sizes, filter, dy)`` -> NHWC -> NCHW ``ConvTranspose(group=C)`` -> NHWC."""
    _, filt, dy = node.input[0], node.input[1], node.input[2]
    out = node.output[0]
    fmt = node.get_attr_value("data_format", b"NHWC")
    fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
    if fmt != "NHWC":
        raise GradExportError(f"{name}: only NHWC depthwise convolutions are supported, got {fmt}")
    out_shape = ctx.get_shape(out)
    dy_shape = ctx.get_shape(dy)
    k_shape = ctx.get_shape(filt)
    if out_shape is None or dy_shape is None or k_shape is None or -1 in list(out_shape)[1:] + list(dy_shape)[1:]:
        raise GradExportError(f"{name}: static spatial shapes are needed (export with a fixed input size)")
    kh, kw, c, m = (int(v) for v in k_shape)
    strides = list(node.get_attr_value("strides", [1, 1, 1, 1]))
    dilations = list(node.get_attr_value("dilations", [1, 1, 1, 1]))
    padding = node.get_attr_value("padding", b"SAME")
    padding = padding.decode() if isinstance(padding, bytes) else str(padding)
    sh, sw = int(strides[1]), int(strides[2])
    dh, dw = int(dilations[1]), int(dilations[2])
    h, w = int(out_shape[1]), int(out_shape[2])
    ho, wo = int(dy_shape[1]), int(dy_shape[2])
    pads_begin, pads_end, out_pad = [], [], []
    for size, size_o, k, s, d in ((h, ho, kh, sh, dh), (w, wo, kw, sw, dw)):
        b, _ = _same_pads(size, size_o, k, s, d, padding)
        # ConvTranspose: out = s * (in - 1) + out_pad + eff_k - pad_begin - pad_end; solve for pad_end/out_pad.
        e = s * (size_o - 1) + (k - 1) * d + 1 - b - size
        pads_begin.append(b)
        pads_end.append(max(e, 0))
        out_pad.append(max(-e, 0))
    dtype = ctx.get_dtype(out)
    ctx.remove_node(node.name)

    shape_const = ctx.make_const(f"{name}__filter_shape", np.array([kh, kw, c * m, 1], dtype=np.int64))
    w_r = ctx.make_node("Reshape", [filt, shape_const.output[0]], name=f"{name}__filter_reshape")
    w_t = ctx.make_node("Transpose", [w_r.output[0]], attr={"perm": [2, 3, 0, 1]}, name=f"{name}__filter_t")
    dy_t = ctx.make_node("Transpose", [dy], attr={"perm": [0, 3, 1, 2]}, name=f"{name}__dy_nchw")
    attr = {
        "group": c,
        "kernel_shape": [kh, kw],
        "strides": [sh, sw],
        "dilations": [dh, dw],
        "pads": pads_begin + pads_end,
    }
    if any(out_pad):
        attr["output_padding"] = out_pad
    n = int(out_shape[0])
    conv = ctx.make_node(
        "ConvTranspose",
        [dy_t.output[0], w_t.output[0]],
        attr=attr,
        name=f"{name}__convtranspose",
        shapes=[[n, c, h, w]],
        dtypes=[dtype],
    )
    ctx.make_node(
        "Transpose",
        [conv.output[0]],
        attr={"perm": [0, 2, 3, 1]},
        outputs=[out],
        shapes=[list(out_shape)],
        dtypes=[dtype],
        name=f"{name}__nhwc",
    )


#: tf2onnx ``custom_op_handlers`` for the backward ops it lacks: ``{tf_op: (handler, [])}``.
CUSTOM_OP_HANDLERS: dict[str, tuple[Any, list]] = {
    "SigmoidGrad": (_sigmoid_grad, []),
    "ShapeN": (_shape_n, []),
    "DepthwiseConv2dNativeBackpropInput": (_depthwise_backprop_input, []),
}


# --------------------------------------------------------------------------------------------------------------------
# Export.
# --------------------------------------------------------------------------------------------------------------------


def _input_size(model: Any) -> int:
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 4:
        raise GradExportError(f"the model input must be (None, S, S, 4), got {shape}")
    return int(shape[1])


def _gradient_function(model: Any, batch: int, size: int) -> Any:
    """A frozen concrete function ``(image, weights) -> (gradients, probabilities)``."""

    @tf.function(
        input_signature=[
            tf.TensorSpec((batch, size, size, 4), tf.float32, name=INPUT_NAMES[0]),
            tf.TensorSpec((batch, NUM_CLASSES), tf.float32, name=INPUT_NAMES[1]),
        ]
    )
    def grad_fn(image: tf.Tensor, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            tape.watch(image)
            probs = model(image, training=False)
            objective = tf.reduce_sum(probs * weights)
        grads = tape.gradient(objective, image)
        return tf.identity(grads, name=OUTPUT_NAMES[0]), tf.identity(probs, name=OUTPUT_NAMES[1])

    concrete = grad_fn.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)
    if len(frozen.inputs) != 2:
        names = [t.name for t in frozen.inputs]
        raise GradExportError(f"the frozen gradient function still has captured inputs: {names}")
    return frozen


def _rename_io(model_proto: Any, mapping: dict[str, str]) -> None:
    """Rename graph inputs/outputs (and every reference to them) in place."""
    g = model_proto.graph
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for i, name in enumerate(node.output):
            if name in mapping:
                node.output[i] = mapping[name]
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.name in mapping:
            vi.name = mapping[vi.name]


def gradient_parity(
    model: Any,
    onnx_path: str | Path,
    images: np.ndarray,
    weights: np.ndarray,
) -> dict[str, float]:
    """Compare ``grad.onnx`` with ``tf.GradientTape`` on the same inputs.

    Parameters
    ----------
    model : keras.Model
        The classifier the gradient model was exported from.
    onnx_path : str or Path
        The exported ``grad.onnx``.
    images : numpy.ndarray
        (B, S, S, 4) ``float32`` 0-255, B the fixed batch of ``grad.onnx``.
    weights : numpy.ndarray
        (B, 19) ``float32`` class weights.

    Returns
    -------
    dict
        ``max_abs_diff``, ``max_abs_grad`` (TF), ``rel_error`` (max abs diff / max abs TF gradient),
        ``correlation`` (Pearson, flattened), ``prob_max_abs_diff``.
    """
    import onnxruntime as ort

    x = tf.constant(images, tf.float32)
    w = tf.constant(weights, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        p = model(x, training=False)
        obj = tf.reduce_sum(p * w)
    g_tf = tape.gradient(obj, x).numpy().astype(np.float64)
    p_tf = p.numpy()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    g_ox, p_ox = sess.run(list(OUTPUT_NAMES), {INPUT_NAMES[0]: images, INPUT_NAMES[1]: weights})
    g_ox = g_ox.astype(np.float64)
    diff = float(np.max(np.abs(g_ox - g_tf)))
    scale = float(np.max(np.abs(g_tf)))
    a, b = g_tf.ravel() - g_tf.mean(), g_ox.ravel() - g_ox.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    corr = float((a * b).sum() / denom) if denom > 0 else (1.0 if diff == 0 else 0.0)
    return {
        "max_abs_diff": diff,
        "max_abs_grad": scale,
        "rel_error": diff / max(scale, 1e-30),
        "correlation": corr,
        "prob_max_abs_diff": float(np.max(np.abs(p_ox - p_tf))),
    }


def _parity_inputs(batch: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth cell-like random images and random class weights for the parity check."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.zeros((batch, size, size, 4), np.float32)
    for i in range(batch):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.35)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        for c in range(4):
            images[i, :, :, c] = 255.0 * blob * rng.uniform(0.2, 1.0) + rng.normal(0, 8, (size, size))
    images = np.clip(images, 0, 255).astype(np.float32)
    weights = rng.uniform(0.0, 1.0, (batch, NUM_CLASSES)).astype(np.float32)
    return images, weights


def export_grad_model(
    model: Any,
    path: str | Path,
    batch: int = 16,
    opset: int = 17,
    *,
    parity_images: np.ndarray | None = None,
    min_correlation: float = 0.999,
    max_rel_error: float = 1e-2,
) -> dict:
    """Export the fixed-batch gradient model ``grad.onnx`` and check it against TensorFlow.

    Parameters
    ----------
    model : keras.Model
        The classifier: input (None, S, S, 4) float 0-255, output (None, 19) sigmoid probabilities.
    path : str or Path
        Output file, or a model folder (then ``<folder>/grad.onnx`` is written).
    batch : int
        Fixed batch size B of the exported graph.
    opset : int
        ONNX opset.
    parity_images : numpy.ndarray, optional
        Real (n, S, S, 4) inputs (0-255) for the parity check; the first B are used, padded with
        synthetic cell-like images when fewer. Default: synthetic images only.
    min_correlation : float
        Smallest accepted Pearson correlation between ONNX and TF gradients.
    max_rel_error : float
        Largest accepted max abs difference relative to the largest TF gradient.

    Returns
    -------
    dict
        The manifest entry ``{"file": "grad.onnx", "batch": B, "inputs": ["image", "weights"],
        "outputs": ["gradients", "probabilities"]}`` plus ``"parity"`` (see :func:`gradient_parity`),
        which is not part of :class:`locus.service.manifest.GradSpec`: drop it (or keep it in the
        manifest's ``training`` section) when writing the manifest.

    Raises
    ------
    GradExportError
        The model has the wrong input shape, the conversion left unsupported ops, or the parity
        check failed.
    """
    import onnx
    import tf2onnx

    path = Path(path)
    if path.is_dir() or path.suffix != ".onnx":
        path = path / GRAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if batch < 1:
        raise GradExportError(f"batch must be >= 1, got {batch}")
    size = _input_size(model)
    frozen = _gradient_function(model, batch, size)
    graph_def = frozen.graph.as_graph_def()
    in_names = [t.name for t in frozen.inputs]
    out_names = [t.name for t in frozen.outputs]
    model_proto, _ = tf2onnx.convert.from_graph_def(
        graph_def,
        name="locus_grad",
        input_names=in_names,
        output_names=out_names,
        opset=opset,
        custom_op_handlers=dict(CUSTOM_OP_HANDLERS),
    )
    leftover = sorted({n.op_type for n in model_proto.graph.node if n.domain not in ("", "ai.onnx")})
    if leftover:
        raise GradExportError(f"tf2onnx left unsupported ops in the gradient graph: {leftover}")
    _rename_io(model_proto, dict(zip(in_names + out_names, list(INPUT_NAMES) + list(OUTPUT_NAMES), strict=True)))
    onnx.checker.check_model(model_proto)
    onnx.save(model_proto, str(path))

    images, weights = _parity_inputs(batch, size)
    if parity_images is not None:
        real = np.asarray(parity_images, np.float32)[:batch]
        images[: len(real)] = real
    parity = gradient_parity(model, path, images, weights)
    logger.info("grad.onnx parity: %s", parity)
    if not parity["correlation"] >= min_correlation or not parity["rel_error"] <= max_rel_error:
        raise GradExportError(
            f"{path}: gradients disagree with tf.GradientTape (correlation {parity['correlation']:.6f}, "
            f"max abs diff {parity['max_abs_diff']:.3g}, relative {parity['rel_error']:.3g})"
        )
    return {
        "file": path.name,
        "batch": int(batch),
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "parity": parity,
    }
