"""Train/serve parity of crops: the training dataset's tensors equal the service's, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from locus.service.cells import cell_records
from locus.service.crop import crop_cells
from locus.service.manifest import CropSpec
from locus.service.readers import find_fields, load_field, load_truth, read_cell_labels
from locus.service.segmentation import make_segmenter
from locus.training.config import TrainConfig
from locus.training.dataset import build_crops, split_by_image
from locus.training.sim.generator import SimConfig, write_dataset


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sim")
    write_dataset(root, n=4, seed=3, config=SimConfig(size=256), workers=1, progress=False)
    return root


def _config(sim_dir: Path, tmp: Path, **kw) -> TrainConfig:
    base = {
        "train_dirs": [str(sim_dir)],
        "input_size": 40,
        "out": str(tmp),
        "workers": 1,
        "cache": False,
        "cache_dtype": "float32",
        "label_source": "cell",
    }
    base.update(kw)
    return TrainConfig(**base)


def _service_rule(config: TrainConfig):
    """The rule the service will use: the manifest's crop spec, as export writes it."""
    r = config.crop_rule()
    return CropSpec(size=r.size, padding=r.padding, mask_other_cells=r.mask_other_cells, min_side=r.min_side).rule()


def test_truth_mask_crops_identical_to_service(sim_dir, tmp_path):
    config = _config(sim_dir, tmp_path)
    crops = build_crops(config, progress=False)
    rule = _service_rule(config)
    assert rule == config.crop_rule()
    cell_table = read_cell_labels(sim_dir)
    n = 0
    for ref in find_fields(sim_dir):
        image = load_field(ref)
        truth = load_truth(sim_dir, ref.id)
        labels = truth.cells.astype(np.int32)
        ids = [r.id for r in cell_records(labels)]
        _, expected = crop_cells(image, labels, rule, ids)
        sel = crops.fields == ref.id
        assert crops.cells[sel].tolist() == ids
        assert crops.images.dtype == np.float32
        np.testing.assert_array_equal(crops.images[sel], expected)
        # labels: per-cell truth
        for cid, row in zip(crops.cells[sel], crops.labels[sel], strict=True):
            assert sorted(np.nonzero(row)[0].tolist()) == cell_table[ref.id][int(cid)]
        n += len(ids)
    assert n == len(crops) > 0


def test_segmenter_crops_identical_to_service_pipeline(sim_dir, tmp_path):
    config = _config(sim_dir, tmp_path, use_truth_masks=False, label_source="image")
    crops = build_crops(config, progress=False)
    rule = _service_rule(config)
    seg = make_segmenter("classical")
    refs = find_fields(sim_dir)
    for ref in refs:
        image = load_field(ref)
        cells, _ = seg.segment(image)  # what locus.service.pipeline.Pipeline.run does
        ids = [r.id for r in cell_records(cells)]
        _, expected = crop_cells(image, cells, rule, ids)
        sel = crops.fields == ref.id
        assert crops.cells[sel].tolist() == ids
        np.testing.assert_array_equal(crops.images[sel], expected)
        # weak labels: each cell inherits its image's labels
        for row in crops.labels[sel]:
            assert sorted(np.nonzero(row)[0].tolist()) == ref.labels
    assert crops.info["masks"] == {"segmenter": len(refs)}


def test_uint8_cache_rounds_within_half_a_level_and_reloads(sim_dir, tmp_path):
    exact = build_crops(_config(sim_dir, tmp_path), progress=False)
    cfg = _config(sim_dir, tmp_path, cache=True, cache_dtype="uint8", workers=2)
    first = build_crops(cfg, progress=False)
    assert first.images.dtype == np.uint8 and not first.info["cache_hit"]
    assert np.abs(first.images.astype(np.float32) - exact.images).max() <= 0.5
    again = build_crops(cfg, progress=False)
    assert again.info["cache_hit"]
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert again.fields.tolist() == first.fields.tolist()


def test_split_by_image_keeps_fields_whole(sim_dir, tmp_path):
    pytest.importorskip("iterstrat", reason="the multilabel-stratified split comes with the [train] extra")
    crops = build_crops(_config(sim_dir, tmp_path, max_cells_per_field=5), progress=False)
    assert max(np.unique(crops.fields, return_counts=True)[1]) <= 5
    tr, va = split_by_image(crops, 0.25, seed=0)
    assert len(tr) and len(va) and len(tr) + len(va) == len(crops)
    assert not set(crops.fields[tr]) & set(crops.fields[va])


def test_threaded_crops_equal_one_by_one(sim_dir):
    """Cropping a field's cells over several threads gives each cell's own crop, in order."""
    from locus.service.crop import CropRule, crop_cell

    ref = find_fields(sim_dir)[0]
    image = load_field(ref)
    labels = load_truth(sim_dir, ref.id).cells.astype(np.int32)
    rule = CropRule(size=32)
    ids, batch = crop_cells(image, labels, rule)
    assert len(ids) >= 8, "enough cells to be shared out"
    for k, cid in enumerate(ids):
        np.testing.assert_array_equal(batch[k], crop_cell(image, labels, cid, rule))
