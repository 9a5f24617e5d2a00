"""``locus predict --engine ray``: Ray Data gives the same CSV as single-process ``locus predict``.

The fast tests cover the parts that run without a Ray cluster (field lists, one field as an
actor classifies it, the per-cell Parquet writer's resume). The slow ones start a real local
Ray (``ray.init(num_cpus=2, include_dashboard=False)``) and run the actor pool on tiny HPA-sim
fields plus a corrupt field and a field lacking a channel. Ray and pyarrow come with the
``[ray]`` extra (and ``[dev]``); the tests skip with a reason where they are absent.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from locus.service.classes import CHANNELS
from locus.service.encoding import kaggle_to_rle
from locus.service.factory import build_pipeline
from locus.service.predict import predict_folder
from locus.service.submission import read_submission
from locus.training.sim.generator import SimConfig, write_dataset

pa = pytest.importorskip("pyarrow", reason="pyarrow is absent: pip install 'locus[ray]'")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is absent: pip install 'locus[ray]'")

from locus.service import batch_ray  # noqa: E402 - after the skip
from locus.service.batch_ray import (  # noqa: E402
    CellTableWriter,
    FieldError,
    FieldPredictor,
    classify_field,
    list_fields,
    output_paths,
    plan_actors,
    predict_ray,
    read_field_list,
    resolve_field,
)

GOOD = ["sim_00000", "sim_00001", "sim_00002"]


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 256² HPA-sim fields."""
    out = tmp_path_factory.mktemp("sim") / "good"
    return write_dataset(out, n=3, seed=5, config=SimConfig(size=256), workers=1, progress=False)


