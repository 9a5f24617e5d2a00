"""Test-time augmentation: the eight views are the symmetries of the square, scores are their mean, end to end."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from locus.service.config import PipelineSettings
from locus.service.factory import build_pipeline
from locus.service.pipeline import ClassifyOptions
from locus.service.problems import InputError
from locus.service.tta import average_views, check_views, stack_views
from tests.conftest import DEFAULT_MODEL, png_uploads


def _hand_views(crop: np.ndarray) -> list[np.ndarray]:
    """The eight views of one (S, S, C) crop written with numpy's flips and transpose, in the module's order."""
    t = crop.transpose(1, 0, 2)
    return [
        crop,
        np.fliplr(crop),
        np.flipud(crop),
        np.flipud(np.fliplr(crop)),
        t,
        np.fliplr(t),
        np.flipud(t),
        t[::-1, ::-1],
    ]


def test_views_are_the_dihedral_group() -> None:
    rng = np.random.default_rng(0)
    batch = rng.random((3, 8, 8, 2), dtype=np.float32)
    stacked = stack_views(batch, 8)
    assert stacked.shape == (24, 8, 8, 2) and stacked.flags.c_contiguous
    for i in range(3):
        for v, want in enumerate(_hand_views(batch[i])):
            np.testing.assert_array_equal(stacked[v * 3 + i], want)
    # The eight are distinct and are exactly the rotations and their mirror images.
    group = {np.rot90(m, k, axes=(0, 1)).tobytes() for m in (batch[0], np.fliplr(batch[0])) for k in range(4)}
    assert {stacked[v * 3].tobytes() for v in range(8)} == group and len(group) == 8
    # Fewer views are the first ones; one view is the batch itself.
    np.testing.assert_array_equal(stack_views(batch, 4), stacked[:12])
    np.testing.assert_array_equal(stack_views(batch, 2), stacked[:6])
    assert stack_views(batch, 1) is batch


def test_average_views_undoes_the_layout() -> None:
    probs = np.arange(4 * 3 * 2, dtype=np.float32).reshape(12, 2)
    mean = average_views(probs, 4)
    np.testing.assert_allclose(mean, probs.reshape(4, 3, 2).mean(axis=0))
    with pytest.raises(ValueError, match="not 4 views"):
        average_views(probs[:10], 4)


@pytest.mark.parametrize("bad", [0, 3, 16, True, 2.5])
def test_view_counts_are_checked(bad) -> None:
    with pytest.raises(ValueError, match="1, 2, 4, 8"):
        check_views(bad)


def test_settings_default_auto_and_refusal(monkeypatch) -> None:
    monkeypatch.delenv("LOCUS_TTA", raising=False)
    assert PipelineSettings().resolved_tta(on_gpu=False) == 1  # the default, auto: none on a CPU,
    assert PipelineSettings().resolved_tta(on_gpu=True) == 8  # all eight views on a GPU
    monkeypatch.setenv("LOCUS_TTA", "1")
    assert PipelineSettings().resolved_tta(on_gpu=True) == 1
    monkeypatch.setenv("LOCUS_TTA", "4")
    assert PipelineSettings().resolved_tta(on_gpu=False) == 4
    monkeypatch.setenv("LOCUS_TTA", "3")
    with pytest.raises(ValueError, match="LOCUS_TTA"):
        PipelineSettings()


@pytest.fixture(scope="module")
def pipeline():
    p = build_pipeline(PipelineSettings(providers=["CPUExecutionProvider"]), model_dir=DEFAULT_MODEL)
    yield p
    p.close()


def test_pipeline_scores_are_the_mean_over_views(pipeline, synthetic_field) -> None:
    """With the shipped model: tta=8 scores are the mean of the model's scores on each hand-made view."""
    from locus.service.cells import cell_records
    from locus.service.crop import crop_cells

    assert pipeline.tta == 1  # the default on a CPU
    plain = pipeline.run(synthetic_field, ClassifyOptions())
    tta = pipeline.run(synthetic_field, ClassifyOptions(tta=8))
    assert len(plain.cells) == len(tta.cells) > 5
    np.testing.assert_array_equal(plain.cell_labels, tta.cell_labels)  # only the scores change
    ids = [r.id for r in cell_records(plain.cell_labels)]
    _, batch = crop_cells(synthetic_field, plain.cell_labels, pipeline.classifier.crop_rule, ids)
    per_view = np.stack([pipeline.classifier.predict(np.stack([_hand_views(c)[v] for c in batch])) for v in range(8)])
    by_hand = per_view.mean(axis=0)
    got = np.stack([c.probabilities for c in tta.cells])
    np.testing.assert_allclose(got, by_hand, atol=1e-5)
    np.testing.assert_allclose(np.stack([c.probabilities for c in plain.cells]), pipeline.classifier.predict(batch))
    # the views are different inputs: somewhere the model's scores differ between them (a confident model can agree
    # on most cells to 1e-4, so this looks at the spread over views rather than at the mean against one view)
    assert float(np.ptp(per_view, axis=0).max()) > 1e-3


def test_pipeline_refuses_other_view_counts(pipeline) -> None:
    with pytest.raises(InputError, match="tta: 3 views"):
        pipeline.check_options(ClassifyOptions(tta=3))


def test_api_tta_parameter(test_model_dir, synthetic_field) -> None:
    from locus.service.app import create_app
    from locus.service.settings import Settings

    files = png_uploads(synthetic_field)
    settings = Settings(model_dir=test_model_dir, providers=["CPUExecutionProvider"], log_json=False)
    with TestClient(create_app(settings)) as client:
        assert client.get("/model").json()["tta"] == 1
        plain = client.post("/classify", files=files, params={"include_scores": "true"})
        four = client.post("/classify", files=files, params={"include_scores": "true", "tta": 4})
        assert plain.status_code == four.status_code == 200, four.text
        assert plain.json()["tta"] == 1 and four.json()["tta"] == 4
        assert [c["bbox"] for c in plain.json()["cells"]] == [c["bbox"] for c in four.json()["cells"]]
        bad = client.post("/classify", files=files, params={"tta": 3})
        assert bad.status_code == 422
        err = bad.json()["error"]
        assert err["field"] == "tta" and err["code"] == "invalid_parameter"
        assert "1 (none), 2, 4 or 8" in err["message"]
        assert client.post("/classify", files=files).status_code == 200
