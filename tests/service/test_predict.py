"""`locus predict`: the service's pipeline over a folder, the competition CSV, resume, and `locus eval` on it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from locus.service.submission import read_submission
from locus.training.sim.generator import SimConfig, write_dataset


@pytest.fixture(scope="module")
def sim_folder(tmp_path_factory):
    return write_dataset(
        tmp_path_factory.mktemp("sim") / "fields", n=3, seed=11, config=SimConfig(size=384), workers=1, progress=False
    )


def _locus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "locus.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_predict_writes_submission_resumes_and_scores(sim_folder, test_model_dir, tmp_path):
    out = tmp_path / "submission.csv"
    r = _locus(
        "predict",
        str(sim_folder),
        "--out",
        str(out),
        "--model",
        str(test_model_dir),
        "--limit",
        "2",
        "--json-dir",
        str(tmp_path / "json"),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    rows = read_submission(out)
    assert sorted(rows) == ["sim_00000", "sim_00001"]
    row = rows["sim_00000"]
    assert (row.width, row.height) == (384, 384)
    body = json.loads((tmp_path / "json" / "sim_00000.json").read_text())
    # every cell appears once per class in the CSV, with the same masks as the JSON answer
    assert len(row.predictions) == 19 * body["cell_count"] > 0
    # run again: the two fields done are kept, only the third is classified
    r = _locus("predict", str(sim_folder), "--out", str(out), "--model", str(test_model_dir), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "1 fields classified" in r.stderr and "2 already in" in r.stderr
    assert sorted(read_submission(out)) == ["sim_00000", "sim_00001", "sim_00002"]
    # the CSV is a valid competition submission: locus eval scores it
    r = _locus("eval", "--truth", str(sim_folder), "--predictions", str(out))
    assert r.returncode == 0, r.stderr
    mean = float(r.stdout.strip().splitlines()[-1].split(":")[1])
    assert 0.0 <= mean <= 1.0


@pytest.mark.parametrize(
    ("option", "env", "setting", "cases"),
    [
        # `--tta 4` gives four views whatever LOCUS_TTA says; `--tta auto` is one view on this CPU host.
        ("tta", "LOCUS_TTA", "2", (("4", 4), ("auto", 1), (None, 2))),
        # `--field-context 0` gives each cell's own scores whatever LOCUS_FIELD_CONTEXT says.
        ("field_context", "LOCUS_FIELD_CONTEXT", "0.5", ((0.0, 0.0), (None, 0.5))),
    ],
)
def test_predict_flag_wins_over_the_setting(
    sim_folder, test_model_dir, tmp_path, monkeypatch, option, env, setting, cases
):
    """A `locus predict` flag overrides its setting for the run; without the flag the setting holds."""
    from locus.service.predict import predict_folder

    monkeypatch.setenv(env, setting)
    for flag, want in cases:
        json_dir = tmp_path / f"json-{flag}"
        predict_folder(
            sim_folder,
            tmp_path / f"s-{flag}.csv",
            model_dir=test_model_dir,
            json_dir=json_dir,
            limit=1,
            progress=False,
            **{option: flag},
        )
        assert json.loads((json_dir / "sim_00000.json").read_text())[option] == want
