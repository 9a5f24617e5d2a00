"""``locus.training.sim.compare``: the nucleus-to-cytoplasm measurement, checked on hand-worked fields."""

from __future__ import annotations

import numpy as np
import pytest

from locus.training.sim.compare import (
    chromatin_extent,
    er_at_spindle,
    er_likeness,
    level_over_background,
    main,
    nucleus_to_cytoplasm,
    spindle_stain,
)


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


def test_level_over_background_is_in_8_bit_units_whatever_the_depth():
    cells, _ = _two_cells()
    x = np.full(cells.shape, 2 * 257, np.uint16)  # 16-bit background: 2 on the 8-bit scale
    x[cells == 1] = 10 * 257  # 8 over background
    x[cells == 2] = 2 * 257  # an unannotated cell at the background
    x[5:8, 32:55] = 60000  # a few bright pixels do not move a median
    assert level_over_background(x, cells) == pytest.approx({1: 8.0, 2: 0.0})
    assert level_over_background((x // 257).astype(np.uint8), cells) == pytest.approx({1: 8.0, 2: 0.0})
    assert level_over_background(x.astype(np.float32) / 257, cells) == pytest.approx({1: 8.0, 2: 0.0})


@pytest.mark.slow
def test_stats_prints_a_row_per_field(capsys: pytest.CaptureFixture[str]):
    assert main(["--stats", "--sim-fields", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    sim_rows = [line for line in out if line.startswith("HPA-sim ")]
    assert len(sim_rows) == 5 and sim_rows[0].startswith("HPA-sim Endoplasmic reticulum only")


def test_chromatin_extent_of_a_hand_drawn_ellipse_in_a_disc():
    yy, xx = np.mgrid[0:201, 0:201]
    cell = (xx - 100) ** 2 + (yy - 100) ** 2 <= 80**2  # diameter 160
    blue = np.where(cell, 10.0, 0.0)
    blue[((xx - 100) / 48.0) ** 2 + ((yy - 100) / 16.0) ** 2 <= 1.0] = 200.0  # chromatin: 96 x 32
    blue[30, 100] = 200.0  # a stray bright pixel moves it little
    length, width = chromatin_extent(blue, cell)
    assert length == pytest.approx(96 / 160, abs=0.02)
    assert width == pytest.approx(32 / 160, abs=0.02)
    assert chromatin_extent(np.zeros_like(blue), cell) == (0.0, 0.0)  # nothing above half of 0


@pytest.mark.slow
def test_mitosis_prints_the_sim_row(capsys: pytest.CaptureFixture[str]):
    assert main(["--mitosis", "--sim-fields", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith("HPA-sim, mitotic")]
    assert len(rows) == 1 and int(rows[0].split()[6]) > 0
    er = [line for line in out if line.startswith("HPA-sim, their ER marker")]
    assert len(er) == 1 and int(er[0].split()[4]) == int(rows[0].split()[6])


def test_spindle_stain_tells_an_even_pool_with_point_poles_from_a_faint_grainy_one():
    yy, xx = np.mgrid[0:160, 0:160]
    cell = (xx - 80) ** 2 + (yy - 80) ** 2 <= 60**2  # about 11,300 pixels
    even = np.where(cell, 10.0, 0.0)
    even[78:83, 78:83] = 100.0  # a point pole: 25 pixels, within the top 1% of the cell
    pool, _, peak = spindle_stain(even, cell)
    assert pool == pytest.approx(1.0) and peak == pytest.approx(10.0)
    zone = np.where(cell, 10.0, 0.0)
    zone[cell & (xx < 62)] = 100.0  # a broad bright zone over about a third of the cell
    pool, _, peak = spindle_stain(zone, cell)
    assert pool == pytest.approx(0.1) and peak == pytest.approx(1.0)
    smooth = np.where(cell, 10.0, 0.0)
    assert spindle_stain(smooth, cell)[1] < 0.01  # the cell's own edge is not grain
    grainy = smooth + np.where((xx + yy) % 2 == 0, 5.0, -5.0) * cell
    assert spindle_stain(grainy, cell)[1] > 0.3


def test_er_likeness_of_hand_drawn_cells():
    yy, xx = np.mgrid[0:200, 0:400]
    cells = np.zeros((200, 400), np.int32)
    nuclei = np.zeros_like(cells)
    cells[10:190, 10:190] = 1
    cells[10:190, 210:390] = 2
    nuclei[80:120, 80:120] = 1
    nuclei[80:120, 280:320] = 2
    rng = np.random.default_rng(0)
    yellow = (20.0 + 10.0 * np.sin(xx / 3.0) * np.sin(yy / 4.0)) * (cells > 0)  # an ER-like network
    green = np.zeros_like(yellow)
    green[cells == 1] = 0.5 * yellow[cells == 1]  # cell 1: the protein follows the network, evenly
    d = np.hypot(xx - 300, yy - 100)  # cell 2: independent grains, twice as bright near the nucleus
    green[cells == 2] = (rng.uniform(5, 15, (200, 400)) * np.where(d < 50, 2.0, 1.0))[cells == 2]
    r = er_likeness(green, yellow, cells, nuclei)
    assert r[1][0] > 0.95 and r[1][1] == pytest.approx(1.0, abs=0.1)
    assert abs(r[2][0]) < 0.3 and r[2][1] > 1.5
    assert er_likeness(green, yellow, cells, np.zeros_like(nuclei)) == {}  # no nucleus: left out


@pytest.mark.slow
def test_background_prints_the_sim_rows(capsys: pytest.CaptureFixture[str]):
    assert main(["--background", "--sim-fields", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("HPA-sim negative")]
    assert len(rows) == 2 and sum(int(r[44:50]) for r in rows) > 0  # the cell counts


def test_er_at_spindle_of_hand_drawn_cells():
    yy, xx = np.mgrid[0:160, 0:160]
    cell = (xx - 80) ** 2 + (yy - 80) ** 2 <= 60**2
    red = np.where(cell & (np.abs(xx - 80) < 15), 100.0, 10.0) * cell  # a spindle down the middle
    # An ER marker bright where the spindle is: follows it, 3 times as bright there (smoothing blurs the edge).
    corr, ratio = er_at_spindle(np.where(red > 50, 30.0, 10.0) * cell, red, cell)
    assert corr > 0.9 and 2.5 < ratio < 3.0
    # An even haze: no correlation, the same brightness at the spindle and off it.
    assert er_at_spindle(np.where(cell, 20.0, 0.0), red, cell) == pytest.approx((0.0, 1.0))
    # Excluded from the spindle: negative correlation, dimmer there.
    corr, ratio = er_at_spindle(np.where(red > 50, 5.0, 20.0) * cell, red, cell)
    assert corr < -0.9 and ratio < 0.4
