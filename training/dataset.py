"""Per-cell training data: crops, labels, the split by image, and the tf.data pipeline.

Every crop is made by :func:`locus.service.crop.crop_cells`, the function the service
calls at prediction time, so training and serving see the same tensors.

Cells come from ``truth/{ID}_cells.png`` when the dataset has ground truth
(HPA-sim), otherwise from a segmentation backend (``classical`` by default).
Labels follow ``label_source``:

* ``"image"``: weak labels, every cell inherits its field's labels (``train.csv``,
  or the union of its cells' labels when only ``truth/cells.csv`` exists);
* ``"cell"``: per-cell labels from ``truth/cells.csv``; fields without them fall
  back to their image labels.

Crops are cached under ``cache_dir/<key>/`` as ``images.npy`` (N, S, S, 4),
``labels.npy`` (N, 19) ``float32`` 0/1, ``fields.npy`` and ``cells.npy``; the key
hashes every input that changes the crops, so repeat runs load in seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from locus.service.classes import NUM_CLASSES
from locus.service.crop import CropRule, crop_cells

__all__ = [
    "CropSet",
    "FieldTask",
    "field_crops",
    "labels_to_matrix",
    "build_crops",
    "split_by_image",
    "make_tf_dataset",
    "augment_batch",
]

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class CropSet:
    """All cell crops of a dataset with their labels.

    Attributes
    ----------
    images : numpy.ndarray
        (N, S, S, 4) crops, ``uint8`` or ``float32``, values 0-255, R, G, B, Y.
    labels : numpy.ndarray
        (N, 19) ``float32`` 0/1 targets.
    fields : numpy.ndarray
        (N,) field ID of each crop.
    cells : numpy.ndarray
        (N,) cell id of each crop in its field's label image.
    image_labels : dict of str to list of int
        Image-level labels of every field (used for the stratified split).
    info : dict
        Summary: number of fields, cells, label source, cache key.
    """

    images: np.ndarray
    labels: np.ndarray
    fields: np.ndarray
    cells: np.ndarray
    image_labels: dict[str, list[int]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class FieldTask:
    """Everything a worker needs to crop one field (picklable)."""

    id: str
    key: str
    paths: dict[str, str]
    root: str
    image_labels: tuple[int, ...] | None
    cell_labels: dict[int, tuple[int, ...]] | None
    rule: CropRule
    use_truth: bool
    segmenter: str
    label_source: str
    max_cells: int | None
    min_area: int
    seed: int
    dtype: str


def labels_to_matrix(label_lists: list[list[int]] | list[tuple[int, ...]]) -> np.ndarray:
    """Multi-hot encode lists of class ids.

    Parameters
    ----------
    label_lists : list of list of int
        Class ids per sample.

    Returns
    -------
    numpy.ndarray
        (N, 19) ``float32`` 0/1.
    """
    out = np.zeros((len(label_lists), NUM_CLASSES), dtype=np.float32)
    for i, ids in enumerate(label_lists):
        for c in ids:
            out[i, int(c)] = 1.0
    return out


def field_crops(
    image: np.ndarray, cell_labels: np.ndarray, rule: CropRule, cell_ids: list[int] | None = None
) -> tuple[list[int], np.ndarray]:
    """Crop the cells of one field for training, exactly as the service does.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W, 4) field, ``uint8`` or ``uint16``.
    cell_labels : numpy.ndarray
        (H, W) integer cell label image.
    rule : CropRule
        The crop rule.
    cell_ids : list of int, optional
        Cells to crop (default all, increasing id).

    Returns
    -------
    ids : list of int
        Cell ids in batch order.
    batch : numpy.ndarray
        (N, S, S, 4) ``float32`` 0-255, identical to :func:`locus.service.crop.crop_cells`.
    """
    return crop_cells(image, cell_labels.astype(np.int32, copy=False), rule, cell_ids)


_SEGMENTERS: dict[str, Any] = {}


def _segment(name: str, image: np.ndarray) -> np.ndarray:
    from locus.service.config import PipelineSettings
    from locus.service.factory import build_segmenter

    if name not in _SEGMENTERS:
        # the same factory and LOCUS_* settings (e.g. the HPA network files) as the service
        _SEGMENTERS[name] = build_segmenter(PipelineSettings(), name)[0]
    cells, _ = _SEGMENTERS[name].segment(image)
    return cells


def _to_cache_dtype(batch: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return np.clip(np.rint(batch), 0, 255).astype(np.uint8)
    return batch.astype(np.float32, copy=False)


def _labels_by_match(
    cells: np.ndarray, truth: np.ndarray, truth_labels: dict[int, tuple[int, ...]], min_iou: float = 0.5
) -> dict[int, tuple[int, ...]]:
    """Labels for segmented cells from the truth cells they overlap with IoU >= ``min_iou``.

    Parameters
    ----------
    cells, truth : numpy.ndarray
        (H, W) segmented and true cell label images.
    truth_labels : dict
        True cell id -> class ids.
    min_iou : float
        Smallest IoU of a match (above 0.5 a match is unique).

    Returns
    -------
    dict
        Segmented cell id -> class ids, for matched cells only.
    """
    from locus.service.metric import label_iou

    seg_ids, tru_ids, iou = label_iou(cells, truth)
    out: dict[int, tuple[int, ...]] = {}
    for i, j in zip(*np.nonzero(iou >= min_iou), strict=True):
        if int(tru_ids[j]) in truth_labels:
            out[int(seg_ids[i])] = tuple(truth_labels[int(tru_ids[j])])
    return out


def _crop_field(task: FieldTask) -> tuple[str, list[int], np.ndarray, np.ndarray, str]:
    """Worker: crop one field and label its cells. Returns (id, cell ids, crops, labels, mask source)."""
    from locus.service.imaging import load_field
    from locus.service.readers import load_truth

    image = load_field(task.paths)
    source = "segmenter"
    cells = None
    if task.use_truth:
        try:
            cells = load_truth(task.root, task.id, cell_labels={}).cells
            source = "truth"
        except FileNotFoundError:
            cells = None
    cell_table = task.cell_labels
    if cells is None:
        from locus.training.segment_cache import stored_cells

        # `locus segment` output of this segmenter, when current; else segment now
        cells = stored_cells(task.paths, task.id, task.segmenter)
        if cells is None:
            cells = _segment(task.segmenter, image)
        if task.label_source == "cell" and task.cell_labels:
            # Train on the crops the service will make: segmented cells take the labels of the truth cell
            # they match (IoU >= 0.5); unmatched segments are left out.
            try:
                truth = load_truth(task.root, task.id, cell_labels={}).cells
                cell_table = _labels_by_match(cells, truth, task.cell_labels)
                source = "segmenter+truth"
            except FileNotFoundError:
                pass
    cells = cells.astype(np.int32, copy=False)
    counts = np.bincount(cells.ravel())
    ids = [int(i) for i in np.nonzero(counts)[0] if i != 0 and counts[i] >= max(task.min_area, 1)]
    # labels per cell
    per_cell: list[tuple[int, ...]] = []
    keep: list[int] = []
    use_cell = task.label_source == "cell" and source in ("truth", "segmenter+truth") and cell_table
    for cid in ids:
        if use_cell:
            lab = cell_table.get(cid)
            if lab is None:
                continue  # a cell without a row in cells.csv has no known label
        else:
            lab = task.image_labels
            if lab is None:
                continue
        keep.append(cid)
        per_cell.append(lab)
    if task.max_cells is not None and len(keep) > task.max_cells:
        rng = np.random.default_rng([task.seed, int(hashlib.sha1(task.id.encode()).hexdigest()[:8], 16)])
        pick = np.sort(rng.choice(len(keep), size=task.max_cells, replace=False))
        keep = [keep[i] for i in pick]
        per_cell = [per_cell[i] for i in pick]
    size = task.rule.size
    if not keep:
        empty = np.zeros((0, size, size, 4), dtype=task.dtype)
        return task.id, [], empty, np.zeros((0, NUM_CLASSES), np.float32), source
    got, batch = field_crops(image, cells, task.rule, keep)
    return task.id, got, _to_cache_dtype(batch, task.dtype), labels_to_matrix(per_cell), source


def _tasks(config: Any) -> tuple[list[FieldTask], dict[str, list[int]]]:
    from locus.service.readers import find_fields, read_cell_labels

    tasks: list[FieldTask] = []
    image_labels: dict[str, list[int]] = {}
    rule = config.crop_rule()
    if not config.train_dirs:
        raise ValueError("train_dirs is empty: give at least one dataset folder")
    for root in config.train_dirs:
        refs = find_fields(root, on_missing="warn")
        if not refs:
            raise ValueError(f"{root}: no fields of view found ({{ID}}_{{red,green,blue,yellow}}.png)")
        try:
            cell_table = read_cell_labels(root)
        except FileNotFoundError:
            cell_table = {}
        for ref in refs:
            cl = cell_table.get(ref.id)
            img = ref.labels
            if img is None and cl:
                img = sorted({c for labs in cl.values() for c in labs})
            if img is None and not (config.label_source == "cell" and cl):
                warnings.warn(f"{ref.id}: no labels (not in train.csv nor truth/cells.csv); skipped", stacklevel=2)
                continue
            key = ref.id if ref.id not in image_labels else f"{Path(root).name}/{ref.id}"
            image_labels[key] = list(img or [])
            tasks.append(
                FieldTask(
                    id=ref.id,
                    key=key,
                    paths=dict(ref.paths),
                    root=str(root),
                    image_labels=tuple(img) if img is not None else None,
                    cell_labels={k: tuple(v) for k, v in cl.items()} if cl else None,
                    rule=rule,
                    use_truth=config.use_truth_masks,
                    segmenter=config.segmenter,
                    label_source=config.label_source,
                    max_cells=config.max_cells_per_field,
                    min_area=config.min_cell_area,
                    seed=config.seed,
                    dtype=config.cache_dtype,
                )
            )
    return tasks, image_labels


def _cache_key(tasks: list[FieldTask], config: Any) -> str:
    h = hashlib.sha256()
    spec = {
        "v": CACHE_VERSION,
        "rule": config.crop_rule().to_dict(),
        "label_source": config.label_source,
        "segmenter": config.segmenter,
        "truth": config.use_truth_masks,
        "max_cells": config.max_cells_per_field,
        "min_area": config.min_cell_area,
        "seed": config.seed,
        "dtype": config.cache_dtype,
    }
    h.update(json.dumps(spec, sort_keys=True).encode())
    for t in tasks:
        stats = []
        for p in sorted(t.paths.values()):
            st = os.stat(p)
            stats.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
        h.update(json.dumps([t.id, stats, t.image_labels, sorted((t.cell_labels or {}).items())]).encode())
    return h.hexdigest()[:16]


def build_crops(config: Any, progress: bool = True) -> CropSet:
    """Crop and label every cell of the config's datasets, using the cache when it is current.

    Parameters
    ----------
    config : TrainConfig
        Uses ``train_dirs``, ``input_size``, ``crop``, ``label_source``,
        ``use_truth_masks``, ``segmenter``, ``max_cells_per_field``,
        ``min_cell_area``, ``seed``, ``cache``, ``cache_dir``, ``cache_dtype``, ``workers``.
    progress : bool
        Show a progress bar.

    Returns
    -------
    CropSet
        All crops; ``info`` says whether the cache was used.

    Raises
    ------
    ValueError
        No dataset folder, no fields or no labelled cells.
    """
    tasks, image_labels = _tasks(config)
    key = _cache_key(tasks, config)
    cache = config.resolved_cache_dir() / key
    if config.cache and (cache / "meta.json").is_file():
        meta = json.loads((cache / "meta.json").read_text())
        logger.info("loading %d cached crops from %s", meta["cells"], cache)
        return CropSet(
            images=np.load(cache / "images.npy"),
            labels=np.load(cache / "labels.npy"),
            fields=np.load(cache / "fields.npy"),
            cells=np.load(cache / "cells.npy"),
            image_labels={k: list(v) for k, v in meta["image_labels"].items()},
            info={**meta["info"], "cache": str(cache), "cache_hit": True},
        )
    from tqdm import tqdm

    results = []
    workers = max(1, min(int(config.workers), len(tasks)))
    bar = tqdm(total=len(tasks), desc="crop", unit="field", disable=not progress)
    if workers == 1:
        for t in tasks:
            results.append(_crop_field(t))
            bar.update()
    else:
        # spawn: the parent may hold TensorFlow's threads; children only need numpy/cv2.
        with mp.get_context("spawn").Pool(workers) as pool:
            for res in pool.imap(_crop_field, tasks, chunksize=1):
                results.append(res)
                bar.update()
    bar.close()
    size = config.input_size
    dtype = np.uint8 if config.cache_dtype == "uint8" else np.float32
    n = sum(len(r[1]) for r in results)
    if n == 0:
        raise ValueError("no labelled cells found in " + ", ".join(config.train_dirs))
    images = np.zeros((n, size, size, 4), dtype=dtype)
    labels = np.zeros((n, NUM_CLASSES), dtype=np.float32)
    fields: list[str] = []
    cells: list[int] = []
    k = 0
    sources: dict[str, int] = {}
    for (_, ids, batch, lab, source), task in zip(results, tasks, strict=True):
        m = len(ids)
        images[k : k + m] = batch
        labels[k : k + m] = lab
        fields.extend([task.key] * m)
        cells.extend(ids)
        sources[source] = sources.get(source, 0) + 1
        k += m
    info = {
        "fields": len(tasks),
        "cells": n,
        "label_source": config.label_source,
        "masks": sources,
        "cache_key": key,
        "cache_dtype": config.cache_dtype,
    }
    out = CropSet(images, labels, np.array(fields), np.array(cells, dtype=np.int64), image_labels, info)
    if config.cache:
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cache / "images.npy", images)
        np.save(cache / "labels.npy", labels)
        np.save(cache / "fields.npy", out.fields)
        np.save(cache / "cells.npy", out.cells)
        meta = {"cells": n, "image_labels": image_labels, "info": info}
        (cache / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    out.info.update({"cache": str(cache) if config.cache else None, "cache_hit": False})
    return out


def split_by_image(crops: CropSet, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Multilabel-stratified train/validation split by field of view.

    Parameters
    ----------
    crops : CropSet
        The crops.
    val_fraction : float
        Share of fields held out.
    seed : int
        Random state.

    Returns
    -------
    train_idx, val_idx : numpy.ndarray
        Crop indices; no field has crops on both sides.

    Raises
    ------
    ValueError
        Fewer than two fields.
    """
    field_ids = sorted(set(crops.fields.tolist()))
    if len(field_ids) < 2:
        raise ValueError(f"need at least 2 fields of view to split by image, got {len(field_ids)}")
    # image-level label of each field: its given labels, or the union of its crops' labels
    y = np.zeros((len(field_ids), NUM_CLASSES), dtype=np.int64)
    pos = {f: i for i, f in enumerate(field_ids)}
    for f in field_ids:
        if crops.image_labels.get(f):
            for c in crops.image_labels[f]:
                y[pos[f], c] = 1
    fidx = np.array([pos[f] for f in crops.fields.tolist()])
    np.maximum.at(y, fidx, crops.labels.astype(np.int64))
    n_val = min(max(1, int(round(val_fraction * len(field_ids)))), len(field_ids) - 1)
    try:
        from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_val / len(field_ids), random_state=seed)
        tr, va = next(splitter.split(np.zeros(len(field_ids)), y))
        if len(va) == 0 or len(tr) == 0:
            raise ValueError("degenerate split")
    except ValueError:
        perm = np.random.default_rng(seed).permutation(len(field_ids))
        va, tr = perm[:n_val], perm[n_val:]
    val_set = np.zeros(len(field_ids), dtype=bool)
    val_set[va] = True
    is_val = val_set[fidx]
    return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]


