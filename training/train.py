"""``locus train``: train the 4-channel EfficientNet on per-cell crops and export a model folder.

Usage::

    locus train --config configs/sim_b0.json [--out runs/x] [--epochs 5] [--train-dir DIR ...]

The run folder (``--out``) receives ``config.json``, ``best.keras`` (best
validation loss), ``history.csv``, ``thresholds.json``, ``summary.json``,
``parity_batch.npy`` (validation crops for the export's parity check), the plots,
and ``model/`` (the exported model folder) unless ``export`` is off.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from locus.service.classes import CLASS_NAMES, NUM_CLASSES
from locus.training.config import TrainConfig, load_config

__all__ = ["TrainResult", "train", "configure_parser", "run", "config_from_args"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes
    ----------
    model : keras.Model
        The trained model (best validation-loss weights).
    run_dir : Path
        The run folder.
    history : dict
        Keras history (per-epoch metrics).
    thresholds : list of float
        Per-class thresholds tuned on validation cells.
    val_ap : list of float or None
        Per-class validation AP (None where a class has no validation positives).
    summary : dict
        The training summary stored in the manifest.
    model_dir : Path or None
        The exported model folder.
    manifest : Manifest or None
        Its manifest.
    extra : dict
        Anything a caller adds.
    view_thresholds : dict of int to list of float
        Per-class thresholds for scores averaged over 2, 4 and 8 test-time views (empty when not tuned).
    """

    model: Any
    run_dir: Path
    history: dict
    thresholds: list[float]
    val_ap: list[float | None]
    summary: dict
    model_dir: Path | None = None
    manifest: Any = None
    extra: dict = field(default_factory=dict)
    view_thresholds: dict[int, list[float]] = field(default_factory=dict)


def _learning_rate(config: TrainConfig, steps_per_epoch: int):
    import keras

    if config.schedule != "cosine":
        return config.learning_rate
    total = max(1, config.epochs * steps_per_epoch)
    warm = min(config.warmup_epochs * steps_per_epoch, total - 1)
    if warm > 0:
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=config.learning_rate * 0.1,
            decay_steps=max(1, total - warm),
            alpha=0.01,
            warmup_target=config.learning_rate,
            warmup_steps=warm,
        )
    return keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=total, alpha=0.01)


