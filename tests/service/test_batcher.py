"""The dynamic batcher: each caller gets its own rows back, and concurrent callers share batches."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from locus.service.batcher import DynamicBatcher
from locus.service.inference import Classifier


def test_each_request_gets_its_own_cells_under_concurrency(test_model_dir):
    clf = Classifier(test_model_dir, ["CPUExecutionProvider"], max_batch=64)
    calls = []

    def run(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape[0])
        time.sleep(0.01)  # a model call takes time, so callers pile up
        return clf.predict(batch)

    batcher = DynamicBatcher(run, max_batch=32, max_wait_s=0.02)
    rng = np.random.default_rng(0)
    requests = [rng.uniform(0, 255, (int(rng.integers(1, 20)), 32, 32, 4)).astype(np.float32) for _ in range(24)]
    expected = [clf.predict(r) for r in requests]
    with ThreadPoolExecutor(max_workers=12) as pool:
        got = list(pool.map(lambda r: batcher(r, timeout=30), requests))
    batcher.close()
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    assert sum(calls) == sum(r.shape[0] for r in requests)
    assert batcher.stats.shared_batches > 0, "no batch carried cells of two requests"
    assert batcher.stats.batches < len(requests)
    assert max(calls) <= 32


def test_large_request_is_split_into_max_batch(test_model_dir):
    clf = Classifier(test_model_dir, ["CPUExecutionProvider"])
    sizes = []
    batcher = DynamicBatcher(lambda b: (sizes.append(b.shape[0]), clf.predict(b))[1], max_batch=16, max_wait_s=0)
    x = np.random.default_rng(1).uniform(0, 255, (50, 32, 32, 4)).astype(np.float32)
    np.testing.assert_allclose(batcher(x), clf.predict(x), rtol=1e-5, atol=1e-6)
    assert sizes == [16, 16, 16, 2]
    batcher.close()


def test_model_error_reaches_the_caller_and_batcher_keeps_working():
    fail = threading.Event()
    fail.set()

    def run(batch):
        if fail.is_set():
            raise RuntimeError("onnxruntime exploded")
        return np.ones((batch.shape[0], 19), np.float32)

    batcher = DynamicBatcher(run, max_batch=8, max_wait_s=0)
    with pytest.raises(RuntimeError, match="exploded"):
        batcher(np.zeros((3, 4), np.float32), timeout=5)
    fail.clear()
    assert batcher(np.zeros((3, 4), np.float32), timeout=5).shape == (3, 19)
    batcher.close()


def test_a_bad_input_in_a_shared_batch_fails_only_its_own_request():
    def run(batch):
        if np.isnan(batch).any():
            raise RuntimeError("NaN input")
        time.sleep(0.02)
        return np.ones((batch.shape[0], 19), np.float32)

    batcher = DynamicBatcher(run, max_batch=64, max_wait_s=0.05)
    good = [np.zeros((3, 4), np.float32) for _ in range(4)]
    bad = np.full((2, 4), np.nan, np.float32)
    futures = [batcher.submit(x) for x in (good[0], good[1], bad, good[2], good[3])]
    results = []
    for f in futures:
        try:
            results.append(f.result(timeout=10).shape)
        except RuntimeError as exc:
            results.append(str(exc))
    batcher.close()
    assert results == [(3, 19), (3, 19), "NaN input", (3, 19), (3, 19)]


def test_fixed_batch_sends_one_input_shape_and_keeps_every_score(test_model_dir, monkeypatch):
    """With ``fixed_batch`` every model call has ``max_batch`` rows (a GPU plans its convolutions once), the
    padding rows never reach the caller, and each cell's scores are those of the unpadded calls."""
    plain = Classifier(test_model_dir, ["CPUExecutionProvider"], max_batch=8)
    fixed = Classifier(test_model_dir, ["CPUExecutionProvider"], max_batch=8, fixed_batch=True)
    assert plain.fixed_batch is False  # no GPU here: the default pads only on a GPU provider
    shapes: list[tuple[int, ...]] = []
    run = fixed.session.run

    def recording_run(names, feeds):
        shapes.append(next(iter(feeds.values())).shape)
        return run(names, feeds)

    monkeypatch.setattr(fixed.session, "run", recording_run)
    size = plain.input_size
    rng = np.random.default_rng(3)
    for n in (1, 5, 8, 13, 0):
        cells = rng.uniform(0, 255, (n, size, size, 4)).astype(np.float32)
        got, want = fixed.predict(cells), plain.predict(cells)
        assert got.shape == want.shape == (n, 19)
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert shapes and {s[0] for s in shapes} == {8}, shapes


def test_fixed_batch_setting_reaches_the_classifier(test_model_dir, monkeypatch):
    """``LOCUS_FIXED_BATCH`` turns padding on for a CPU service too (unset it follows the provider), and
    ``LOCUS_CUDNN_CONV_ALGO_SEARCH`` reaches the CUDA provider's options (a value cuDNN lacks is refused)."""
    from locus.service.config import PipelineSettings
    from locus.service.factory import build_classifier

    assert build_classifier(PipelineSettings(providers=["CPUExecutionProvider"]), test_model_dir).fixed_batch is False
    monkeypatch.setenv("LOCUS_FIXED_BATCH", "true")
    settings = PipelineSettings(providers=["CPUExecutionProvider"], max_batch=4)
    assert settings.fixed_batch is True
    clf = build_classifier(settings, test_model_dir)
    assert clf.fixed_batch is True
    assert clf.provider_options == {"CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC"}}
    monkeypatch.setenv("LOCUS_CUDNN_CONV_ALGO_SEARCH", "EXHAUSTIVE")
    clf = build_classifier(PipelineSettings(providers=["CPUExecutionProvider"]), test_model_dir)
    assert clf.provider_options["CUDAExecutionProvider"]["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    monkeypatch.setenv("LOCUS_CUDNN_CONV_ALGO_SEARCH", "FASTEST")
    with pytest.raises(ValueError, match="cudnn_conv_algo_search"):
        PipelineSettings()
