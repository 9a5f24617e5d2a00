"""Shared fixtures: the real HPA sample (skipped without ../shared), test model folders, PNG helpers."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from locus.service.classes import CHANNELS
from tests.modelfolder import write_model_folder

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE_DIR = SHARED / "hpa-samples"
SAMPLE_ID = "89_B5_1"
DEFAULT_MODEL = REPO / "models" / "locus-sim-b0"


def png_bytes(arr: np.ndarray) -> bytes:
    """Encode an array as PNG bytes (8- or 16-bit, gray or colour)."""
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def png_uploads(image: np.ndarray) -> dict[str, tuple[str, bytes, str]]:
    """The four channels of an (H, W, 4) field as the multipart files of ``POST /classify`` (PNG, one per channel)."""
    return {c: (f"{c}.png", png_bytes(image[:, :, k]), "image/png") for k, c in enumerate(CHANNELS)}


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real HPA field of view (website JPEGs); skips when ../shared is absent."""
    if not (SAMPLE_DIR / f"{SAMPLE_ID}_red.jpg").is_file():
        pytest.skip(f"real HPA sample not available: {SAMPLE_DIR} is absent (it lives in ../shared beside the repo)")
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def sample_files(sample_dir: Path) -> dict[str, tuple[str, bytes, str]]:
    """The real sample as multipart file tuples."""
    return {
        c: (f"{SAMPLE_ID}_{c}.jpg", (sample_dir / f"{SAMPLE_ID}_{c}.jpg").read_bytes(), "image/jpeg") for c in CHANNELS
    }


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real ONNX model folder (linear classifier) valid under the manifest contract."""
    return write_model_folder(tmp_path_factory.mktemp("model") / "test-linear", input_size=32)


@pytest.fixture(scope="session")
def synthetic_field() -> np.ndarray:
    """A 384x448 uint16 field with a dozen bright cells with nuclei, drawn with OpenCV."""
    rng = np.random.default_rng(7)
    h, w = 384, 448
    img = np.zeros((h, w, 4), np.uint16)
    centers = [(70 + 110 * (i % 4), 70 + 120 * (i // 4)) for i in range(12)]
    for cx, cy in centers:
        cx += int(rng.integers(-8, 8))
        cy += int(rng.integers(-8, 8))
        for ch, r, val in ((0, 44, 9000), (3, 44, 8000), (1, 40, 12000), (2, 18, 30000)):
            layer = img[:, :, ch].copy()
            cv2.circle(layer, (cx, cy), r, val, -1)
            img[:, :, ch] = np.maximum(img[:, :, ch], layer)
    noise = rng.normal(300, 60, size=img.shape).clip(0, None).astype(np.uint16)
    return img + noise


#: Test modules that need TensorFlow for every test (all marked slow): not even imported for ``-m "not slow"``.
_TENSORFLOW_MODULES = frozenset({"test_grad_export.py", "test_model.py"})


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Skip importing the TensorFlow-only modules (5 s of imports) when slow tests are deselected."""
    expr = config.getoption("markexpr") or ""
    if collection_path.name in _TENSORFLOW_MODULES and ("not slow" in expr or "not train" in expr):
        return True
    return None