def _throughput_callback(samples_per_epoch: int):
    """A Keras callback measuring training samples per second (validation time excluded)."""
    import keras

    class Throughput(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epoch_seconds: list[float] = []
            self._t = 0.0
            self._val = 0.0
            self._tv = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()
            self._val = 0.0

        def on_test_begin(self, logs=None):
            self._tv = time.perf_counter()

        def on_test_end(self, logs=None):
            self._val += time.perf_counter() - self._tv

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_seconds.append(time.perf_counter() - self._t - self._val)

        def rate(self) -> float | None:
            """Samples/s over the epochs after the first (which includes graph tracing), else the first."""
            secs = self.epoch_seconds[1:] or self.epoch_seconds
            return samples_per_epoch * len(secs) / sum(secs) if secs and sum(secs) > 0 else None

    return Throughput()


def _strategy(config: TrainConfig):
    """The distribution strategy of the run: MirroredStrategy over the visible GPUs, or the default (one device)."""
    import tensorflow as tf

    if config.distribute == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _float32_model(model, config: TrainConfig):
    """The trained model in float32 (rebuilt and given the trained weights when it was trained in mixed precision).

    The model folder's contract is float32 in and out, and the ONNX export and gradient model are float32; under
    ``mixed_float16`` the variables are float32 already, so the weights carry over exactly.
    """
    import keras

    from locus.training.model import build_model

    if not config.mixed_precision:
        return model
    policy_before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        f32 = build_model(config.architecture, config.input_size, NUM_CLASSES, None, config.dropout)
    finally:
        keras.config.set_dtype_policy(policy_before)
    f32.set_weights(model.get_weights())
    return f32


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Train, tune thresholds, plot and (optionally) export.

    Parameters
    ----------
    config : TrainConfig
        Every choice of the run.
    progress : bool
        Show progress bars (crop extraction and Keras).

    Returns
    -------
    TrainResult
        The model, metrics and the exported folder.
    """
    import keras

    from locus.training.dataset import build_crops, make_tf_dataset, split_by_image
    from locus.training.model import build_model
    from locus.training.thresholds import mean_ap, per_class_ap, tune_thresholds, tune_view_thresholds

    t0 = time.time()
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.json")

    crops = build_crops(config, progress=progress)
    tr_idx, va_idx = split_by_image(crops, config.val_fraction, config.seed)
    t_data = time.time() - t0
    logger.info("%d crops (%d train, %d val) in %.1f s", len(crops), len(tr_idx), len(va_idx), t_data)
    if progress:
        print(
            f"data: {len(crops)} cells from {crops.info.get('fields')} fields "
            f"({len(tr_idx)} train / {len(va_idx)} val cells), {t_data:.1f} s"
            f"{' (cache)' if crops.info.get('cache_hit') else ''}",
            flush=True,
        )

    keras.utils.set_random_seed(config.seed)
    policy_before = keras.config.dtype_policy()
    if config.mixed_precision:
        keras.config.set_dtype_policy("mixed_float16")  # Keras wraps the optimizer in a LossScaleOptimizer
    strategy = _strategy(config)
    steps = math.ceil(len(tr_idx) / config.batch_size)
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
    lr = _learning_rate(config, steps)
    try:
        with strategy.scope():
            model = build_model(
                config.architecture, config.input_size, NUM_CLASSES, config.imagenet_weights, config.dropout
            )
            if config.weight_decay > 0:
                opt = keras.optimizers.AdamW(lr, weight_decay=config.weight_decay)
            else:
                opt = keras.optimizers.Adam(lr)
            model.compile(
                optimizer=opt,
                loss=keras.losses.BinaryCrossentropy(),
                metrics=[keras.metrics.AUC(curve="PR", multi_label=True, num_labels=NUM_CLASSES, name="pr_auc")],
                jit_compile=config.jit_compile,
            )
    finally:
        keras.config.set_dtype_policy(policy_before)
    if progress and strategy.num_replicas_in_sync > 1:
        print(f"distribute: {strategy.num_replicas_in_sync} replicas, global batch {config.batch_size}", flush=True)
    train_ds = make_tf_dataset(
        crops.images, crops.labels, tr_idx, config.batch_size, training=True, augment=config.augment, seed=config.seed
    )
    if config.max_steps_per_epoch:
        train_ds = train_ds.repeat()
    val_ds = make_tf_dataset(crops.images, crops.labels, va_idx, config.batch_size * 2, training=False)
    throughput = _throughput_callback(steps * config.batch_size if config.max_steps_per_epoch else len(tr_idx))
    callbacks = [
        keras.callbacks.ModelCheckpoint(str(run_dir / "best.keras"), monitor="val_loss", save_best_only=True),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv")),
        keras.callbacks.TerminateOnNaN(),
        throughput,
    ]
    if config.schedule == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.3, patience=max(1, config.patience // 2), min_lr=1e-6
            )
        )
    t1 = time.time()
    hist = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.epochs,
        steps_per_epoch=steps if config.max_steps_per_epoch else None,
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles every epoch itself
        verbose=config.verbose if progress else 0,
    )
    t_fit = time.time() - t1
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}

    # validation predictions -> thresholds and per-class AP
    x_val = crops.images[va_idx]
    y_val = crops.labels[va_idx]
    p_val = model.predict(
        make_tf_dataset(crops.images, crops.labels, va_idx, config.batch_size * 2, training=False).map(lambda x, y: x),
        verbose=0,
    )
    thresholds = tune_thresholds(y_val, p_val, rule=config.threshold_rule)
    view_thresholds: dict[int, list[float]] = {}
    if config.view_thresholds and len(va_idx):
        t2 = time.time()
        view_thresholds = tune_view_thresholds(
            lambda b: np.asarray(model.predict_on_batch(b.astype(np.float32))),
            crops.images[va_idx],
            y_val,
            batch_size=64,
            rule=config.threshold_rule,
        )
        logger.info("view thresholds (2, 4, 8 views) tuned in %.1f s", time.time() - t2)
    aps = per_class_ap(y_val, p_val)
    best_epoch = int(np.argmin(history["val_loss"])) if history.get("val_loss") else len(history.get("loss", [])) - 1
    train_fields = sorted(set(crops.fields[tr_idx].tolist()))
    val_fields = sorted(set(crops.fields[va_idx].tolist()))
    synthetic = any((Path(d) / "sim.json").is_file() for d in config.train_dirs)
    summary = {
        "data": {
            "dirs": [str(d) for d in config.train_dirs],
            "synthetic": synthetic,
            "fields": int(crops.info.get("fields", 0)),
            "train_fields": len(train_fields),
            "val_fields": len(val_fields),
            "cells": len(crops),
            "train_cells": int(len(tr_idx)),
            "val_cells": int(len(va_idx)),
            "masks": crops.info.get("masks"),
            "label_source": config.label_source,
            "cells_per_class": {CLASS_NAMES[c]: int(crops.labels[:, c].sum()) for c in range(NUM_CLASSES)},
        },
        "epochs_run": len(history.get("loss", [])),
        "best_epoch": best_epoch + 1,
        "seconds": round(time.time() - t0, 1),
        "seconds_fit": round(t_fit, 1),
        "train_samples_per_s": None if throughput.rate() is None else round(throughput.rate(), 2),
        "epoch_seconds": [round(x, 1) for x in throughput.epoch_seconds],
        "thresholds": {"rule": config.threshold_rule, "views": [1, *sorted(view_thresholds)]},
        "metrics": {
            "val_loss": history["val_loss"][best_epoch] if history.get("val_loss") else None,
            "val_pr_auc": history["val_pr_auc"][best_epoch] if history.get("val_pr_auc") else None,
            "val_cell_map": mean_ap(aps),
            "val_ap": aps,
        },
    }
    (run_dir / "thresholds.json").write_text(json.dumps(thresholds) + "\n", encoding="utf-8")
    if view_thresholds:
        (run_dir / "view_thresholds.json").write_text(json.dumps(view_thresholds) + "\n", encoding="utf-8")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    parity = x_val[:32] if len(x_val) else crops.images[tr_idx[:32]]
    np.save(run_dir / "parity_batch.npy", parity)
    model.save(run_dir / "final.keras")
    if config.plots:
        from locus.training.plots import write_all

        write_all(run_dir / "plots", crops.labels, crops.image_labels, history, aps)
    result = TrainResult(model, run_dir, history, thresholds, aps, summary, view_thresholds=view_thresholds)
    if config.export:
        from locus.training.export import export_model_folder

        result.model_dir = run_dir / "model"
        result.manifest = export_model_folder(
            _float32_model(model, config),
            result.model_dir,
            config,
            thresholds,
            summary,
            parity.astype(np.float32),
            with_grad=config.with_grad,
            view_thresholds=view_thresholds,
        )
        if config.plots:
            import shutil

            for png in (run_dir / "plots").glob("*.png"):
                shutil.copy2(png, result.model_dir / png.name)
    return result


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``locus train`` options (each overrides the config file).

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The subcommand's parser.
    """
    parser.add_argument("--config", default=None, help="training config JSON (see configs/); default: the defaults")
    parser.add_argument("--out", default=None, help="run folder (checkpoints, logs, plots, model/)")
    parser.add_argument(
        "--train-dir",
        action="append",
        default=None,
        dest="train_dirs",
        help="dataset folder (repeatable); replaces the config's train_dirs",
    )
    parser.add_argument("--arch", default=None, dest="architecture", help="b0 .. b7")
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, dest="learning_rate")
    parser.add_argument("--label-source", choices=["image", "cell"], default=None)
    parser.add_argument("--max-cells-per-field", type=int, default=None)
    parser.add_argument("--imagenet-weights", default=None, help="local 3-channel EfficientNet notop weights file")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--name", default=None, help="model name in the manifest")
    parser.add_argument("--version", default=None, help="model version in the manifest")
    parser.add_argument("--no-cache", action="store_true", help="recompute crops instead of using the cache")
    parser.add_argument("--no-export", action="store_true", help="skip exporting the model folder")
    parser.add_argument("--no-grad", action="store_true", help="export without grad.onnx")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build the config from ``--config`` and the command-line overrides.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed ``locus train`` options.

    Returns
    -------
    TrainConfig
        The validated config.
    """
    keys = (
        "out",
        "train_dirs",
        "architecture",
        "input_size",
        "epochs",
        "batch_size",
        "learning_rate",
        "label_source",
        "max_cells_per_field",
        "imagenet_weights",
        "seed",
        "name",
        "version",
    )
    overrides: dict[str, Any] = {k: getattr(args, k, None) for k in keys}
    if getattr(args, "no_cache", False):
        overrides["cache"] = False
    if getattr(args, "no_export", False):
        overrides["export"] = False
    if getattr(args, "no_grad", False):
        overrides["with_grad"] = False
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    """Run ``locus train``.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options.

    Returns
    -------
    int
        0 on success, 2 on a bad config or data.
    """
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING, format="%(message)s")
    try:
        config = config_from_args(args)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"locus train: {exc}\n")
        return 2
    try:
        result = train(config, progress=not args.quiet)
    except (FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"locus train: {exc}\n")
        return 2
    m = result.summary["metrics"]
    print(
        f"trained {result.summary['epochs_run']} epochs in {result.summary['seconds_fit']} s "
        f"({result.summary['train_samples_per_s']} samples/s"
        f"{', incl. graph tracing' if result.summary['epochs_run'] == 1 else ''}); val loss {m['val_loss']:.4f}, "
        f"val PR-AUC {m['val_pr_auc']:.4f}, val cell mAP "
        f"{'n/a' if m['val_cell_map'] is None else format(m['val_cell_map'], '.4f')}"
    )
    print(f"run folder: {result.run_dir}" + (f"; model folder: {result.model_dir}" if result.model_dir else ""))
    return 0