def augment_batch(x: Any, augment: Any) -> Any:
    """Random dihedral transforms and per-channel intensity/gamma changes of a batch.

    Parameters
    ----------
    x : tf.Tensor
        (B, S, S, 4) ``float32`` 0-255.
    augment : AugmentConfig
        Which augmentations and how strong.

    Returns
    -------
    tf.Tensor
        The augmented batch, clipped to 0-255. Each sample draws its own transform.
    """
    import tensorflow as tf

    b = tf.shape(x)[0]
    if augment.flips:
        x = tf.where(tf.random.uniform([b, 1, 1, 1]) < 0.5, tf.reverse(x, axis=[2]), x)
        x = tf.where(tf.random.uniform([b, 1, 1, 1]) < 0.5, tf.reverse(x, axis=[1]), x)
    if augment.rotate90:  # with the flips, a transpose makes all 8 rotations/reflections
        x = tf.where(tf.random.uniform([b, 1, 1, 1]) < 0.5, tf.transpose(x, [0, 2, 1, 3]), x)
    if augment.gamma > 0:
        lg = float(np.log1p(augment.gamma))
        g = tf.exp(tf.random.uniform([b, 1, 1, 4], -lg, lg))
        x = 255.0 * tf.pow(tf.clip_by_value(x / 255.0, 0.0, 1.0), g)
    if augment.intensity > 0:
        s = tf.random.uniform([b, 1, 1, 4], 1.0 - augment.intensity, 1.0 + augment.intensity)
        x = x * s
    return tf.clip_by_value(x, 0.0, 255.0)


