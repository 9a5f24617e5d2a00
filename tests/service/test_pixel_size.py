"""The ``pixel_size`` option: images at another scale are resampled for segmentation and cropping only.

Masks, boxes and areas come back at the image's full resolution and agree with those of the unscaled field;
without the option nothing is resampled; a model folder that records no training pixel size refuses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pycocotools import mask as mask_utils

from locus.service.app import create_app
from locus.service.config import PipelineSettings
from locus.service.factory import build_pipeline
from locus.service.manifest import load_manifest
from locus.service.metric import label_iou
from locus.service.pipeline import ClassifyOptions, labels_to_shape, resample_to_model
from locus.service.settings import Settings
from locus.training.sim.generator import SimConfig, generate_field
from tests.conftest import png_uploads
from tests.modelfolder import write_model_folder

#: The image's pixel size; the model records twice that, so a request with it is downscaled by 2.
IMAGE_UM = 0.2
MODEL_UM = 0.4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny, linear) ONNX model folder whose manifest records a training pixel size."""
    folder = write_model_folder(tmp_path_factory.mktemp("px") / "model", input_size=32)
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    data["pixel_size"] = MODEL_UM
    path.write_text(json.dumps(data, indent=2))
    assert load_manifest(folder).pixel_size == MODEL_UM
    return folder


@pytest.fixture(scope="module")
def field():
    """An HPA-sim field of 512² with cells about 130 px across (65 px once downscaled by 2), few touching."""
    return generate_field(1, 31337, SimConfig(size=512, cell_diameter_px=130.0, n_cells=(8, 14)))


def test_resampling_helpers_keep_shape_and_dtype():
    img = np.random.default_rng(0).integers(0, 65535, (100, 60, 4), dtype=np.uint16)
    assert resample_to_model(img, None, MODEL_UM) is img
    half = resample_to_model(img, IMAGE_UM, MODEL_UM)
    assert half.shape == (50, 30, 4) and half.dtype == np.uint16
    assert resample_to_model(img, MODEL_UM, MODEL_UM) is img
    labels = np.zeros((50, 30), np.int32)
    labels[10:20, 5:15] = 7
    full = labels_to_shape(labels, (100, 60))
    assert full.shape == (100, 60) and set(np.unique(full)) == {0, 7}
    assert (full == 7).sum() == 4 * (labels == 7).sum()


def test_masks_at_full_resolution_agree_with_the_unscaled_ones(model_dir: Path, field):
    pipeline = build_pipeline(PipelineSettings(), model_dir=model_dir, segmenter="classical")
    try:
        plain = pipeline.run(field.image, ClassifyOptions(include_masks=False))
        scaled = pipeline.run(field.image, ClassifyOptions(include_masks=True, pixel_size=IMAGE_UM))
    finally:
        pipeline.close()
    h, w = field.cells.shape
    assert scaled.cell_labels.shape == (h, w) and scaled.height == h and scaled.width == w
    assert len(plain.cells) >= 5
    # every mask is a full-resolution RLE; areas and boxes are full-resolution numbers
    for cell in scaled.cells:
        m = mask_utils.decode(cell.mask)
        assert m.shape == (h, w)
        assert int(m.sum()) == cell.record.area
    a_ids, b_ids, iou = label_iou(plain.cell_labels, scaled.cell_labels)
    best = iou.max(axis=1)
    # every cell found at full scale is found again at half scale, with IoU >= 0.9 at full resolution
    assert len(b_ids) == len(a_ids)
    assert best.min() >= 0.9, f"IoU per cell: {np.round(np.sort(best), 3)}"


def test_crowded_field_masks_mostly_agree(model_dir: Path):
    """Touching cells: the segmenter may place a shared border differently at half scale, most cells agree."""
    crowded = generate_field(3, 31337, SimConfig(size=512, cell_diameter_px=130.0))
    pipeline = build_pipeline(PipelineSettings(), model_dir=model_dir, segmenter="classical")
    try:
        plain = pipeline.run(crowded.image, ClassifyOptions(include_masks=False))
        scaled = pipeline.run(crowded.image, ClassifyOptions(include_masks=False, pixel_size=IMAGE_UM))
    finally:
        pipeline.close()
    _, _, iou = label_iou(plain.cell_labels, scaled.cell_labels)
    best = iou.max(axis=1)
    assert len(best) >= 8
    assert np.median(best) >= 0.9 and (best >= 0.8).mean() >= 0.8, np.round(np.sort(best), 3)


