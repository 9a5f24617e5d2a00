"""Field context: each cell's scores blended with its field's mean, by hand and end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fastapi.testclient import TestClient

from locus.service.config import PipelineSettings
from locus.service.factory import build_pipeline
from locus.service.field_context import blend_field_context, check_weight
from locus.service.pipeline import ClassifyOptions
from locus.service.problems import InputError
from tests.conftest import DEFAULT_MODEL, png_uploads


def test_blend_by_hand() -> None:
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], np.float32)  # field mean (0.5, 0.5)
    want = np.array([[0.75, 0.25], [0.25, 0.75], [0.5, 0.5]], np.float32)
    np.testing.assert_allclose(blend_field_context(probs, 0.5), want, atol=1e-7)
    np.testing.assert_allclose(blend_field_context(probs, 1.0), np.full((3, 2), 0.5, np.float32), atol=1e-7)
    assert blend_field_context(probs, 0.0) is probs  # each cell's own scores
    one = probs[:1]
    assert blend_field_context(one, 0.7) is one  # a field of one cell has no context


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf, True, "0.5", None])
def test_weights_are_checked(bad) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_weight(bad)


def test_setting_default_and_bounds(monkeypatch) -> None:
    monkeypatch.delenv("LOCUS_FIELD_CONTEXT", raising=False)
    assert PipelineSettings().field_context == 0.0  # each cell's own scores unless asked
    monkeypatch.setenv("LOCUS_FIELD_CONTEXT", "0.5")
    assert PipelineSettings().field_context == 0.5
    monkeypatch.setenv("LOCUS_FIELD_CONTEXT", "1.2")
    with pytest.raises(ValueError, match="field_context"):
        PipelineSettings()


@pytest.fixture(scope="module")
def pipeline():
    p = build_pipeline(PipelineSettings(providers=["CPUExecutionProvider"], field_context=0.5), model_dir=DEFAULT_MODEL)
    yield p
    p.close()


def test_pipeline_blends_the_models_own_scores(pipeline, synthetic_field) -> None:
    """With the shipped model: the blended scores are (own + field mean) / 2, labels follow them, masks do not move."""
    own = pipeline.run(synthetic_field, ClassifyOptions(field_context=0.0))
    blended = pipeline.run(synthetic_field, ClassifyOptions())  # the pipeline's default, 0.5
    assert len(own.cells) == len(blended.cells) > 5
    np.testing.assert_array_equal(own.cell_labels, blended.cell_labels)
    p = np.stack([c.probabilities for c in own.cells])
    q = np.stack([c.probabilities for c in blended.cells])
    np.testing.assert_allclose(q, 0.5 * p + 0.5 * p.mean(axis=0), atol=1e-6)
    thresholds = pipeline.classifier.thresholds
    for cell in blended.cells:
        assert cell.labels == [int(k) for k in np.flatnonzero(cell.probabilities >= thresholds)]
    with pytest.raises(InputError, match="field_context"):
        pipeline.check_options(ClassifyOptions(field_context=2.0))


def test_api_field_context_parameter(test_model_dir, synthetic_field) -> None:
    from locus.service.app import create_app
    from locus.service.settings import Settings

    files = png_uploads(synthetic_field)
    settings = Settings(model_dir=test_model_dir, providers=["CPUExecutionProvider"], log_json=False)
    with TestClient(create_app(settings)) as client:
        assert client.get("/model").json()["field_context"] == 0.0
        own = client.post("/classify", files=files, params={"include_scores": "true"})
        half = client.post("/classify", files=files, params={"include_scores": "true", "field_context": 0.5})
        assert own.status_code == half.status_code == 200, half.text
        assert own.json()["field_context"] == 0.0 and half.json()["field_context"] == 0.5
        p = np.array([c["scores"] for c in own.json()["cells"]])
        q = np.array([c["scores"] for c in half.json()["cells"]])
        np.testing.assert_allclose(q, 0.5 * p + 0.5 * p.mean(axis=0), atol=1e-5)
        bad = client.post("/classify", files=files, params={"field_context": 1.5})
        assert bad.status_code == 422
        err = bad.json()["error"]
        assert err["field"] == "field_context" and err["code"] == "invalid_parameter"
        assert client.post("/classify", files=files).status_code == 200
