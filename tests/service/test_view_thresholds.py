"""Thresholds per view count: a request averaged over n views is called with the set tuned on n-view means."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from locus.service.config import PipelineSettings
from locus.service.factory import build_pipeline
from locus.service.formats import field_answer
from locus.service.manifest import ModelFolderError, load_manifest
from locus.service.pipeline import ClassifyOptions
from tests.conftest import png_uploads


@pytest.fixture(scope="module")
def view_model(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The linear test model with one-view thresholds 0.5, every class called at 8 views and none at 2."""
    folder = tmp_path_factory.mktemp("views") / "m"
    shutil.copytree(test_model_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["view_thresholds"] = {"8": [0.0] * 19, "2": [1.0] * 19}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_manifest_reads_and_falls_back(view_model: Path, test_model_dir: Path) -> None:
    m = load_manifest(view_model)
    assert sorted(m.view_thresholds) == [2, 8]  # JSON keys are strings; the manifest holds view counts
    assert m.thresholds_for(8) == [0.0] * 19 and m.thresholds_for(2) == [1.0] * 19
    assert m.thresholds_for(1) == m.thresholds_for(4) == [0.5] * 19  # no set of its own: the one-view thresholds
    assert load_manifest(test_model_dir).view_thresholds == {}  # older folders have none


@pytest.mark.parametrize(
    ("bad", "message"),
    [({"3": [0.5] * 19}, "2, 4 or 8"), ({"1": [0.5] * 19}, "2, 4 or 8"), ({"8": [0.5] * 18}, "19 numbers")],
)
def test_manifest_refuses_bad_sets(view_model: Path, tmp_path: Path, bad: dict, message: str) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(view_model, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["view_thresholds"] = bad
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match=message):
        load_manifest(folder)


def test_pipeline_calls_with_the_set_of_its_views(view_model: Path, synthetic_field: np.ndarray) -> None:
    pipeline = build_pipeline(PipelineSettings(providers=["CPUExecutionProvider"]), model_dir=view_model)
    try:
        one = pipeline.run(synthetic_field, ClassifyOptions())
        eight = pipeline.run(synthetic_field, ClassifyOptions(tta=8))
        two = pipeline.run(synthetic_field, ClassifyOptions(tta=2))
        four = pipeline.run(synthetic_field, ClassifyOptions(tta=4))
        fixed = pipeline.run(synthetic_field, ClassifyOptions(tta=8, threshold=0.5))
        assert len(one.cells) > 5
        for c1, c8, c2, c4, cf in zip(one.cells, eight.cells, two.cells, four.cells, fixed.cells, strict=True):
            assert c1.labels == [int(k) for k in np.flatnonzero(c1.probabilities >= 0.5)]
            assert c8.labels == list(range(19))  # the 8-view set: 0 for every class
            assert c2.labels == [int(k) for k in np.flatnonzero(c2.probabilities >= 1.0)]
            assert c4.labels == [int(k) for k in np.flatnonzero(c4.probabilities >= 0.5)]  # falls back
            assert cf.labels == [int(k) for k in np.flatnonzero(cf.probabilities >= 0.5)]  # a request's own wins
        # the formats record the thresholds the labels were called with
        answer = field_answer(eight, ClassifyOptions(tta=8), pipeline, image_id="f")
        assert answer.thresholds == [0.0] * 19
        assert field_answer(one, ClassifyOptions(), pipeline, image_id="f").thresholds == [0.5] * 19
    finally:
        pipeline.close()


def test_api_reports_and_uses_the_sets(view_model: Path, synthetic_field: np.ndarray) -> None:
    from locus.service.app import create_app
    from locus.service.settings import Settings

    settings = Settings(model_dir=view_model, providers=["CPUExecutionProvider"], log_json=False)
    with TestClient(create_app(settings)) as client:
        info = client.get("/model").json()
        assert info["view_thresholds"] == {"2": [1.0] * 19, "8": [0.0] * 19}
        assert info["thresholds"] == [0.5] * 19
        got = client.post("/classify", files=png_uploads(synthetic_field), params={"tta": 8})
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["tta"] == 8 and body["threshold"] == "manifest"
        assert all(len(c["labels"]) == 19 for c in body["cells"])
