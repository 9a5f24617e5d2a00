"""Tests of ``locus hpa-export``: a stand-in torch U-Net, pickled whole like HPA's networks, -> ONNX.

torch is optional (the [hpa] extra, never in CI's install): the whole module is
skipped with a reason where it is absent.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the optional [hpa] extra); export not tested")
nn = torch.nn

from locus.service.segmentation.hpa import HpaSegmenter  # noqa: E402
from locus.training import hpa_export  # noqa: E402
from locus.training.hpa_export import ExportError, check_parity, convert, export_network  # noqa: E402


class TinyUNet(nn.Module):
    """A U-Net with HPA's contract: [N, 3, H, W] -> [N, 3, H, W] logits; five stride-2 levels (H, W % 32 == 0)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.down = nn.ModuleList([nn.Conv2d(width, width, 3, stride=2, padding=1) for _ in range(5)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(width, width, 2, stride=2) for _ in range(5)])
        self.head = nn.Conv2d(width, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        skips = []
        for conv in self.down:
            skips.append(h)
            h = torch.relu(conv(h))
        for deconv, skip in zip(self.up, reversed(skips), strict=True):
            h = torch.relu(deconv(h)) + skip
        return self.head(h)


@pytest.fixture(scope="module")
def pickled_nets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the two official file names holding whole pickled stand-in modules (one DataParallel)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hpa_weights")
    torch.save(TinyUNet(), d / "dpn_unet_nuclei_v1.pth")
    torch.save(nn.DataParallel(TinyUNet()), d / "dpn_unet_cell_3ch_v1.pth")  # HPA saved some wrapped
    return d


def test_convert_matches_torch_with_dynamic_shapes(pickled_nets: Path, tmp_path: Path) -> None:
    report = convert(pickled_nets / "dpn_unet_nuclei_v1.pth", tmp_path / "nuclei.onnx", network="nuclei")
    assert report.ok and report.max_abs_diff <= 1e-4 and report.opset == 17
    assert report.checked_shapes == [[1, 3, 256, 256], [2, 3, 192, 320]]
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(tmp_path / "nuclei.onnx"))
    assert model.opset_import[0].version == 17
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))
    sess = ort.InferenceSession(str(tmp_path / "nuclei.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": np.zeros((3, 3, 64, 96), np.float32)})[0]
    assert out.shape == (3, 3, 64, 96)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)  # softmax probabilities


def test_parity_check_catches_a_wrong_export(pickled_nets: Path, tmp_path: Path) -> None:
    module = hpa_export.load_pickled_module(pickled_nets / "dpn_unet_nuclei_v1.pth")
    path = export_network(module, tmp_path / "n.onnx")
    other = TinyUNet()  # different weights: the check must see it
    diff, _ = check_parity(other, path)
    assert diff > 1e-3


def test_missing_weights_and_non_module_files(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        hpa_export.load_pickled_module(tmp_path / "nope.pth")
    torch.save({"state": 1}, tmp_path / "dict.pth")
    with pytest.raises(ExportError, match="not a whole torch module"):
        hpa_export.load_pickled_module(tmp_path / "dict.pth")


def test_cli_exports_both_and_the_hpa_backend_runs_them(pickled_nets: Path, tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    hpa_export.configure_parser(parser)
    out = tmp_path / "onnx"
    args = parser.parse_args(["--weights-dir", str(pickled_nets), "--out-dir", str(out)])
    assert hpa_export.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    reports = [json.loads(line) for line in lines[:2]]
    assert [r["network"] for r in reports] == ["nuclei", "cell"]
    assert all(r["max_abs_diff"] <= 1e-4 for r in reports)
    assert "LOCUS_HPA_NUCLEI_MODEL=" in lines[2]
    seg = HpaSegmenter(
        out / "dpn_unet_nuclei_v1.onnx", out / "dpn_unet_cell_3ch_v1.onnx", providers=["CPUExecutionProvider"]
    )
    img = np.random.default_rng(0).integers(0, 255, (300, 410, 4), dtype=np.uint8)
    cells, nuclei = seg.segment(img)  # 300x410 -> 75x102 at 1/4: padded to multiples of 32
    assert cells.shape == nuclei.shape == (300, 410) and cells.dtype == np.int32
    seg.close()

    bad = parser.parse_args(["--weights-dir", str(tmp_path / "empty")])
    assert hpa_export.run(bad) == 1
    assert "does not exist" in capsys.readouterr().err
