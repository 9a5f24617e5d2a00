"""Answers in other tools' formats: every format read back with its own library equals the JSON answer.

The API is asked for the same HPA-sim field as JSON and as each file format; CSV and
Parquet are read with pandas/pyarrow, ``.h5ad`` with ``anndata.read_h5ad``, GeoJSON with
``json`` + shapely, label images with tifffile, and compared cell by cell with the JSON:
same ids, same labels, same scores, areas within 1%. ``locus predict --format`` writes
the same over a folder.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pycocotools import mask as mask_utils

from locus.service.app import create_app
from locus.service.classes import CLASS_NAMES
from locus.service.settings import Settings
from locus.training.sim.generator import SimConfig, generate_field, write_dataset
from tests.conftest import png_uploads

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
ad = pytest.importorskip("anndata")
tifffile = pytest.importorskip("tifffile")
shapely_geometry = pytest.importorskip("shapely.geometry")


def _decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


@pytest.fixture(scope="module")
def client(test_model_dir):
    settings = Settings(model_dir=test_model_dir, providers=["CPUExecutionProvider"], log_json=False)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def sim_files():
    field = generate_field(0, 5, SimConfig(size=320))
    return png_uploads(field.image)


@pytest.fixture(scope="module")
def answer(client, sim_files):
    r = client.post("/classify", files=sim_files, params={"include_scores": "true", "image_id": "sim5"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cell_count"] >= 5
    return body


def _ask(client, files, fmt: str, **params):
    r = client.post("/classify", files=files, params={"output": fmt, "image_id": "sim5", **params})
    assert r.status_code == 200, r.text
    return r


def _check_table(df, body: dict, image_id: str = "sim5") -> None:
    """A per-cell table (pandas) says what the JSON answer says."""
    cells = body["cells"]
    assert list(df["cell_id"]) == [c["id"] for c in cells]
    assert set(df["image_id"]) == {image_id}
    for (_, row), cell in zip(df.iterrows(), cells, strict=True):
        assert row["area"] == cell["area"]
        assert (row["row0"], row["col0"], row["row1"], row["col1"]) == tuple(cell["bbox"].values())
        assert (row["centroid_row"], row["centroid_col"]) == pytest.approx(tuple(cell["centroid"]))
        assert bool(row["touches_border"]) == cell["touches_border"]
        labels = row["labels"] if isinstance(row["labels"], str) else ""
        assert labels == "|".join(lab["name"] for lab in cell["labels"])
        if "nucleus" in cell:
            assert int(row["nucleus_area"]) == cell["nucleus"]["area"]
        else:
            assert pd.isna(row["nucleus_area"])
        assert np.allclose(row[list(CLASS_NAMES)].to_numpy(float), cell["scores"], atol=1e-6)


def test_json_answer_carries_each_cells_nucleus(answer):
    with_nucleus = [c for c in answer["cells"] if "nucleus" in c]
    assert len(with_nucleus) >= len(answer["cells"]) - 1  # HPA-sim cells all have nuclei; the segmenter finds them
    for cell in with_nucleus:
        nucleus = _decode(cell["nucleus"]["mask"])
        assert nucleus.sum() == cell["nucleus"]["area"] > 0
        assert not (nucleus & ~_decode(cell["mask"])).any()  # nucleus k lies inside cell k
        assert cell["nucleus"]["area"] < cell["area"]


def test_csv_and_parquet_tables(client, sim_files, answer):
    r = _ask(client, sim_files, "csv")
    assert r.headers["content-type"].startswith("text/csv")
    assert 'filename="sim5.cells.csv"' in r.headers["content-disposition"]
    _check_table(pd.read_csv(io.BytesIO(r.content)), answer)

    r = _ask(client, sim_files, "parquet")
    assert r.headers["content-type"] == "application/vnd.apache.parquet"
    table = pq.read_table(pa.BufferReader(r.content))
    meta = json.loads(table.schema.metadata[b"locus"])
    assert meta["model"] == answer["model"]
    assert table.schema.field("nucleus_area").type == pa.int64()
    _check_table(table.to_pandas(), answer)


def test_h5ad_is_anndata_with_scores_obs_spatial_and_model(client, sim_files, answer, tmp_path, test_model_dir):
    r = _ask(client, sim_files, "h5ad")
    assert r.headers["content-type"] == "application/x-hdf5"
    path = tmp_path / "cells.h5ad"
    path.write_bytes(r.content)
    adata = ad.read_h5ad(path)
    cells = answer["cells"]
    assert adata.shape == (len(cells), 19)
    assert list(adata.var_names) == list(CLASS_NAMES)
    assert np.allclose(adata.X, np.array([c["scores"] for c in cells]), atol=1e-6)
    _check_table(adata.obs.reset_index(drop=True).join(pd.DataFrame(adata.X, columns=list(CLASS_NAMES))), answer)
    expected_xy = np.array([[c["centroid"][1], c["centroid"][0]] for c in cells])
    assert np.allclose(adata.obsm["spatial"], expected_xy)
    called = adata.layers["called"]
    for i, cell in enumerate(cells):
        assert set(np.flatnonzero(called[i])) == {lab["class_id"] for lab in cell["labels"]}
    uns = adata.uns["locus"]
    assert (uns["model"]["name"], uns["model"]["version"]) == (answer["model"]["name"], answer["model"]["version"])
    manifest = json.loads((test_model_dir / "manifest.json").read_text())
    assert np.allclose(uns["thresholds"], manifest["thresholds"])
    assert np.allclose(adata.var["threshold"], manifest["thresholds"])


def test_geojson_cells_and_nuclei_match_the_json_areas(client, sim_files, answer):
    r = _ask(client, sim_files, "geojson")
    assert r.headers["content-type"] == "application/geo+json"
    collection = json.loads(r.content)
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == len(answer["cells"])
    assert len({f["id"] for f in features}) == len(features)
    for feature, cell in zip(features, answer["cells"], strict=True):
        props = feature["properties"]
        assert props["objectType"] == "cell" and props["locus"]["id"] == cell["id"]
        shape = shapely_geometry.shape(feature["geometry"])
        assert shape.is_valid
        assert shape.area == pytest.approx(cell["area"], rel=0.01)
        # the outline sits on the cell: its bounds are the bbox in (x = column, y = row) pixel corners
        b = cell["bbox"]
        assert shape.bounds == pytest.approx((b["col0"], b["row0"], b["col1"], b["row1"]), abs=0.5)
        names = sorted(lab["name"] for lab in cell["labels"])
        if names:
            assert sorted(props["classification"]["name"].split(": ")) == names
        else:
            assert "classification" not in props
        assert props["measurements"]["Area px"] == cell["area"]
        assert [props["measurements"][f"Score: {n}"] for n in CLASS_NAMES] == pytest.approx(cell["scores"])
        if "nucleus" in cell:
            nucleus = shapely_geometry.shape(feature["nucleusGeometry"])
            assert nucleus.area == pytest.approx(cell["nucleus"]["area"], rel=0.01)
            assert shape.buffer(1e-6).contains(nucleus)
        else:
            assert "nucleusGeometry" not in feature


def test_label_images_share_ids_with_the_json(client, sim_files, answer):
    r = _ask(client, sim_files, "labels")
    assert r.headers["content-type"] == "image/tiff"
    with tifffile.TiffFile(io.BytesIO(r.content)) as tif:
        assert tif.is_ome
        assert "cells" in tif.ome_metadata and "nuclei" in tif.ome_metadata
        stack = tif.asarray()
    assert stack.shape == (2, 320, 320) and stack.dtype == np.uint16
    cells, nuclei = stack
    assert set(np.unique(cells)) - {0} == {c["id"] for c in answer["cells"]}
    for cell in answer["cells"]:
        assert np.array_equal(cells == cell["id"], _decode(cell["mask"]))
        if "nucleus" in cell:
            assert np.array_equal(nuclei == cell["id"], _decode(cell["nucleus"]["mask"]))
        else:
            assert not (nuclei == cell["id"]).any()


def test_accept_header_chooses_the_format(client, sim_files):
    r = client.post("/classify", files=sim_files, headers={"Accept": "application/geo+json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/geo+json"
    r = client.post("/classify", files=sim_files, headers={"Accept": "text/csv;q=0.5, application/json"})
    assert r.status_code == 200 and r.json()["cell_count"] > 0
    r = client.post("/classify", files=sim_files, headers={"Accept": "*/*"})
    assert r.status_code == 200 and "cells" in r.json()


def test_missing_library_gets_406_naming_it(client, sim_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as on a host without the [formats] extra
    r = client.post("/classify", files=sim_files, params={"output": "parquet"})
    assert r.status_code == 406, r.text
    err = r.json()["error"]
    assert err["code"] == "format_unavailable" and err["field"] == "output"
    assert "pyarrow" in err["message"] and "locus[formats]" in err["message"]
    r = client.post("/classify", files=sim_files, headers={"Accept": "application/vnd.apache.parquet"})
    assert r.status_code == 406 and r.json()["error"]["field"] == "accept"
    # formats that need nothing extra still answer
    assert client.post("/classify", files=sim_files, params={"output": "csv"}).status_code == 200


def test_bad_output_value_names_the_option(client, sim_files):
    r = client.post("/classify", files=sim_files, params={"output": "xlsx"})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "output" and "output" in r.json()["error"]["message"]


def test_openapi_documents_the_media_types(client):
    post = client.get("/openapi.json").json()["paths"]["/classify"]["post"]
    content = post["responses"]["200"]["content"]
    for media in ("application/json", "text/csv", "application/vnd.apache.parquet", "application/x-hdf5"):
        assert media in content
    assert {"application/geo+json", "image/tiff"} <= set(content)
    assert "406" in post["responses"]
    output = next(p for p in post["parameters"] if p["name"] == "output")
    assert "h5ad" in json.dumps(output)


@pytest.fixture(scope="module")
def sim_folder(tmp_path_factory):
    return write_dataset(
        tmp_path_factory.mktemp("simf") / "fields", n=2, seed=12, config=SimConfig(size=320), workers=1, progress=False
    )


def _locus(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "locus.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_predict_writes_every_format_for_a_folder(sim_folder, test_model_dir, tmp_path):
    out = tmp_path / "run"
    r = _locus(
        "predict",
        str(sim_folder),
        "--out",
        str(out / "submission.csv"),
        "--model",
        str(test_model_dir),
        "--json-dir",
        str(out / "json"),
        "--format",
        "csv,parquet,h5ad,geojson,labels",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    bodies = {p.stem: json.loads(p.read_text()) for p in sorted((out / "json").glob("*.json"))}
    assert sorted(bodies) == ["sim_00000", "sim_00001"]
    csv_table = pd.read_csv(out / "cells.csv")
    parquet_table = pd.read_parquet(out / "cells.parquet")
    adata = ad.read_h5ad(out / "cells.h5ad")
    for image_id, body in bodies.items():
        _check_table(csv_table[csv_table["image_id"] == image_id].reset_index(drop=True), body, image_id)
        _check_table(parquet_table[parquet_table["image_id"] == image_id].reset_index(drop=True), body, image_id)
        assert adata.obs["image_id"].tolist().count(image_id) == body["cell_count"]
        features = json.loads((out / "geojson" / f"{image_id}.geojson").read_text())["features"]
        assert [f["properties"]["locus"]["id"] for f in features] == [c["id"] for c in body["cells"]]
        stack = tifffile.imread(out / "labels" / f"{image_id}.ome.tif")
        assert set(np.unique(stack[0])) - {0} == {c["id"] for c in body["cells"]}
    assert list(adata.uns["locus"]["images"]) == sorted(bodies)


def test_predict_bad_format_names_the_option(sim_folder, tmp_path):
    r = _locus("predict", str(sim_folder), "--out", str(tmp_path / "s.csv"), "--format", "csv,xlsx")
    assert r.returncode == 2
    assert "--format" in r.stderr and "xlsx" in r.stderr