@pytest.fixture(scope="module")
def mixed_folder(good_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The good fields plus ``bad`` (a corrupt green PNG) and ``gap`` (no yellow file)."""
    folder = tmp_path_factory.mktemp("mixed") / "fields"
    shutil.copytree(good_folder, folder)
    for c in CHANNELS:
        shutil.copy(good_folder / f"sim_00000_{c}.png", folder / f"bad_{c}.png")
        if c != "yellow":
            shutil.copy(good_folder / f"sim_00001_{c}.png", folder / f"gap_{c}.png")
    (folder / "bad_green.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png at all" * 20)
    return folder


@pytest.fixture(scope="module")
def reference_csv(good_folder: Path, test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Single-process ``predict_folder`` on the good fields."""
    out = tmp_path_factory.mktemp("ref") / "reference.csv"
    stats = predict_folder(good_folder, out, model_dir=test_model_dir, progress=False)
    assert stats["done"] == 3
    return out


def _errors(path: Path) -> dict[str, tuple[str, str]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {r["ID"]: (r["stage"], r["reason"]) for r in rows}


def _check_cells_match_csv(cells_dir: Path, csv_path: Path) -> None:
    """Every CSV cell is one table row with the same mask; scores equal the CSV confidences (to 1e-6)."""
    table = pq.read_table(cells_dir).to_pylist()
    keys = [(r["image_id"], r["cell_id"]) for r in table]
    assert len(keys) == len(set(keys)), "a cell appears twice in the table"
    by_field: dict[str, list[dict]] = {}
    for r in table:
        by_field.setdefault(r["image_id"], []).append(r)
    rows = read_submission(csv_path)
    assert sorted(by_field) == sorted(k for k, v in rows.items() if v.predictions)
    for ident, row in rows.items():
        cells = sorted(by_field.get(ident, []), key=lambda r: r["cell_id"])
        assert len(row.predictions) == 19 * len(cells)
        for i, cell in enumerate(cells):
            triples = row.predictions[19 * i : 19 * (i + 1)]
            assert [k for k, _, _ in triples] == list(range(19))
            assert cell["scores"] == pytest.approx([conf for _, conf, _ in triples], abs=1e-6)
            rle = kaggle_to_rle(triples[0][2], row.height, row.width)
            assert rle["counts"] == cell["rle_counts"].encode()
            assert (cell["image_height"], cell["image_width"]) == (row.height, row.width)
            assert cell["row0"] < cell["row1"] and cell["col0"] < cell["col1"] and cell["area"] > 0


# ----------------------------------------------------------------------------- without a Ray cluster
def test_output_paths_sit_beside_the_csv(tmp_path: Path) -> None:
    cells, errors = output_paths(tmp_path / "run" / "submission.csv")
    assert cells == tmp_path / "run" / "submission.cells.parquet"
    assert errors == tmp_path / "run" / "submission.errors.csv"


def test_folder_listing_reports_fields_without_a_channel(mixed_folder: Path) -> None:
    rows, failures = list_fields(mixed_folder)
    assert [r["id"] for r in rows] == ["bad", *GOOD]
    assert rows[1]["red"].endswith("sim_00000_red.png") and rows[1]["prefix"] == ""
    assert [(f.id, f.stage) for f in failures] == [("gap", "list")]
    assert "yellow" in failures[0].reason


def test_field_lists_csv_and_parquet(good_folder: Path, tmp_path: Path) -> None:
    # a CSV of prefixes, relative to the list's folder; IDs from the prefix's file name
    listing = good_folder.parent / "fields.csv"
    listing.write_text("path\n" + "".join(f"{good_folder.name}/{i}\n" for i in GOOD))
    rows = read_field_list(listing)
    assert [r["id"] for r in rows] == GOOD
    assert rows[0]["prefix"] == str(good_folder / "sim_00000")
    ref = resolve_field(rows[0])  # the extension is found on disk
    assert ref.paths["yellow"] == str(good_folder / "sim_00000_yellow.png")
    # a Parquet table of channel paths with an ID column
    table = pa.table(
        {"ID": ["x1"], **{c: [str(good_folder / f"sim_00002_{c}.png")] for c in CHANNELS}},
    )
    pq.write_table(table, tmp_path / "fields.parquet")
    rows = read_field_list(tmp_path / "fields.parquet")
    assert rows == [{"id": "x1", "prefix": "", **{c: str(good_folder / f"sim_00002_{c}.png") for c in CHANNELS}}]
    # IDs from the channel file names when there is no ID column
    (tmp_path / "named.csv").write_text(
        ",".join(CHANNELS) + "\n" + ",".join(str(good_folder / f"sim_00001_{c}.png") for c in CHANNELS) + "\n"
    )
    assert read_field_list(tmp_path / "named.csv")[0]["id"] == "sim_00001"
    # what a person gets wrong, told with the line
    (tmp_path / "dup.csv").write_text("prefix\na/x\nb/x\n")
    with pytest.raises(ValueError, match=r"dup.csv:3: duplicate ID 'x'"):
        read_field_list(tmp_path / "dup.csv")
    (tmp_path / "url.tsv").write_text("Image\nhttps://images.proteinatlas.org/10005/921_B9_1\n")
    with pytest.raises(ValueError, match="URL"):
        read_field_list(tmp_path / "url.tsv")
    (tmp_path / "cols.csv").write_text("file\nx.png\n")
    with pytest.raises(ValueError, match="needs a prefix column"):
        read_field_list(tmp_path / "cols.csv")


def test_resolve_field_names_the_missing_channel(mixed_folder: Path) -> None:
    with pytest.raises(FieldError, match="yellow") as info:
        resolve_field({"id": "gap", "prefix": str(mixed_folder / "gap")})
    assert info.value.stage == "read"


def test_classify_field_as_an_actor_does(mixed_folder: Path, reference_csv: Path, test_model_dir: Path) -> None:
    """One field through the actor's code path: the same submission row; a corrupt file is a record, not a crash."""
    pipeline = build_pipeline(model_dir=test_model_dir)
    rows = {r["id"]: r for r in list_fields(mixed_folder)[0]}
    rec = classify_field(pipeline, rows["sim_00001"])
    assert rec["ok"] and rec["reason"] == ""
    ref = read_submission(reference_csv)["sim_00001"]
    assert (rec["width"], rec["height"]) == (ref.width, ref.height) == (256, 256)
    from locus.service.encoding import parse_prediction_string

    assert parse_prediction_string(rec["prediction_string"]) == ref.predictions
    cells = pa.ipc.open_stream(rec["cells"]).read_all()
    assert cells.num_rows == rec["n_cells"] == len(ref.predictions) // 19 > 0
    bad = classify_field(pipeline, rows["bad"])
    assert not bad["ok"] and bad["stage"] == "read" and "green" in bad["reason"]
    assert bad["prediction_string"] == "" and bad["cells"] == b""


def test_cell_table_writer_drops_rows_of_fields_not_in_the_csv(tmp_path: Path) -> None:
    from locus.service.batch_ray import cell_schema

    def table(ident: str, n: int):
        rows = [
            {
                "image_id": ident,
                "cell_id": k + 1,
                "row0": 0,
                "col0": 0,
                "row1": 2,
                "col1": 2,
                "area": 4,
                "centroid_row": 0.5,
                "centroid_col": 0.5,
                "touches_border": True,
                "scores": [0.5] * 19,
                "labels": [0],
                "image_height": 8,
                "image_width": 8,
                "rle_counts": "0",
            }
            for k in range(n)
        ]
        return pa.Table.from_pylist(rows, schema=cell_schema())

    folder = tmp_path / "cells.parquet"
    w = CellTableWriter(folder, done=set(), resume=True)
    w.write([table("a", 2), table("b", 1)])
    w.write([table("c", 3), table("empty", 0)])
    w.write([table("empty", 0)])  # nothing to write: no part
    assert len(list(folder.glob("part-*.parquet"))) == 2
    # a crash after c's part but before its CSV row: resuming with done = {a, b} drops c's rows
    w = CellTableWriter(folder, done={"a", "b"}, resume=True)
    assert w.dropped == 3
    assert sorted(pq.read_table(folder).column("image_id").to_pylist()) == ["a", "a", "b"]
    # no resume: the table starts empty
    CellTableWriter(folder, done={"a", "b"}, resume=False)
    assert list(folder.glob("*.parquet")) == []


def test_without_ray_the_cli_says_which_extra(tmp_path: Path) -> None:
    """Ray is optional: ``--engine ray`` without it exits 2 with the install command and writes nothing."""
    code = (
        "import sys; sys.modules['ray'] = None\n"  # what an install without the [ray] extra looks like
        "from locus.cli import main\n"
        f"sys.exit(main(['predict', {str(tmp_path)!r}, '--out', {str(tmp_path / 'x.csv')!r}, '--engine', 'ray']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'locus[ray]'" in proc.stderr
    assert not (tmp_path / "x.csv").exists()


def test_plan_actors() -> None:
    assert plan_actors({"CPU": 2.0}) == (2, 1.0, 0.0)
    assert plan_actors({"CPU": 16.0}, cpus_per_actor=4) == (4, 4.0, 0.0)
    assert plan_actors({"CPU": 64.0, "GPU": 8.0}, cpus_per_actor=8) == (8, 8.0, 1.0)  # one actor per GPU
    assert plan_actors({"CPU": 2.0}, actors=1) == (1, 1.0, 0.0)
    assert plan_actors({"CPU": 0.5}) == (1, 1.0, 0.0)
    with pytest.raises(ValueError):
        plan_actors({"CPU": 2.0}, cpus_per_actor=0)


# ----------------------------------------------------------------------------- on a local Ray cluster
@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with two CPUs and no dashboard, shared by the module's Ray tests."""
    ray = pytest.importorskip("ray", reason="Ray is absent: pip install 'locus[ray]' (it is in [dev])")
    pytest.importorskip("ray.data", reason="Ray Data is absent: pip install 'ray[data]'")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_csv_equals_single_process_and_bad_fields_are_error_rows(
    local_ray, mixed_folder: Path, reference_csv: Path, test_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ray.csv"
    stats = predict_ray(mixed_folder, out, model_dir=test_model_dir, actors=2, progress=False)
    assert (stats["fields"], stats["done"], stats["errors"], stats["actors"]) == (5, 3, 2, 2)
    # the same rows as single-process locus predict, for every good field
    assert read_submission(out) == read_submission(reference_csv)
    # the corrupt field and the field without a yellow file are error rows with the reason
    errors = _errors(tmp_path / "ray.errors.csv")
    assert sorted(errors) == ["bad", "gap"]
    assert errors["bad"][0] == "read" and "green" in errors["bad"][1] and "corrupt" in errors["bad"][1]
    assert errors["gap"] == ("list", "missing channel file(s): yellow")
    # the per-cell table holds every cell of the CSV, with the same masks and scores
    _check_cells_match_csv(tmp_path / "ray.cells.parquet", out)
    assert stats["cells"] == pq.read_table(tmp_path / "ray.cells.parquet").num_rows


@pytest.mark.slow
def test_cli_resumes_from_a_field_list_on_a_running_cluster(
    local_ray, good_folder: Path, mixed_folder: Path, reference_csv: Path, test_model_dir: Path, tmp_path: Path
) -> None:
    """``locus predict LIST.csv --engine ray --address ...``: fields in the CSV are skipped, a lost one is redone."""
    out = tmp_path / "sub.csv"
    stats = predict_ray(mixed_folder, out, model_dir=test_model_dir, actors=1, limit=3, progress=False)
    assert stats["done"] == 2 and stats["errors"] == 1  # bad, sim_00000 and sim_00001 (gap is not among them)
    # a crash: the last CSV row was half written, and its cell part had already been written
    text = out.read_text()
    out.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 40])
    listing = tmp_path / "fields.csv"
    listing.write_text("ID,prefix\n" + "".join(f"{i},{mixed_folder / i}\n" for i in [*GOOD, "bad", "gap"]))
    address = local_ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "locus.cli", "predict", str(listing), "--out", str(out), "--engine", "ray"]
    cmd += ["--address", address, "--actors", "1", "--model", str(test_model_dir), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "2 fields classified" in proc.stderr and "1 already in" in proc.stderr, proc.stderr
    assert "2 failed" in proc.stderr
    assert read_submission(out) == read_submission(reference_csv)
    errors = _errors(tmp_path / "sub.errors.csv")
    assert sorted(errors) == ["bad", "gap"] and errors["gap"][0] == "read"
    _check_cells_match_csv(tmp_path / "sub.cells.parquet", out)  # the lost field's old cells were dropped
    # every field done: nothing is classified and no actor starts
    again = predict_ray(good_folder, out, model_dir=test_model_dir, progress=False)
    assert (again["skipped"], again["done"], again["actors"], again["errors"]) == (3, 0, 0, 0)


class CrashingPredictor(FieldPredictor):
    """The real map class, except that its worker process dies on the field ``crash`` (as under the OOM killer)."""

    def __call__(self, batch):  # noqa: D102
        if "crash" in [str(i) for i in batch["id"]]:
            os._exit(1)
        return super().__call__(batch)


@pytest.mark.slow
def test_a_field_that_kills_its_worker_is_an_error_row_and_the_job_goes_on(
    local_ray, good_folder: Path, reference_csv: Path, test_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(batch_ray, "WORKER_RETRIES", 0)  # the default retries twice on a restarted actor
    listing = tmp_path / "fields.csv"
    listing.write_text(
        f"ID,prefix\nsim_00000,{good_folder / 'sim_00000'}\ncrash,{good_folder / 'sim_00001'}\n"
        f"sim_00002,{good_folder / 'sim_00002'}\n"
    )
    out = tmp_path / "sub.csv"
    stats = predict_ray(listing, out, model_dir=test_model_dir, actors=1, progress=False, predictor=CrashingPredictor)
    assert stats["done"] == 2 and stats["errors"] == 1
    reference = read_submission(reference_csv)
    assert read_submission(out) == {k: reference[k] for k in ("sim_00000", "sim_00002")}
    stage, reason = _errors(tmp_path / "sub.errors.csv")["crash"]
    assert stage == "worker" and "died" in reason
