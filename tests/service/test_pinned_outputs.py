"""Outputs pinned: the cells, masks and labels of the real sample and of an HPA-sim field do not drift.

Speed work (decoding, segmentation, crops) must leave the answer as it was. The pins in
``tests/data/pinned/*.json`` were first written before the speed work (commit 46aabb2) and re-pinned
once, on purpose, with the gradient cell landscape and model 3.0.0 (the speed work after it was checked
identical against those outputs); each records the model's sha256, and labels are compared only while
the same model answers (a retrained model changes labels on purpose: re-pin with
``LOCUS_REPIN=1 pytest tests/service/test_pinned_outputs.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from locus.service.config import DEFAULT_MODEL_DIR, PipelineSettings
from locus.service.factory import build_pipeline
from locus.service.imaging import load_field
from locus.service.pipeline import ClassifyOptions

DATA = Path(__file__).resolve().parents[1] / "data" / "pinned"
SHARED = Path(__file__).resolve().parents[3] / "shared"
FIELDS = {
    "sim384": {c: DATA / f"sim384_{c}.png" for c in ("red", "green", "blue", "yellow")},
    "89_B5_1": {c: SHARED / "hpa-samples" / f"89_B5_1_{c}.jpg" for c in ("red", "green", "blue", "yellow")},
}


@pytest.fixture(scope="module")
def pipeline():
    return build_pipeline(PipelineSettings(providers=["CPUExecutionProvider"]), model_dir=DEFAULT_MODEL_DIR)


def _answer(pipeline, paths: dict) -> dict:
    result = pipeline.run(load_field(paths), ClassifyOptions(include_masks=True, include_scores=True))
    return {
        "model_sha256": pipeline.classifier.manifest.files["model.onnx"],
        "cells": [
            {
                "id": c.record.id,
                "bbox": list(c.record.bbox),
                "area": c.record.area,
                "mask": c.mask["counts"],
                "labels": sorted(c.labels),
                "scores": [round(float(p), 4) for p in c.probabilities],
            }
            for c in result.cells
        ],
    }


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_cells_masks_and_labels_are_pinned(pipeline, name: str) -> None:
    paths = FIELDS[name]
    if not all(p.is_file() for p in paths.values()):
        pytest.skip(f"{name}: the real sample is not here (../shared/hpa-samples is absent in a fresh clone)")
    pin = DATA / f"{name}.json"
    got = _answer(pipeline, paths)
    if os.environ.get("LOCUS_REPIN") == "1" or not pin.is_file():
        pin.write_text(json.dumps(got, indent=1) + "\n", encoding="utf-8")
        if not os.environ.get("LOCUS_REPIN"):
            pytest.fail(f"{pin} was missing and has been written; commit it")
    want = json.loads(pin.read_text(encoding="utf-8"))
    seg = [(c["id"], c["bbox"], c["area"], c["mask"]) for c in got["cells"]]
    assert seg == [(c["id"], c["bbox"], c["area"], c["mask"]) for c in want["cells"]], "cells or masks changed"
    if got["model_sha256"] == want["model_sha256"]:
        assert [c["labels"] for c in got["cells"]] == [c["labels"] for c in want["cells"]]
        for a, b in zip(got["cells"], want["cells"], strict=True):
            assert max(abs(x - y) for x, y in zip(a["scores"], b["scores"], strict=True)) <= 2e-4
