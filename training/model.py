"""The 4-channel EfficientNet classifier and its ImageNet initialisation from a local file.

The model takes ``image``: float32 ``(N, S, S, 4)`` in R, G, B, Y order with values
0-255 (the Locus value rule) and returns ``probabilities``: float32 ``(N, 19)``
(independent sigmoids, one per class).

Keras' EfficientNet starts with ``Rescaling(1/255)`` and a ``Normalization``
layer. Built with ``weights=None`` the Normalization layer holds mean 0 and
variance 1 for each of the 4 channels (an identity), so 0-255 input of four
channels works as is; :func:`load_imagenet_stem` sets it from the ImageNet file
(yellow taking blue's statistics) when a pretrained start is wanted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from locus.service.classes import NUM_CLASSES

__all__ = ["ARCHITECTURES", "build_model", "build_backbone", "load_imagenet_stem", "default_input_size"]

#: Architecture name -> (keras.applications constructor name, native input size).
ARCHITECTURES: dict[str, tuple[str, int]] = {
    "b0": ("EfficientNetB0", 224),
    "b1": ("EfficientNetB1", 240),
    "b2": ("EfficientNetB2", 260),
    "b3": ("EfficientNetB3", 300),
    "b4": ("EfficientNetB4", 380),
    "b5": ("EfficientNetB5", 456),
    "b6": ("EfficientNetB6", 528),
    "b7": ("EfficientNetB7", 600),
}

#: Index of the blue (nucleus) channel, whose ImageNet weights seed the yellow (ER) channel.
_BLUE = 2


def _normalise_arch(arch: str) -> str:
    key = str(arch).strip().lower().removeprefix("efficientnet").removeprefix("-")
    if key not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    return key


def default_input_size(arch: str) -> int:
    """The input size EfficientNet was designed for.

    Parameters
    ----------
    arch : str
        ``"b0"`` .. ``"b7"``.

    Returns
    -------
    int
        Side in pixels (224 for B0 up to 600 for B7).
    """
    return ARCHITECTURES[_normalise_arch(arch)][1]


def build_backbone(arch: str, input_size: int, channels: int = 4, weights: str | None = None, input_tensor: Any = None):
    """Build a headless Keras EfficientNet.

    Parameters
    ----------
    arch : str
        ``"b0"`` .. ``"b7"``.
    input_size : int
        Side of the square input.
    channels : int
        Input channels (4 for Locus, 3 for the ImageNet twin).
    weights : str, optional
        A local weights file to load (only for ``channels=3``); never downloads.
    input_tensor : keras tensor, optional
        Input to build on (so the backbone's layers join the outer model).

    Returns
    -------
    keras.Model
        The backbone, ``include_top=False`` without pooling.
    """
    import keras

    ctor = getattr(keras.applications, ARCHITECTURES[_normalise_arch(arch)][0])
    shape = (input_size, input_size, channels)
    kwargs: dict[str, Any] = {"include_top": False, "weights": weights, "input_shape": shape}
    if input_tensor is not None:
        kwargs["input_tensor"] = input_tensor
    return ctor(**kwargs)


def build_model(
    arch: str = "b0",
    input_size: int = 128,
    num_classes: int = NUM_CLASSES,
    imagenet_weights: str | Path | None = None,
    dropout: float = 0.3,
):
    """Build the 4-channel EfficientNet classifier.

    Parameters
    ----------
    arch : str
        ``"b0"`` .. ``"b7"``.
    input_size : int
        Side of the square input (the crop size).
    num_classes : int
        Number of sigmoid outputs (19).
    imagenet_weights : str or Path, optional
        Local 3-channel EfficientNet weights file (``.h5`` / ``.weights.h5``,
        ``include_top=False``) to initialise from; see :func:`load_imagenet_stem`.
        None: random initialisation.
    dropout : float
        Dropout rate before the classification layer.

    Returns
    -------
    keras.Model
        Input ``image`` (N, S, S, 4) float32 0-255, output ``probabilities`` (N, num_classes).
    """
    import warnings

    import keras

    key = _normalise_arch(arch)
    inputs = keras.Input(shape=(input_size, input_size, 4), name="image", dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "input shape is not square/3 channels" warnings
        backbone = build_backbone(key, input_size, 4, input_tensor=inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(backbone.output)
    x = keras.layers.Dropout(dropout, name="top_dropout")(x)
    # float32 head: under a mixed_float16 policy the network computes in float16, the probabilities stay float32
    outputs = keras.layers.Dense(num_classes, activation="sigmoid", name="probabilities", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name=f"locus_efficientnet_{key}")
    if imagenet_weights is not None:
        load_imagenet_stem(model, imagenet_weights, arch=key)
    return model


def _backbone_layers(model) -> list:
    """The model's backbone layers in build order (everything before the pooling head)."""
    layers = []
    for layer in model.layers:
        if layer.name == "avg_pool":
            break
        layers.append(layer)
    return layers


def load_imagenet_stem(
    model, weights_file: str | Path, arch: str | None = None, fold_imagenet_scale: bool = True
) -> dict:
    """Initialise a 4-channel model from a local 3-channel EfficientNet weights file.

    A 3-channel twin is built with ``weights=weights_file`` and its weights are
    copied layer by layer. The stem convolution kernel ``(k, k, 3, C)`` becomes
    ``(k, k, 4, C)``: R, G, B copied, Y initialised from B (as the reference
    HPA paper does). The input Normalization layer gets the file's per-channel
    mean and variance, Y again from B.

    Parameters
    ----------
    model : keras.Model
        A model from :func:`build_model` (random weights).
    weights_file : str or Path
        Local weights of ``keras.applications.EfficientNetB?(include_top=False)``
        for 3 channels. Nothing is downloaded.
    arch : str, optional
        Architecture of the file; default taken from the model's name.
    fold_imagenet_scale : bool
        Keras' ImageNet EfficientNet divides by the standard deviation once more
        after Normalization (a ``Rescaling`` present only for ``weights="imagenet"``);
        fold that factor into the Normalization variance so the pretrained
        weights see the inputs they were trained on. No effect when the file's
        variance is 1.

    Returns
    -------
    dict
        ``{"copied": n_layers, "stem": layer_name}``.

    Raises
    ------
    FileNotFoundError
        The weights file does not exist.
    ValueError
        The file does not fit the model's architecture.
    """
    import warnings

    path = Path(weights_file)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights file {path} not found (Locus never downloads weights)")
    key = _normalise_arch(arch or model.name.rsplit("_", 1)[-1])
    size = int(model.input_shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            twin = build_backbone(key, size, 3, weights=str(path))
        except Exception as exc:  # Keras raises many kinds for a mismatching file
            raise ValueError(
                f"{path} does not load into a 3-channel EfficientNet-{key.upper()} without top: {exc}"
            ) from exc
    src_layers = [layer for layer in twin.layers if not layer.name.startswith("input")]
    dst_layers = [layer for layer in _backbone_layers(model) if layer.__class__.__name__ != "InputLayer"]
    if len(src_layers) != len(dst_layers):
        raise ValueError(f"layer count differs: file twin has {len(src_layers)}, model backbone {len(dst_layers)}")
    copied = 0
    stem_name = None
    for src, dst in zip(src_layers, dst_layers, strict=True):
        if src.__class__ is not dst.__class__:
            raise ValueError(f"layer mismatch: {src.name} ({src.__class__.__name__}) vs {dst.name}")
        sw = src.get_weights()
        if not sw:
            continue
        dw = dst.get_weights()
        new = []
        for s, d in zip(sw, dw, strict=True):
            if s.shape == d.shape:
                new.append(s)
            elif s.ndim == 4 and s.shape[2] == 3 and d.shape[2] == 4:  # the stem convolution kernel
                new.append(np.concatenate([s, s[:, :, _BLUE : _BLUE + 1, :]], axis=2))
                stem_name = dst.name
            elif s.ndim == 1 and s.shape[0] == 3 and d.shape[0] == 4:  # Normalization mean / variance
                new.append(np.concatenate([s, s[_BLUE : _BLUE + 1]]))
            elif s.ndim == 0 or s.shape == ():
                new.append(s)
            else:
                raise ValueError(f"layer {dst.name}: weight shape {s.shape} in file vs {d.shape} in model")
        if dst.__class__.__name__ == "Normalization" and fold_imagenet_scale and len(new) >= 2:
            var = np.asarray(new[1], dtype=np.float64)
            if not np.allclose(var, 1.0):
                # result = (x - mean) / sqrt(var) / sqrt(std), std = sqrt(var)  ->  variance' = var ** 1.5
                new[1] = (var**1.5).astype(np.float32)
        dst.set_weights(new)
        copied += 1
    del twin
    if stem_name is None:
        raise ValueError("no 3-channel stem convolution found in the weights file")
    return {"copied": copied, "stem": stem_name, "scale_folded": bool(fold_imagenet_scale)}
