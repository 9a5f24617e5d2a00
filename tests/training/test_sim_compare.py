"""``locus.training.sim.compare``: the nucleus-to-cytoplasm measurement, checked on hand-worked fields."""

from __future__ import annotations

import numpy as np
import pytest

from locus.training.sim.compare import main, nucleus_to_cytoplasm


def _two_cells() -> tuple[np.ndarray, np.ndarray]:
    cells = np.zeros((40, 60), np.int32)
    nuclei = np.zeros_like(cells)
    cells[5:35, 5:28] = 1
    cells[5:35, 32:55] = 2
    nuclei[12:28, 10:22] = 1
    nuclei[12:28, 37:49] = 2
    return cells, nuclei


def test_ratio_of_means_above_background():
    cells, nuclei = _two_cells()
    x = np.full(cells.shape, 2.0)  # background 2
    x[cells == 1] = 6.0  # cytoplasm 6 - 2 = 4
    x[nuclei == 1] = 4.0  # nucleus 4 - 2 = 2: half the cytoplasm's level
    x[cells == 2] = 3.0  # cytoplasm 1 above background
    x[nuclei == 2] = 12.0  # nucleus 10 above: a nuclear stain
    r = nucleus_to_cytoplasm(x, cells, nuclei)
    assert r == pytest.approx({1: 0.5, 2: 10.0})


def test_small_compartments_are_left_out_and_dark_cytoplasm_is_floored():
    cells, nuclei = _two_cells()
    x = np.zeros(cells.shape)
    x[nuclei == 2] = 5.0  # no cytoplasmic stain at all: the 1e-3 floor, not a division by zero
    r = nucleus_to_cytoplasm(x, cells, nuclei, min_pixels=100)
    assert set(r) == {1, 2} and r[2] == pytest.approx(5.0 / 1e-3)
    assert nucleus_to_cytoplasm(x, cells, nuclei, min_pixels=200) == {}  # each nucleus has 192 pixels


@pytest.mark.slow
def test_stats_prints_a_row_per_field(capsys: pytest.CaptureFixture[str]):
    assert main(["--stats", "--sim-fields", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    sim_rows = [line for line in out if line.startswith("HPA-sim ")]
    assert len(sim_rows) == 5 and sim_rows[0].startswith("HPA-sim Endoplasmic reticulum only")
