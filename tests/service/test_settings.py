"""Settings from LOCUS_* variables reach every place that builds a segmenter."""

from __future__ import annotations

from pathlib import Path

from locus.service.settings import Settings


def test_hpa_network_files_from_the_environment_reach_the_segmenter_options(monkeypatch):
    monkeypatch.setenv("LOCUS_HPA_NUCLEI_MODEL", "/m/nuclei.onnx")
    monkeypatch.setenv("LOCUS_HPA_CELL_MODEL", "/m/cell.onnx")
    monkeypatch.setenv("LOCUS_PROVIDERS", "CUDAExecutionProvider,CPUExecutionProvider")
    monkeypatch.setenv("LOCUS_INTRA_OP_THREADS", "3")
    options = Settings().segmenter_options("hpa")
    assert options["nuclei_model"] == Path("/m/nuclei.onnx")
    assert options["cell_model"] == Path("/m/cell.onnx")
    assert options["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert options["intra_op_threads"] == 3
    assert Settings().segmenter_options("classical") == {}