def test_without_pixel_size_nothing_is_resampled(model_dir: Path, field):
    pipeline = build_pipeline(PipelineSettings(), model_dir=model_dir, segmenter="classical")
    try:
        a = pipeline.run(field.image, ClassifyOptions(include_masks=False))
        b = pipeline.run(field.image, ClassifyOptions(include_masks=False, pixel_size=MODEL_UM))
    finally:
        pipeline.close()
    # the model's own pixel size is a no-op: identical segmentation and probabilities
    assert np.array_equal(a.cell_labels, b.cell_labels)
    np.testing.assert_array_equal(
        np.stack([c.probabilities for c in a.cells]), np.stack([c.probabilities for c in b.cells])
    )


def test_api_pixel_size(model_dir: Path, test_model_dir: Path, field):
    settings = Settings(model_dir=model_dir, providers=["CPUExecutionProvider"], log_json=False)
    with TestClient(create_app(settings)) as client:
        assert client.get("/model").json()["input"]["pixel_size"] == MODEL_UM
        r = client.post("/classify", files=png_uploads(field.image), params={"pixel_size": IMAGE_UM})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["cells"]
        for cell in body["cells"]:
            assert cell["mask"]["size"] == list(field.cells.shape)
        bad = client.post("/classify", files=png_uploads(field.image), params={"pixel_size": -1})
        assert bad.status_code == 422
    # a model folder without a training pixel size refuses the option, naming it
    settings = Settings(model_dir=test_model_dir, providers=["CPUExecutionProvider"], log_json=False)
    with TestClient(create_app(settings)) as client:
        r = client.post("/classify", files=png_uploads(field.image), params={"pixel_size": IMAGE_UM})
        assert r.status_code == 422
        assert r.json()["error"]["field"] == "pixel_size"


def test_locus_predict_pixel_size(model_dir: Path, field, tmp_path: Path):
    from locus.service.predict import predict_folder
    from locus.service.submission import read_submission

    folder = tmp_path / "fields"
    folder.mkdir()
    import cv2

    for k, c in enumerate(("red", "green", "blue", "yellow")):
        cv2.imwrite(str(folder / f"f1_{c}.png"), field.image[:, :, k])
    out = tmp_path / "sub.csv"
    stats = predict_folder(folder, out, model_dir=model_dir, pixel_size=IMAGE_UM, progress=False)
    assert stats["done"] == 1 and stats["cells"] >= 5
    row = read_submission(out)["f1"]
    assert (row.height, row.width) == field.cells.shape


def _match(pred: np.ndarray, truth: np.ndarray) -> dict[int, int]:
    """Predicted cell id -> the truth cell it overlaps with IoU >= 0.6."""
    p_ids, t_ids, iou = label_iou(pred, truth)
    out = {}
    for i, k in enumerate(p_ids):
        j = int(iou[i].argmax()) if iou.shape[1] else -1
        if j >= 0 and iou[i, j] >= 0.6:
            out[int(k)] = int(t_ids[j])
    return out


@pytest.mark.slow
def test_shipped_model_calls_the_truth_at_2048_through_the_api():
    """The default model on a fresh HPA-sim seed at 2048² (cells ~320 px), as a user sends it, with and without
    the field's pixel size: the top class is a true class of the cell on at least 80% of the matched cells."""
    from locus.service.settings import DEFAULT_MODEL_DIR
    from locus.training.sim.generator import REF_PIXEL_SIZE_UM

    if not (DEFAULT_MODEL_DIR / "manifest.json").is_file():
        pytest.skip(f"default model not present at {DEFAULT_MODEL_DIR}")
    fields = [generate_field(i, 777_001, SimConfig(size=2048)) for i in range(2)]
    settings = Settings(providers=["CPUExecutionProvider"], log_json=False)
    with TestClient(create_app(settings)) as client:
        variants = [{}]
        if load_manifest(DEFAULT_MODEL_DIR).pixel_size is not None:
            variants.append({"pixel_size": REF_PIXEL_SIZE_UM})
        for params in variants:
            hits = total = 0
            for f in fields:
                r = client.post("/classify", files=png_uploads(f.image), params={"include_scores": "true", **params})
                assert r.status_code == 200, r.text
                pred = np.zeros(f.cells.shape, np.int32)
                cells = r.json()["cells"]
                for cell in cells:
                    m = mask_utils.decode({"size": cell["mask"]["size"], "counts": cell["mask"]["counts"].encode()})
                    pred[m.astype(bool)] = cell["id"]
                match = _match(pred, f.cells)
                for cell in cells:
                    t = match.get(cell["id"])
                    if t is not None:
                        total += 1
                        hits += int(np.argmax(cell["scores"])) in f.cell_labels[t]
            assert total >= 25, f"segmentation matched only {total} cells ({params})"
            assert hits / total >= 0.8, f"top class right on {hits}/{total} cells ({params})"
