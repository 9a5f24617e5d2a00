"""A tiny end-to-end run: HPA-sim -> train -> export -> a model folder the service accepts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from locus.service.classes import CLASS_NAMES
from locus.service.manifest import load_manifest
from locus.training.config import TrainConfig, load_config
from locus.training.thresholds import (
    average_precision,
    best_f1_threshold,
    f1_standard_error,
    plateau_f1_threshold,
    tune_thresholds,
    tune_view_thresholds,
)

SIZE = 32


# ---------------------------------------------------------------------------------------------- no TensorFlow needed


def test_config_json_and_overrides(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"train_dirs": ["a"], "input_size": 64, "crop": {"padding": 0.2}}))
    cfg = load_config(path, {"epochs": 3, "crop.mask_other_cells": False, "seed": None})
    assert (cfg.epochs, cfg.input_size, cfg.seed) == (3, 64, 0)
    rule = cfg.crop_rule()
    assert (rule.size, rule.padding, rule.mask_other_cells) == (64, 0.2, False)
    assert TrainConfig.model_validate(cfg.model_dump()) == cfg
    with pytest.raises(ValueError):
        load_config(None, {"architecture": "b9"})
    with pytest.raises(ValueError):
        load_config(None, {"bogus": 1})


def test_repo_configs_validate():
    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.json")):
        load_config(path)


def test_locus_train_parser_overrides(tmp_path):
    from locus.cli import build_parser
    from locus.training.train import config_from_args

    argv = [
        "train",
        "--config",
        str(Path(__file__).resolve().parents[2] / "configs" / "sim_b0.json"),
        "--out",
        str(tmp_path),
        "--epochs",
        "2",
        "--train-dir",
        "x",
        "--train-dir",
        "y",
        "--no-grad",
    ]
    cfg = config_from_args(build_parser(argv).parse_args(argv))
    assert cfg.epochs == 2 and cfg.train_dirs == ["x", "y"] and cfg.out == str(tmp_path) and not cfg.with_grad


def test_locus_train_without_tensorflow_prints_install_hint(monkeypatch, capsys):
    import importlib

    from locus import cli

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "locus.training.train":
            raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
        return real(name, *a, **k)

    monkeypatch.setattr(cli.importlib, "import_module", fake)
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--config", "x.json"])
    assert exc.value.code == 2
    assert "pip install -e '.[train]'" in capsys.readouterr().err


def test_thresholds_and_ap():
    y = np.array([1, 1, 0, 0, 1, 0])
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.1])
    thr, f1 = best_f1_threshold(y, p)
    assert 0.2 < thr <= 0.6 and f1 == pytest.approx(6 / 7)
    assert best_f1_threshold(np.zeros(4), np.ones(4)) == (0.5, 0.0)
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    yt = rng.integers(0, 2, 200)
    ps = np.round(rng.uniform(size=200), 2)  # ties included
    assert average_precision(yt, ps) == pytest.approx(sk.average_precision_score(yt, ps))
    assert average_precision(np.zeros(5), ps[:5]) is None
    t = tune_thresholds(np.c_[y, np.zeros(6)], np.c_[p, p])
    assert t[1] == 0.5 and len(t) == 2


def test_plateau_threshold_hand_worked():
    """Scores 0.95 0.9 0.8 | 0.6 0.5 | 0.3 0.2 0.1 with positives at 0.95 0.9 0.8 0.3 (4 positives).

    Cuts (called down to): 0.95 F1 2/5=0.4; 0.9 4/6=0.667; 0.8 6/7=0.857; 0.6 6/8=0.75; 0.5 6/9=0.667;
    0.3 8/10=0.8; 0.2 8/11=0.727; 0.1 8/12=0.667. Best 0.857 (threshold half way 0.8-0.6 = 0.7).
    """
    y = np.array([1, 1, 1, 0, 0, 1, 0, 0])
    p = np.array([0.95, 0.9, 0.8, 0.6, 0.5, 0.3, 0.2, 0.1])
    assert best_f1_threshold(y, p) == (pytest.approx(0.7), pytest.approx(6 / 7))
    assert plateau_f1_threshold(y, p, 0.0) == best_f1_threshold(y, p)
    # within 0.06 of the best: the cuts at 0.8 (0.857) and 0.3 (0.8), thresholds 0.7 and 0.25. Their middle, 0.475,
    # falls between them where F1 is 0.667, so the good cut nearest it is taken; both are 0.225 away and the first
    # in score order wins: 0.7
    thr, f1 = plateau_f1_threshold(y, p, 0.06)
    assert (thr, f1) == (pytest.approx(0.7), pytest.approx(6 / 7))
    # within 0.11: cuts at 0.8, 0.6 (0.75) and 0.3 -> thresholds 0.7, 0.55, 0.25; middle 0.475, nearest 0.55
    thr, f1 = plateau_f1_threshold(y, p, 0.11)
    assert (thr, f1) == (pytest.approx(0.55), pytest.approx(0.75))
    assert f1 >= 6 / 7 - 0.11  # always a cut within the tolerance
    assert plateau_f1_threshold(np.zeros(3), p[:3], 0.1) == (0.5, 0.0)


def test_one_se_rule_is_stable_where_f1_is_flat():
    """Positives near 1, negatives near 0, a few of each in between: the argmax lands on whichever in-between
    cell tips F1, the one-SE rule in the middle of the flat range, and it moves less between resamples."""
    rng = np.random.default_rng(5)
    n = 600
    y = (rng.uniform(size=n) < 0.2).astype(int)
    p = np.where(y == 1, rng.beta(5, 2, n), rng.beta(2, 5, n))
    se = f1_standard_error(y, p)
    assert 0.0 < se < 0.05
    assert f1_standard_error(y, p) == se  # seeded: reproducible
    spread = {"argmax": [], "one-se": []}
    for seed in range(12):
        i = np.random.default_rng(100 + seed).integers(0, n, n)
        for rule in spread:
            spread[rule].append(tune_thresholds(y[i, None], p[i, None], rule=rule)[0])
    assert np.std(spread["one-se"]) < np.std(spread["argmax"])
    got = tune_thresholds(y[:, None], p[:, None])[0]
    f1_got = 2 * ((p >= got) & (y == 1)).sum() / ((p >= got).sum() + y.sum())
    assert f1_got >= best_f1_threshold(y, p)[1] - se - 1e-9
    with pytest.raises(ValueError, match="one-se, argmax"):
        tune_thresholds(y[:, None], p[:, None], rule="max")


def test_view_thresholds_are_tuned_on_the_services_mean_of_views():
    """Each set is F1-tuned on exactly the n-view mean the service computes (its stack and average)."""
    from locus.service.tta import average_views, stack_views

    rng = np.random.default_rng(3)
    images = rng.uniform(0, 255, (90, 8, 8, 4)).astype(np.float32)
    w = rng.normal(0, 1, (8 * 8 * 4, 3))

    def predict(batch: np.ndarray) -> np.ndarray:  # orientation-dependent scores, as a real CNN's are
        z = (batch.reshape(len(batch), -1) - 127.5) / 255.0 @ w
        return 1.0 / (1.0 + np.exp(-z))

    y = (rng.uniform(size=(90, 3)) < 1.0 / (1.0 + np.exp(-predict(images) * 4 + 2))).astype(np.int8)
    sets = tune_view_thresholds(predict, images, y, batch_size=16, rule="argmax")  # 16 does not divide 90
    assert sorted(sets) == [2, 4, 8]
    for n, got in sets.items():
        mean = average_views(predict(stack_views(images, n)), n)
        assert got == pytest.approx(tune_thresholds(y, mean, rule="argmax"), abs=1e-6)
    assert sets[8] != pytest.approx(sets[2], abs=1e-6)  # the views change the scores, so the sets differ


# ---------------------------------------------------------------------------------------------- TensorFlow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    from locus.training.sim.generator import SimConfig, write_dataset
    from locus.training.train import train

    root = tmp_path_factory.mktemp("tiny")
    data = root / "sim"
    write_dataset(data, n=6, seed=11, config=SimConfig(size=256), workers=1, progress=False)
    config = TrainConfig(
        train_dirs=[str(data)],
        input_size=SIZE,
        epochs=1,
        batch_size=16,
        max_steps_per_epoch=3,
        label_source="cell",
        out=str(root / "run"),
        name="tiny",
        version="0.0.1",
        with_grad=False,
        workers=1,
        verbose=0,
        # the real-data recipe's switches, on one CPU device: float16 compute, a MirroredStrategy of one replica
        mixed_precision=True,
        distribute="mirrored",
    )
    return config, train(config, progress=False)


@pytest.mark.train
@pytest.mark.slow
def test_train_writes_run_folder(trained):
    config, result = trained
    run = Path(config.out)
    for name in ("config.json", "best.keras", "history.csv", "thresholds.json", "summary.json", "parity_batch.npy"):
        assert (run / name).is_file(), name
    for png in ("label_distribution", "labels_per_image", "cooccurrence", "history", "per_class_ap"):
        assert (run / "plots" / f"{png}.png").stat().st_size > 1000
    assert len(result.thresholds) == 19 and all(0 <= t <= 1 for t in result.thresholds)
    assert sorted(result.view_thresholds) == [2, 4, 8]
    assert json.loads((run / "view_thresholds.json").read_text()) == {
        str(n): pytest.approx(v) for n, v in result.view_thresholds.items()
    }
    s = result.summary
    assert s["data"]["train_fields"] + s["data"]["val_fields"] == 6 and s["data"]["synthetic"]
    assert s["train_samples_per_s"] > 0 and "val_loss" in result.history


@pytest.mark.train
@pytest.mark.slow
def test_model_folder_validates_and_serves(trained):
    import onnxruntime as ort

    from locus.service.inference import Classifier

    config, result = trained
    folder = result.model_dir
    m = load_manifest(folder)
    assert m.name == "tiny" and m.input_size == SIZE and m.architecture == "efficientnet-b0"
    assert m.crop.rule() == config.crop_rule()
    assert m.class_names == list(CLASS_NAMES) and m.thresholds == pytest.approx(result.thresholds)
    assert {n: pytest.approx(v) for n, v in m.view_thresholds.items()} == result.view_thresholds
    assert m.config == json.loads(json.dumps(config.model_dump()))
    assert m.training["onnx_parity"]["max_abs_diff"] <= 1e-4
    assert m.grad is None and set(m.files) == {"model.onnx"}
    card = (folder / "MODEL_CARD.md").read_text()
    assert "Must not be used for" in card and "HPA-sim" in card
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["probabilities"]
    parity = np.load(Path(config.out) / "parity_batch.npy").astype(np.float32)
    from locus.training.train import _float32_model

    # trained in mixed precision: the folder holds the float32 rebuild with the trained weights
    assert result.model.layers[-1].dtype_policy.name == "float32"  # the float32 head
    keras_p = np.asarray(_float32_model(result.model, config)(parity, training=False))
    assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_outputs()[0].type == "tensor(float)"
    for n in (1, 5, len(parity)):
        p = sess.run(["probabilities"], {"image": parity[:n]})[0]
        assert p.shape == (n, 19) and p.dtype == np.float32
        assert np.abs(p - keras_p[:n]).max() <= 1e-4
    clf = Classifier(folder)  # the service's own loader
    assert clf.crop_rule == config.crop_rule()


@pytest.mark.train
@pytest.mark.slow
def test_locus_export_cli(trained, tmp_path):
    from locus.cli import main

    config, _ = trained
    out = tmp_path / "exported"
    code = main(
        [
            "export",
            "--checkpoint",
            str(Path(config.out) / "best.keras"),
            "--out",
            str(out),
            "--name",
            "again",
            "--version",
            "9",
            "--no-grad",
        ]
    )
    assert code == 0
    m = load_manifest(out)
    assert (m.name, m.version, m.input_size) == ("again", "9", SIZE)
    assert m.training["onnx_parity"]["n"] > 0


@pytest.mark.train
@pytest.mark.slow
def test_parity_failure_raises_with_numbers(trained, tmp_path):
    from locus.training.export import ExportError, onnx_parity

    config, result = trained
    batch = np.load(Path(config.out) / "parity_batch.npy").astype(np.float32)[:4]
    with pytest.raises(ExportError, match="max abs diff"):
        onnx_parity(result.model, result.model_dir / "model.onnx", batch, tolerance=-1.0)