def make_tf_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    batch_size: int,
    *,
    training: bool,
    augment: Any = None,
    seed: int = 0,
):
    """A ``tf.data`` pipeline over cached crops.

    Parameters
    ----------
    images : numpy.ndarray
        (N, S, S, 4) crops (``uint8`` or ``float32``).
    labels : numpy.ndarray
        (N, 19) targets.
    indices : numpy.ndarray
        Which crops to use.
    batch_size : int
        Batch size.
    training : bool
        Shuffle every epoch and augment (when ``augment`` is given).
    augment : AugmentConfig, optional
        Augmentation settings (training only).
    seed : int
        Shuffle seed.

    Returns
    -------
    tf.data.Dataset
        Batches ``(float32 (B, S, S, 4) 0-255, float32 (B, 19))``, prefetched.
    """
    import tensorflow as tf

    idx = np.asarray(indices, dtype=np.int64)
    size = images.shape[1]
    ds = tf.data.Dataset.from_tensor_slices(idx)
    if training:
        ds = ds.shuffle(len(idx), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def gather(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images[b].astype(np.float32), labels[b].astype(np.float32)

    def load(b):
        x, y = tf.numpy_function(gather, [b], [tf.float32, tf.float32])
        x.set_shape([None, size, size, 4])
        y.set_shape([None, NUM_CLASSES])
        return x, y

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if training and augment is not None:
        ds = ds.map(lambda x, y: (augment_batch(x, augment), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
