"""``locus segment``: label images stored beside each field, resumed, and used by training's crop extraction."""

from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np
import pytest

from locus.cli import main
from locus.service.config import PipelineSettings
from locus.service.crop import CropRule
from locus.service.factory import build_segmenter
from locus.service.readers import find_fields, load_field, load_truth
from locus.training.dataset import FieldTask, _crop_field
from locus.training.segment_cache import (
    SEGMENTS_DIR,
    SEGMENTS_FILE,
    label_paths,
    segment_folder,
    segmenter_key,
    stored_cells,
)
from locus.training.sim.generator import SimConfig, write_dataset

SIZE = 256


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg") / "sim"
    write_dataset(root, n=3, seed=3, config=SimConfig(size=SIZE), workers=1, progress=False)
    shutil.rmtree(root / "truth")  # like real data: no ground-truth masks
    return root


@pytest.fixture()
def data(sim_dir, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(sim_dir, out)
    return out


def _task(data, ref, segmenter="classical") -> FieldTask:
    return FieldTask(
        id=ref.id,
        key=ref.id,
        paths=dict(ref.paths),
        root=str(data),
        image_labels=tuple(ref.labels or [0]),
        cell_labels=None,
        rule=CropRule(size=32),
        use_truth=True,
        segmenter=segmenter,
        label_source="image",
        max_cells=None,
        min_area=0,
        seed=0,
        dtype="uint8",
    )


def test_locus_segment_writes_the_segmenters_labels_and_resumes(data, capsys):
    assert main(["segment", str(data), "--quiet"]) == 0
    assert "3 fields segmented" in capsys.readouterr().out
    seg, _ = build_segmenter(PipelineSettings(), "classical")
    meta = json.loads((data / SEGMENTS_DIR / SEGMENTS_FILE).read_text())
    assert meta["segmenter"]["name"] == "classical" and sorted(meta["fields"]) == [r.id for r in find_fields(data)]
    assert json.loads(meta["segmenter"]["config"]) == seg.config.to_dict()  # the options that made the labels
    for ref in find_fields(data):
        want_cells, want_nuclei = seg.segment(load_field(ref))
        cells_path, nuclei_path = label_paths(data, ref.id)
        cells = cv2.imread(str(cells_path), cv2.IMREAD_UNCHANGED)
        nuclei = cv2.imread(str(nuclei_path), cv2.IMREAD_UNCHANGED)
        assert cells.dtype == np.uint16 and nuclei.dtype == np.uint16 and cells.shape == (SIZE, SIZE)
        assert np.array_equal(cells, want_cells) and np.array_equal(nuclei, want_nuclei)
        assert meta["fields"][ref.id]["cells"] == len(np.unique(want_cells)) - 1 > 0
        assert np.array_equal(stored_cells(ref.paths, ref.id, "classical"), want_cells)
    assert not list(data.glob("**/.*")), "temporary files left behind"
    # readers still see exactly the fields, and the segmenter's labels are not taken for ground truth
    assert len(find_fields(data)) == 3
    with pytest.raises(FileNotFoundError):
        load_truth(data, ref.id)

    # a second run does nothing; a changed channel file is segmented again
    meta_mtime = (data / SEGMENTS_DIR / SEGMENTS_FILE).stat().st_mtime_ns
    again = segment_folder(data, progress=False)
    assert (again["segmented"], again["skipped"]) == (0, 3)
    assert (data / SEGMENTS_DIR / SEGMENTS_FILE).stat().st_mtime_ns == meta_mtime  # nothing to do: nothing written
    ref = find_fields(data)[0]
    st = os.stat(ref.paths["green"])
    os.utime(ref.paths["green"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert stored_cells(ref.paths, ref.id, "classical") is None  # stale: not used by training
    again = segment_folder(data, progress=False)
    assert (again["segmented"], again["skipped"]) == (1, 2) and again["seconds_per_field"] > 0
    assert stored_cells(ref.paths, ref.id, "classical") is not None


def test_stored_cells_only_for_the_same_segmenter(data):
    segment_folder(data, progress=False)
    ref = find_fields(data)[0]
    assert stored_cells(ref.paths, ref.id, "classical") is not None
    assert stored_cells(ref.paths, ref.id, "hpacellseg") is None  # another backend's cells are not these
    (data / SEGMENTS_DIR / SEGMENTS_FILE).write_text("{not json")
    assert stored_cells(ref.paths, ref.id, "classical") is None


def test_stored_cells_only_for_the_same_segmenter_options(data, monkeypatch):
    """Labels stored with one classical configuration are not reused under another (LOCUS_CELL_PER_NUCLEUS)."""
    monkeypatch.delenv("LOCUS_CELL_PER_NUCLEUS", raising=False)
    segmenter_key.cache_clear()
    segment_folder(data, progress=False)
    ref = find_fields(data)[0]
    assert stored_cells(ref.paths, ref.id, "classical") is not None
    monkeypatch.setenv("LOCUS_CELL_PER_NUCLEUS", "true")
    segmenter_key.cache_clear()  # settings are read once per process; this test changes them within one
    try:
        assert stored_cells(ref.paths, ref.id, "classical") is None
    finally:
        monkeypatch.delenv("LOCUS_CELL_PER_NUCLEUS")
        segmenter_key.cache_clear()


def test_training_crops_come_from_the_stored_labels(data):
    ref = find_fields(data)[0]
    _, ids, crops, _, _ = _crop_field(_task(data, ref))
    n_segmented = len(ids)
    assert n_segmented > 2
    segment_folder(data, progress=False)
    _, ids, stored_crops, _, _ = _crop_field(_task(data, ref))
    assert np.array_equal(stored_crops, crops)  # stored labels = the segmenter's: the same crops
    # replace the stored cells by two boxes: training must crop exactly those
    cells_path, _ = label_paths(data, ref.id)
    boxes = np.zeros((SIZE, SIZE), np.uint16)
    boxes[20:80, 20:90] = 1
    boxes[120:200, 100:180] = 2
    cv2.imwrite(str(cells_path), boxes)
    _, ids, crops, labels, _ = _crop_field(_task(data, ref))
    assert ids == [1, 2] and crops.shape == (2, 32, 32, 4) and labels.shape == (2, 19)
    # without segments.json the label images are not trusted: training segments again
    (data / SEGMENTS_DIR / SEGMENTS_FILE).unlink()
    _, ids, _, _, _ = _crop_field(_task(data, ref))
    assert len(ids) == n_segmented


def test_locus_segment_parallel_and_bad_input(data, tmp_path, capsys):
    stats = segment_folder(data, workers=2, progress=False)
    assert stats["segmented"] == 3 and not stats["failed"]
    assert main(["segment", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    ref = find_fields(data)[0]
    cv2.imwrite(ref.paths["blue"], np.zeros((SIZE // 2, SIZE // 2), np.uint8))  # channels now differ in size
    stats = segment_folder(data, overwrite=True, progress=False)
    assert list(stats["failed"]) == [ref.id] and "size" in stats["failed"][ref.id]
    assert stats["segmented"] == 2
    assert stored_cells(ref.paths, ref.id, "classical") is None
