"""The shipped default model, served as a user would meet it: valid folder, sensible calls, attributions."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from locus.service.app import create_app
from locus.service.attribution import decode_map
from locus.service.classes import NEGATIVE
from locus.service.manifest import load_manifest
from locus.service.settings import DEFAULT_MODEL_DIR, Settings
from locus.training.sim.generator import SimConfig, generate_field
from tests.conftest import png_uploads

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "manifest.json").is_file(), reason=f"default model not present at {DEFAULT_MODEL_DIR}"
)


@pytest.fixture(scope="module")
def client():
    settings = Settings(providers=["CPUExecutionProvider"], log_json=False)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def fields():
    # Held-out seed: the default model never saw these fields. Eight fields (about 200 cells), not three: one field
    # of one class can sway three. On HPA-sim 2.9 the third field (plasma membrane) reads right on 4 of its 32 cells
    # with model 3.6.0, so the first three gave 55 of 84 (0.65)
    # while the eight give 157 of 196 (0.80), as 3.6.0's 0.88 top-1 on the 48 held-out 2.9 fields at 512² says.
    return [generate_field(i, 424242, SimConfig(size=512)) for i in range(8)]


def _match(pred_labels: np.ndarray, true_labels: np.ndarray, cell_id: int) -> int | None:
    """The true cell that a predicted cell overlaps with IoU >= 0.6, if any."""
    m = pred_labels == cell_id
    ids, counts = np.unique(true_labels[m], return_counts=True)
    best = None
    for t, inter in zip(ids, counts, strict=True):
        if t == 0:
            continue
        union = m.sum() + (true_labels == t).sum() - inter
        if inter / union >= 0.6:
            best = int(t)
    return best


def test_default_model_folder_is_valid_and_ships_a_gradient_model():
    manifest = load_manifest(DEFAULT_MODEL_DIR)
    assert manifest.grad is not None
    assert (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text().lower().count("synthetic") >= 1
    assert "heldout" in str(manifest.training).lower() or "held_out" in str(manifest.training).lower()


def test_calls_match_the_truth_on_held_out_hpa_sim_fields(client, fields):
    from pycocotools import mask as mask_utils

    hits = total = 0
    for f in fields:
        body = client.post("/classify", files=png_uploads(f.image), params={"include_scores": "true"}).json()
        pred = np.zeros(f.cells.shape, np.int32)
        for cell in body["cells"]:
            m = mask_utils.decode({"size": cell["mask"]["size"], "counts": cell["mask"]["counts"].encode()})
            pred[m.astype(bool)] = cell["id"]
        for cell in body["cells"]:
            t = _match(pred, f.cells, cell["id"])
            if t is None:
                continue
            total += 1
            top = int(np.argmax(cell["scores"]))
            hits += top in f.cell_labels[t]
    assert total >= 40, "segmentation matched too few cells"
    # the most confident class of a cell is one of its true classes for most cells
    assert hits / total >= 0.7, f"top-1 correct on {hits}/{total} cells"


@pytest.mark.slow
def test_attributions_decode_to_the_cell_box_and_converge(client):
    # The service's default 64 steps, refined where a map misses the 5 % completeness tolerance (LOCUS_IG_TOLERANCE):
    # a confident model's probability can rise over a short stretch of the path (model 3.2.0: median error 0.14 on this
    # field at a fixed 64 steps); refined, every map meets 5 % or reached the 512-step ceiling.
    f = generate_field(0, 424242, SimConfig(size=256))
    params = {"attributions": "true", "include_masks": "false", "ig_steps": "64"}
    r = client.post("/classify", files=png_uploads(f.image), params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    errors = []
    for cell in body["cells"]:
        assert len(cell["attributions"]) == len(cell["labels"])
        b = cell["bbox"]
        for a in cell["attributions"]:
            arr = decode_map(a["map"])
            assert arr.shape == (b["row1"] - b["row0"], b["col1"] - b["col0"])
            assert a["class_id"] in {lab["class_id"] for lab in cell["labels"]}
            errors.append(a["completeness_error"])
            assert a["steps"] in (64, 128, 256, 512)
            assert a["completeness_error"] <= 0.05 or a["steps"] == 512, a
    assert errors
    assert float(np.median(errors)) < 0.05
    assert "attribute" in body["timings_ms"]


def test_ig_tolerance_zero_keeps_the_asked_steps_and_out_of_range_is_refused(client):
    f = generate_field(1, 424242, SimConfig(size=256))
    params = {"attributions": "true", "include_masks": "false", "ig_steps": "4", "ig_tolerance": "0"}
    body = client.post("/classify", files=png_uploads(f.image), params=params).json()
    maps = [a for cell in body["cells"] for a in cell["attributions"]]
    assert maps and all(a["steps"] == 4 for a in maps)
    r = client.post("/classify", files=png_uploads(f.image), params={**params, "ig_tolerance": "1.5"})
    assert r.status_code == 422 and "ig_tolerance" in r.text
    assert client.post("/classify", files=png_uploads(f.image)).status_code == 200


@pytest.mark.slow
def test_nucleoli_attribution_lights_up_the_nucleus(client):
    """A biologist's check: for a nucleoli call, the positive attribution sits in the nucleus.

    Per cell, the positive attribution per pixel in the nucleus over that in the rest of the cell: for nucleoli it
    is above 1 in most cells, and above what the same cells' cytosol maps show (a cytoplasmic class, as the
    control). Default model 3.1.0 on these cells: nucleoli median 1.53 (every cell above 1), cytosol 0.91; 3.0.0
    had 2.98 and 1.26 (its nucleoli maps were more nuclear: 43% of the positive mass in the nucleus against 30%, the
    nucleus being 23% of the cell's area).
    """
    nucleoli, cytosol = [], []
    for i in range(60):
        f = generate_field(i, 777, SimConfig(size=512))
        targets = [c for c, labs in f.cell_labels.items() if 2 in labs]
        if not targets:
            continue
        body = client.post(
            "/classify",
            files=png_uploads(f.image),
            params={"attributions": "true", "attribution_classes": "2,16", "include_masks": "false", "ig_steps": "32"},
        ).json()
        for cell in body["cells"]:
            b = cell["bbox"]
            box_true = f.cells[b["row0"] : b["row1"], b["col0"] : b["col1"]]
            ids, counts = np.unique(box_true[box_true > 0], return_counts=True)
            if not len(ids) or int(ids[np.argmax(counts)]) not in targets:
                continue
            tid = int(ids[np.argmax(counts)])
            maps = {a["class_id"]: np.clip(decode_map(a["map"]), 0, None) for a in cell["attributions"]}
            nucleus = f.nuclei[b["row0"] : b["row1"], b["col0"] : b["col1"]] == tid
            cytoplasm = (box_true == tid) & ~nucleus
            if maps[2].sum() > 0 and maps[16].sum() > 0 and nucleus.any() and cytoplasm.any():
                nucleoli.append(maps[2][nucleus].mean() / max(maps[2][cytoplasm].mean(), 1e-12))
                cytosol.append(maps[16][nucleus].mean() / max(maps[16][cytoplasm].mean(), 1e-12))
        if len(nucleoli) >= 8:
            break
    assert len(nucleoli) >= 4, "too few nucleoli cells found"
    detail = f"nucleus / cytoplasm attribution density, nucleoli: {nucleoli}; cytosol: {cytosol}"
    assert np.mean(np.asarray(nucleoli) > 1.0) >= 0.75, detail
    assert float(np.median(nucleoli)) > 1.25, detail
    assert float(np.median(nucleoli)) > float(np.median(cytosol)), detail


def test_a_request_without_attributions_pays_nothing(tmp_path):
    settings = Settings(providers=["CPUExecutionProvider"], log_json=False)
    with TestClient(create_app(settings)) as c:
        f = generate_field(0, 5, SimConfig(size=384))
        body = c.post("/classify", files=png_uploads(f.image)).json()
        state = c.app.state.locus
        assert state.classifier._grad_session is None, "the gradient model was loaded without being asked for"
        assert "attribute" not in body["timings_ms"]
        assert all("attributions" not in cell for cell in body["cells"])


@pytest.mark.slow
def test_negative_cells_are_called_negative(client):
    hits = total = 0
    for i in range(8):
        f = generate_field(i, 31337, SimConfig(size=512))
        if not any(labs == [NEGATIVE] for labs in f.cell_labels.values()):
            continue
        body = client.post("/classify", files=png_uploads(f.image), params={"include_scores": "true"}).json()
        from pycocotools import mask as mask_utils

        pred = np.zeros(f.cells.shape, np.int32)
        for cell in body["cells"]:
            pred[
                mask_utils.decode({"size": cell["mask"]["size"], "counts": cell["mask"]["counts"].encode()}).astype(
                    bool
                )
            ] = cell["id"]
        for cell in body["cells"]:
            t = _match(pred, f.cells, cell["id"])
            if t is not None and f.cell_labels[t] == [NEGATIVE]:
                total += 1
                hits += int(np.argmax(cell["scores"])) == NEGATIVE
    assert total >= 3
    assert hits / total >= 0.6, f"negative called on {hits}/{total} negative cells"
