"""Export a trained Keras model to a model folder: ONNX, parity check, manifest and model card.

``locus export --checkpoint runs/x/best.keras --out models/NAME`` writes

* ``model.onnx``: input ``image`` float32 (N, S, S, 4) 0-255, output
  ``probabilities`` float32 (N, 19), dynamic batch (tf2onnx, opset 17);
* ``grad.onnx`` (when :mod:`locus.training.grad_export` is available and asked for);
* ``manifest.json`` (:class:`locus.service.manifest.Manifest`);
* ``MODEL_CARD.md``.

Keras and ONNX Runtime must agree on real crops within ``1e-4`` (max abs
difference of probabilities) or the export fails with the numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from locus.service.classes import CHANNELS, CLASS_NAMES, NUM_CLASSES
from locus.service.manifest import MANIFEST_NAME, CropSpec, GradSpec, Manifest, load_manifest, sha256_file

__all__ = [
    "ExportError",
    "convert_to_onnx",
    "onnx_parity",
    "export_model_folder",
    "write_model_card",
    "configure_parser",
    "run",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The export failed (conversion, parity or manifest), with the numbers that say why."""


def _rename_value(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        node.output[:] = [new if o == old else o for o in node.output]
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.name == old:
            vi.name = new


def convert_to_onnx(model: Any, path: str | Path, opset: int = 17) -> Path:
    """Convert a Keras classifier to ONNX with tf2onnx.

    Parameters
    ----------
    model : keras.Model
        Input (None, S, S, 4), output (None, 19).
    path : str or Path
        Output ``.onnx`` file.
    opset : int
        ONNX opset.

    Returns
    -------
    Path
        The written file; its single input is ``image`` (dynamic batch) and its single output ``probabilities``.

    Raises
    ------
    ExportError
        The graph has more than one input or output after conversion.
    """
    import onnx
    import tensorflow as tf
    import tf2onnx

    size = int(model.input_shape[1])
    spec = [tf.TensorSpec((None, size, size, 4), tf.float32, name=INPUT_NAME)]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    graph = proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ExportError(
            f"the ONNX graph has inputs {[i.name for i in graph.input]} and outputs {[o.name for o in graph.output]}; "
            "expected one of each"
        )
    if graph.input[0].name != INPUT_NAME:
        _rename_value(graph, graph.input[0].name, INPUT_NAME)
    if graph.output[0].name != OUTPUT_NAME:
        _rename_value(graph, graph.output[0].name, OUTPUT_NAME)
    # dynamic batch, named
    for vi in (graph.input[0], graph.output[0]):
        dim0 = vi.type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_value")
        dim0.dim_param = "N"
    proto.producer_name = "locus"
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def onnx_parity(model: Any, onnx_path: str | Path, batch: np.ndarray, tolerance: float = PARITY_TOLERANCE) -> dict:
    """Compare Keras and ONNX Runtime on the same inputs.

    Parameters
    ----------
    model : keras.Model
        The Keras classifier.
    onnx_path : str or Path
        Its ONNX export.
    batch : numpy.ndarray
        (N, S, S, 4) inputs, 0-255 (real crops).
    tolerance : float
        Largest accepted max abs difference of probabilities.

    Returns
    -------
    dict
        ``{"n": N, "max_abs_diff": ..., "mean_abs_diff": ..., "tolerance": ...}``.

    Raises
    ------
    ExportError
        The difference exceeds the tolerance, or the ONNX output has the wrong shape.
    """
    import onnxruntime as ort

    x = np.ascontiguousarray(batch, dtype=np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    ref = np.asarray(model(x, training=False), dtype=np.float32)
    if got.shape != (len(x), NUM_CLASSES):
        raise ExportError(f"{onnx_path}: output shape {got.shape}, expected ({len(x)}, {NUM_CLASSES})")
    diff = np.abs(got.astype(np.float64) - ref)
    out = {
        "n": int(len(x)),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "tolerance": float(tolerance),
    }
    if not out["max_abs_diff"] <= tolerance:
        raise ExportError(
            f"{onnx_path}: ONNX Runtime and Keras disagree on {len(x)} crops: max abs diff {out['max_abs_diff']:.3g} "
            f"(mean {out['mean_abs_diff']:.3g}) > tolerance {tolerance:g}"
        )
    return out


def _fmt(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None else f"{float(v):.{nd}f}"


def write_model_card(folder: str | Path, manifest: Manifest) -> Path:
    """Write ``MODEL_CARD.md`` from a manifest.

    Parameters
    ----------
    folder : str or Path
        The model folder.
    manifest : Manifest
        Its manifest (training summary, metrics and config are read from it).

    Returns
    -------
    Path
        The card.
    """
    tr = manifest.training or {}
    data = tr.get("data", {})
    metrics = tr.get("metrics", {})
    cfg = manifest.config or {}
    sim = bool(data.get("synthetic", False))
    lines = [
        f"# Model card: {manifest.name} {manifest.version}",
        "",
        f"Created {manifest.created}. {manifest.architecture} with 4 input channels "
        f"(R microtubules, G protein, B nucleus, Y ER) and 19 sigmoid outputs, input {manifest.input_size} px "
        f"per cell crop (padding {manifest.crop.padding}, other cells "
        f"{'masked' if manifest.crop.mask_other_cells else 'kept'}).",
        "",
        "## What it was trained on",
        "",
    ]
    if sim:
        lines += [
            "**Synthetic data only (HPA-sim).** The fields of view are generated by `training/sim`, not "
            "photographed. The model has never seen a real HPA image; its numbers below describe HPA-sim, "
            "not biology.",
            "",
        ]
    lines += [
        f"- Dataset folders: {', '.join(data.get('dirs', cfg.get('train_dirs', [])) or ['(not recorded)'])}",
        f"- Fields of view: {data.get('fields', 'n/a')} ({data.get('train_fields', 'n/a')} train, "
        f"{data.get('val_fields', 'n/a')} validation, split by image, multilabel-stratified)",
        f"- Cells: {data.get('cells', 'n/a')} ({data.get('train_cells', 'n/a')} train, "
        f"{data.get('val_cells', 'n/a')} validation)",
        f"- Cell masks: {data.get('masks', 'n/a')}",
        f"- Labels: `{cfg.get('label_source', 'n/a')}` "
        + (
            "(per-cell ground truth from truth/cells.csv)"
            if cfg.get("label_source") == "cell"
            else "(weak labels: every cell inherits its image's labels)"
        ),
        f"- Epochs run: {tr.get('epochs_run', 'n/a')}, batch {cfg.get('batch_size', 'n/a')}, "
        f"learning rate {cfg.get('learning_rate', 'n/a')} ({cfg.get('schedule', 'n/a')}), "
        f"training time {_fmt(tr.get('seconds'), 0)} s",
    ]
    lines += [f"- {note}" for note in tr.get("notes", [])]
    lines += [
        "",
        "## How well it does",
        "",
        f"- Validation cells, mean of per-class AP (cell classification, not the competition metric): "
        f"{_fmt(metrics.get('val_cell_map'))}",
        f"- Validation PR-AUC (Keras, multi-label; averages all 19 classes, counting those without validation "
        f"positives): {_fmt(metrics.get('val_pr_auc'))}",
    ]
    if metrics.get("heldout_map") is not None:
        lines.append(
            f"- **Held-out fields, competition mAP through the service's own pipeline** "
            f"(segmentation `{metrics.get('heldout_segmenter', 'classical')}`, IoU >= 0.6): "
            f"**{_fmt(metrics.get('heldout_map'))}** on {metrics.get('heldout_fields', 'n/a')} fields"
        )
    else:
        lines.append("- Competition mAP on held-out fields: not measured for this export")
    ap = metrics.get("val_ap")
    held = metrics.get("heldout_ap")
    if ap:
        eight = manifest.view_thresholds.get(8)
        head = (
            "| id | class | val cell AP | threshold |"
            + (" threshold, 8 views |" if eight else "")
            + (" held-out AP |" if held else "")
        )
        lines += ["", head, "|---:|---|---:|---:|" + ("---:|" if eight else "") + ("---:|" if held else "")]
        for i, name in enumerate(CLASS_NAMES):
            row = f"| {i} | {name} | {_fmt(ap[i])} | {manifest.thresholds[i]:.3f} |"
            row += f" {eight[i]:.3f} |" if eight else ""
            lines.append(row + (f" {_fmt(held[i])} |" if held else ""))
    lines += [
        "",
        "For reference, the published single-cell results on real HPA data: mAP 0.301 (B0) and 0.355 (B7) for the "
        "reference paper's models, 0.567 for the Kaggle 2021 winner.",
        "",
        "## Intended use",
        "",
        "- Exercising and testing Locus end to end (service, API, attributions, evaluation) and as a template for "
        "training a real model."
        if sim
        else "- Research on subcellular protein localisation in HPA-style images.",
        "- Ranking cells by class confidence; thresholds in the manifest were tuned for F1 on validation cells "
        f"(rule `{manifest.training.get('thresholds', {}).get('rule', 'argmax')}`; `thresholds` for one view, "
        "`view_thresholds` for the mean of 2, 4 or 8 test-time views).",
        "",
        "## Must not be used for",
        "",
        "- Any clinical, diagnostic or biological conclusion.",
        "- Scoring real HPA images and reporting the result as a localisation call"
        + (" (trained on synthetic data only)." if sim else " without validating on your own data."),
        "- Images that are not 4-channel immunofluorescence in the R, G, B, Y order of the HPA.",
        "",
        "## How to train a real one",
        "",
        '1. Download the Kaggle "HPA Single-Cell Image Classification" data (train.csv + 4 PNGs per field) and, '
        "optionally, a local 3-channel EfficientNet ImageNet weights file (`include_top=False`).",
        '2. Write a config (see `configs/hpa_b0.json`): `train_dirs` the Kaggle folder, `label_source: "image"` '
        '(weak labels), `segmenter: "hpa"` so crops match the test masks, `architecture` b0-b7, `input_size` '
        "128-512, `imagenet_weights` the local file (the yellow channel starts from blue).",
        "3. `locus train --config cfg.json --out runs/hpa` (a GPU host with the `[train-gpu]` extra), then "
        "`locus export --checkpoint runs/hpa/best.keras --out models/hpa-b0`.",
        "4. Evaluate with `locus predict` + `locus eval` on held-out fields with ground truth.",
        "",
        "## Files",
        "",
    ]
    for fname, digest in manifest.files.items():
        lines.append(f"- `{fname}` sha256 `{digest}`")
    lines.append("")
    path = Path(folder) / "MODEL_CARD.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def export_model_folder(
    model: Any,
    out_dir: str | Path,
    config: Any,
    thresholds: list[float] | None,
    training_summary: dict | None,
    parity_batch: np.ndarray,
    with_grad: bool = True,
    *,
    name: str | None = None,
    version: str | None = None,
    grad_batch: int | None = None,
    tolerance: float = PARITY_TOLERANCE,
    view_thresholds: dict[int, list[float]] | None = None,
) -> Manifest:
    """Export a trained classifier as a model folder the service can load.

    Parameters
    ----------
    model : keras.Model
        The classifier (input ``image`` (None, S, S, 4) 0-255, output (None, 19)).
    out_dir : str or Path
        The model folder (created; existing files are replaced).
    config : TrainConfig or dict
        The training config (stored in full; gives the crop rule and architecture).
    thresholds : list of float, optional
        Per-class decision thresholds (default 0.5 each).
    training_summary : dict, optional
        Data summary and metrics (manifest ``training``).
    parity_batch : numpy.ndarray
        (N, S, S, 4) real crops for the Keras/ONNX parity check.
    with_grad : bool
        Also export ``grad.onnx`` when :mod:`locus.training.grad_export` is importable.
    name, version : str, optional
        Manifest name and version (default from the config).
    grad_batch : int, optional
        Fixed batch of ``grad.onnx`` (default the config's ``grad_batch`` or 16).
    tolerance : float
        Parity tolerance.
    view_thresholds : dict of int to list of float, optional
        Per-class thresholds for scores averaged over 2, 4 or 8 test-time views, by view count
        (:func:`locus.training.thresholds.tune_view_thresholds`).

    Returns
    -------
    Manifest
        The manifest as re-read by :func:`locus.service.manifest.load_manifest`.

    Raises
    ------
    ExportError
        Conversion, parity or manifest validation failed.
    """
    from locus.training.config import TrainConfig

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.model_validate(config or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = int(model.input_shape[1])
    if size != cfg.input_size:
        raise ExportError(f"model input size {size} differs from the config's input_size {cfg.input_size}")
    onnx_path = convert_to_onnx(model, out / MODEL_FILE)
    parity = onnx_parity(model, onnx_path, parity_batch, tolerance)
    logger.info("ONNX parity on %d crops: max abs diff %.3g", parity["n"], parity["max_abs_diff"])
    summary = dict(training_summary or {})
    summary["onnx_parity"] = parity
    files = {MODEL_FILE: sha256_file(onnx_path)}
    grad = None
    stale = out / "grad.onnx"
    if stale.exists():
        stale.unlink()
    if with_grad:
        try:
            from locus.training.grad_export import export_grad_model
        except ImportError as exc:
            logger.warning("grad.onnx not exported: locus.training.grad_export unavailable (%s)", exc)
            summary["grad"] = f"not exported: {exc}"
        else:
            info = export_grad_model(model, out / "grad.onnx", grad_batch or cfg.grad_batch, parity_images=parity_batch)
            summary["grad_parity"] = info.pop("parity", None)
            grad = GradSpec(**{k: info[k] for k in ("file", "batch", "inputs", "outputs") if k in info})
            files[grad.file] = sha256_file(out / grad.file)
    rule = cfg.crop_rule()
    manifest = Manifest(
        name=name or cfg.name,
        version=version or cfg.version,
        architecture=f"efficientnet-{cfg.architecture}",
        input_size=size,
        channels=list(CHANNELS),
        crop=CropSpec(
            size=rule.size, padding=rule.padding, mask_other_cells=rule.mask_other_cells, min_side=rule.min_side
        ),
        class_names=list(CLASS_NAMES),
        thresholds=[float(t) for t in (thresholds if thresholds is not None else [0.5] * NUM_CLASSES)],
        view_thresholds={int(n): [float(t) for t in v] for n, v in (view_thresholds or {}).items()},
        files=files,
        grad=grad,
        training=_jsonable(summary),
        config=_jsonable(cfg.model_dump()),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    write_manifest(out, manifest)
    write_model_card(out, manifest)
    try:
        return load_manifest(out)
    except Exception as exc:
        raise ExportError(f"the written model folder {out} does not validate: {exc}") from exc


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` (pretty-printed).

    Parameters
    ----------
    folder : str or Path
        The model folder.
    manifest : Manifest
        The manifest.

    Returns
    -------
    Path
        The file.
    """
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``locus export`` options.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The subcommand's parser.
    """
    parser.add_argument(
        "--checkpoint", default=None, help="trained Keras model (.keras), e.g. runs/x/best.keras (needs [train])"
    )
    parser.add_argument("--out", default=None, help="model folder to write, e.g. models/my-model")
    parser.add_argument(
        "--config", default=None, help="training config JSON (default: config.json next to the checkpoint)"
    )
    parser.add_argument("--name", default=None, help="model name in the manifest (default: the config's)")
    parser.add_argument("--version", default=None, help="model version (default: the config's)")
    parser.add_argument("--no-grad", action="store_true", help="do not export grad.onnx")
    parser.add_argument("--grad-batch", type=int, default=None, help="fixed batch of grad.onnx")
    from locus.training import bioimageio_export

    bioimageio_export.configure_parser(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``locus export``: reads ``config.json``, ``thresholds.json``, ``summary.json`` and
    ``parity_batch.npy`` next to the checkpoint when present.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options.

    Returns
    -------
    int
        0 on success, 2 on bad input, 1 when the export fails.
    """
    from locus.training import bioimageio_export

    if getattr(args, "bioimageio", None) and not args.checkpoint:
        return bioimageio_export.run(args)  # package an existing model folder: no TensorFlow needed
    if not args.checkpoint or not args.out:
        sys.stderr.write("locus export: give --checkpoint and --out (or --bioimageio DIR to package a model folder)\n")
        return 2
    import keras

    from locus.training.config import load_config

    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        sys.stderr.write(f"locus export: checkpoint {ckpt} not found\n")
        return 2
    run_dir = ckpt.parent
    cfg_path = Path(args.config) if args.config else run_dir / "config.json"
    try:
        config = load_config(cfg_path if cfg_path.is_file() else None)
    except ValueError as exc:
        sys.stderr.write(f"locus export: {exc}\n")
        return 2
    model = keras.models.load_model(ckpt, compile=False)
    if config.mixed_precision:
        from locus.training.train import _float32_model

        model = _float32_model(model, config)  # the folder's contract is float32 throughout
    size = int(model.input_shape[1])
    if not cfg_path.is_file():
        sys.stderr.write(f"locus export: no config at {cfg_path}; using defaults with input_size {size}\n")
        config = config.model_copy(update={"input_size": size})
    thresholds = None
    if (run_dir / "thresholds.json").is_file():
        thresholds = json.loads((run_dir / "thresholds.json").read_text())
    view_thresholds = None
    if (run_dir / "view_thresholds.json").is_file():
        view_thresholds = {int(n): v for n, v in json.loads((run_dir / "view_thresholds.json").read_text()).items()}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    if (run_dir / "parity_batch.npy").is_file():
        parity = np.load(run_dir / "parity_batch.npy").astype(np.float32)
    else:
        sys.stderr.write("locus export: no parity_batch.npy next to the checkpoint; checking parity on noise\n")
        parity = np.random.default_rng(0).uniform(0, 255, (8, size, size, 4)).astype(np.float32)
    try:
        manifest = export_model_folder(
            model,
            args.out,
            config,
            thresholds,
            summary,
            parity,
            with_grad=not args.no_grad,
            name=args.name,
            version=args.version,
            grad_batch=args.grad_batch,
            view_thresholds=view_thresholds,
        )
    except ExportError as exc:
        sys.stderr.write(f"locus export: {exc}\n")
        return 1
    par = manifest.training.get("onnx_parity", {})
    print(
        f"exported {manifest.name} {manifest.version} to {args.out} (files: {', '.join(manifest.files)}; "
        f"ONNX vs Keras max abs diff {par.get('max_abs_diff', float('nan')):.2g})"
    )
    if getattr(args, "bioimageio", None):
        return bioimageio_export.run(args)
    return 0
