"""BioImage.IO model packages: valid under bioimageio.spec (offline), test tensors from the crop rule, ONNX Runtime
reproduces them; the shipped model's package too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from locus.service.classes import CHANNELS, CLASS_NAMES
from locus.service.crop import CropRule, crop_cells
from locus.training.sim.generator import SimConfig, generate_field
from tests.conftest import DEFAULT_MODEL

pytest.importorskip("bioimageio.spec")

from locus.training.bioimageio_export import (  # noqa: E402
    BioimageioExportError,
    export_bioimageio,
    validate_package,
)

SHIPPED_PACKAGE = DEFAULT_MODEL / "bioimageio"


def _rdf(folder: Path) -> dict:
    return yaml.safe_load((folder / "rdf.yaml").read_text())


def _onnx(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {"image": x})[0]


@pytest.fixture(scope="module")
def package(test_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bioimageio") / "test-linear"
    export_bioimageio(test_model_dir, out)
    return out


def test_package_validates_offline_with_bioimageio_spec(package):
    descr = validate_package(package)
    assert descr.type == "model"
    assert str(descr.format_version).startswith("0.5.")
    assert descr.validation_summary.status != "failed"
    assert descr.weights.onnx is not None
    assert descr.weights.onnx.opset_version == 18  # the test model's opset


def test_rdf_describes_input_crop_rule_channels_and_range(package, test_model_dir):
    rdf = _rdf(package)
    (inp,) = rdf["inputs"]
    assert [a["type"] for a in inp["axes"]] == ["batch", "space", "space", "channel"]
    assert inp["axes"][3]["channel_names"] == list(CHANNELS)
    assert inp["data"] == {"type": "float32", "range": [0.0, 255.0]}
    assert inp["axes"][1]["size"] == inp["axes"][2]["size"] == 32
    (out,) = rdf["outputs"]
    assert len(out["axes"][1]["channel_names"]) == 19
    locus = rdf["config"]["locus"]
    assert locus["class_names"] == list(CLASS_NAMES)
    assert locus["crop"]["size"] == 32 and locus["crop"]["mask_other_cells"] is True
    doc = (package / rdf["documentation"]["source"]).read_text()
    assert "# test-linear" in doc  # the model card
    assert "## Validation" in doc and "crop rule" in doc and "0-255" in doc
    assert (package / "model.onnx").read_bytes() == (test_model_dir / "model.onnx").read_bytes()


def test_test_tensors_come_from_the_crop_rule_and_onnx_runtime_reproduces_them(package):
    rdf = _rdf(package)
    source = rdf["config"]["locus"]["test_tensor_source"]
    x = np.load(package / "test_input.npy")
    y = np.load(package / "test_output.npy")
    assert x.shape == (1, 32, 32, 4) and x.dtype == np.float32 and y.shape == (1, 19)
    # made by the crop rule from the documented HPA-sim field and cell
    field = generate_field(source["index"], source["seed"], SimConfig(size=source["size"]))
    rule = CropRule(**{k: v for k, v in rdf["config"]["locus"]["crop"].items() if k != "function"})
    _, again = crop_cells(field.image, field.cells.astype(np.int32), rule, [source["cell_id"]])
    assert np.array_equal(again, x)
    # and ONNX Runtime, run on the package's weights, gives the test output
    assert np.allclose(_onnx(package / rdf["weights"]["onnx"]["source"], x), y, atol=1e-6)


def test_invalid_model_folder_is_refused(tmp_path):
    with pytest.raises(BioimageioExportError, match="not a valid model folder"):
        export_bioimageio(tmp_path, tmp_path / "out")


def test_shipped_model_package_is_valid_and_current():
    if not (SHIPPED_PACKAGE / "rdf.yaml").is_file():
        pytest.fail(
            f"{SHIPPED_PACKAGE} is missing: run `locus export --bioimageio {SHIPPED_PACKAGE} "
            "--bioimageio-weights reference`"
        )
    validate_package(SHIPPED_PACKAGE)
    rdf = _rdf(SHIPPED_PACKAGE)
    manifest = yaml.safe_load((DEFAULT_MODEL / "manifest.json").read_text())
    assert rdf["version"] == manifest["version"]
    assert rdf["config"]["locus"]["thresholds"] == pytest.approx(manifest["thresholds"])
    assert {k: pytest.approx(v) for k, v in rdf["config"]["locus"]["view_thresholds"].items()} == manifest[
        "view_thresholds"
    ]
    weights = (SHIPPED_PACKAGE / rdf["weights"]["onnx"]["source"]).resolve()
    assert weights == (DEFAULT_MODEL / "model.onnx").resolve()  # referenced, not a second copy
    x = np.load(SHIPPED_PACKAGE / "test_input.npy")
    assert np.allclose(_onnx(weights, x), np.load(SHIPPED_PACKAGE / "test_output.npy"), atol=1e-5)


@pytest.mark.slow
def test_cli_packages_a_model_folder_without_tensorflow(test_model_dir, tmp_path):
    out = tmp_path / "pkg"
    # TensorFlow and Keras made unimportable: packaging a folder must not need them
    code = (
        "import sys; sys.modules['tensorflow'] = sys.modules['keras'] = None; from locus.cli import main; "
        f"sys.exit(main(['export', '--bioimageio', {str(out)!r}, '--model', {str(test_model_dir)!r}]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "validated" in r.stdout
    validate_package(out)
    r = subprocess.run([sys.executable, "-m", "locus.cli", "export"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--bioimageio" in r.stderr
