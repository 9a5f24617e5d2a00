"""HPA-sim patterns that tell look-alike classes apart, measured on the painted maps of noise-free geometry.

Each test states a property that real HPA cells have and that a model needs in order not to confuse two
classes on the real validation fields (``../shared/hpa-real``): Golgi on one side of the nucleus against
intermediate filaments around it, nucleoli as the brightest structure (some as rings), a mitotic spindle
fanning from two poles over a soluble pool (and tubulin in the spindle whatever the protein), and a faint
granular background that carries no label.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np

from locus.training.sim.compare import er_at_spindle, er_likeness
from locus.training.sim.geometry import make_geometry
from locus.training.sim.patterns import (
    PATTERNS,
    PaintContext,
    background_stain,
    blue_channel,
    red_channel,
    yellow_channel,
)

GOLGI, INTERMEDIATE_FILAMENTS, NUCLEOLI, MITOTIC_SPINDLE = 7, 8, 2, 11


def _context(seed: int, *, mitotic_fraction: float = 0.03, min_mitotic: int = 0) -> PaintContext:
    """A 768² field at the 2048² reference scale (cells about 335 px across), 6-10 cells seeded."""
    rng = np.random.default_rng(seed)
    geo = make_geometry(
        768, rng, scale=1.0, n_cells=(6, 10), mitotic_fraction=mitotic_fraction, min_mitotic=min_mitotic
    )
    return PaintContext(geo, rng)


def _interphase_fields(seeds: range = range(3)) -> Iterator[tuple[PaintContext, np.ndarray]]:
    """Per seed, the field's context and the ids of its interphase cells."""
    for seed in seeds:
        ctx = _context(seed)
        yield ctx, np.array([k for k in range(1, ctx.geo.n + 1) if not ctx.geo.mitotic[k - 1]], dtype=np.int64)


def _one_sidedness(ctx: PaintContext, stain: np.ndarray, k: int) -> float:
    """Length of the stain-weighted mean unit vector from the nucleus centre over the cytoplasm of cell k.

    1: all of the stain lies in one direction from the nucleus; 0: spread evenly around it.
    """
    ys, xs = np.nonzero((ctx.cells == k) & ctx.cyto)
    w = np.maximum(stain[ys, xs] - 0.05, 0.0)
    c = ctx.geo.nuc_center[k - 1]
    v = np.stack([xs - c[0], ys - c[1]], 1).astype(np.float64)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6)
    return float(np.linalg.norm((w[:, None] * v).sum(0)) / max(float(w.sum()), 1e-6))


def test_golgi_keeps_to_one_side_and_intermediate_filaments_wrap_the_nucleus():
    golgi, filaments = [], []
    for ctx, ids in _interphase_fields():
        g_map = PATTERNS[GOLGI](ctx, ids)
        f_map = PATTERNS[INTERMEDIATE_FILAMENTS](ctx, ids)
        golgi += [_one_sidedness(ctx, g_map, k) for k in ids]
        filaments += [_one_sidedness(ctx, f_map, k) for k in ids]
    assert len(golgi) >= 15
    # Both Golgi forms (compact ribbon, dispersed tubules) sit on one side of the nucleus.
    assert np.median(golgi) > 0.7, sorted(golgi)
    assert np.percentile(golgi, 10) > 0.45, sorted(golgi)
    # Intermediate filaments run round it (cells with an off-centre nucleus lean to one side).
    assert np.median(filaments) < 0.5, sorted(filaments)
    assert np.median(golgi) - np.median(filaments) > 0.3


def test_nucleoli_are_the_brightest_structure_and_some_are_rings():
    core_over_edge, peak_over_nucleus = [], []
    for ctx, ids in _interphase_fields():
        stain = PATTERNS[NUCLEOLI](ctx, ids)
        body = ctx.geo.nucleoli
        for k in ids:
            nuc = ctx.geo.nuclei == k
            core = nuc & (body > 0.9)
            edge = nuc & (body > 0.3) & (body < 0.7)
            if core.sum() < 5:
                continue
            core_over_edge.append(float(stain[core].mean() / stain[edge].mean()))
            peak_over_nucleus.append(float(stain[core | edge].max() / stain[nuc].mean()))
    assert len(core_over_edge) >= 15
    rings = np.mean(np.array(core_over_edge) < 0.6)
    assert 0.15 < rings < 0.6, sorted(core_over_edge)  # a third of the cells: nucleolar-rim proteins
    assert min(peak_over_nucleus) > 5.0, sorted(peak_over_nucleus)


def test_mitotic_spindle_fills_a_zone_at_its_poles_over_a_faint_pool_and_chromosomes_condense():
    pool, contrast, peak, gaps = [], [], [], {True: [], False: []}
    for seed in range(4):
        ctx = _context(seed, mitotic_fraction=0.5, min_mitotic=3)
        ids = np.array([k for k in range(1, ctx.geo.n + 1) if ctx.geo.mitotic[k - 1]], dtype=np.int64)
        stain = PATTERNS[MITOTIC_SPINDLE](ctx, ids)
        blue = blue_channel(ctx)
        for k in ids:
            cell = ctx.cells == k
            p99 = float(np.percentile(stain[cell], 99))
            pool.append(float(np.median(stain[cell])))
            contrast.append(p99 / float(np.median(stain[cell])))
            peak.append(float(np.percentile(stain[cell], 99.9)) / p99)
            b = blue[ctx.geo.nuclei == k]
            if b.size >= 20:
                gaps[bool(ctx.geo.prometaphase[k - 1])].append(float((b < 0.5 * np.percentile(b, 95)).mean()))
    assert len(pool) >= 8
    # The whole rounded cell holds a faint pool (real b6a469d8: median 0.12 of the 99th percentile), the spindle
    # stands well above it.
    assert min(pool) > 0.005, sorted(pool)
    assert min(contrast) > 3.0, sorted(contrast)
    # The brightest part is a zone round the poles, not a point (real: 99.9th over 99th percentile 1.02; HPA-sim
    # 2.7's point poles gave 1.31-1.86).
    assert max(peak) < 1.15, sorted(peak)
    # Prometaphase: separate condensed chromosomes with gaps between; metaphase: a solid plate.
    assert gaps[True] and gaps[False]
    assert min(gaps[True]) > 0.35 > max(gaps[False]), gaps


def test_tubulin_shows_the_spindle_in_mitosis_tilted_spindles_have_a_faint_pole_and_the_er_turns_to_haze():
    centre_over_rim, far_over_near, er_cv = [], [], {True: [], False: []}
    for seed in range(6):
        ctx = _context(seed, mitotic_fraction=0.5, min_mitotic=3)
        red = red_channel(ctx)
        far_over_near += list(ctx.spindle[2][1::2] / ctx.spindle[2][0::2])
        for k in range(1, ctx.geo.n + 1):
            cell = ctx.cells == k
            mitotic = bool(ctx.geo.mitotic[k - 1])
            inner = cell & (ctx.d_border > ctx.px(10.0)) & ~ctx.nuc_mask
            if inner.sum() > 200:
                er_cv[mitotic].append(float(ctx.er[inner].std() / ctx.er[inner].mean()))
            if mitotic:
                ys, xs = np.nonzero(cell)
                r = np.hypot(xs - ctx.geo.nuc_center[k - 1, 0], ys - ctx.geo.nuc_center[k - 1, 1])
                radius = ctx.geo.cell_radius[k - 1]
                v = red[ys, xs]
                centre_over_rim.append(float(v[r < 0.35 * radius].mean() / v[(r > 0.6 * radius)].mean()))
    assert len(centre_over_rim) >= 8
    # The microtubule channel of a mitotic cell is its spindle, bright over the chromosomes, not an
    # interphase array that is dim over the nucleus and bright towards the edge.
    assert np.median(centre_over_rim) > 1.8 and min(centre_over_rim) > 1.2, sorted(centre_over_rim)
    # Spindles lie at any angle to the focal plane: some far poles are much fainter, some as bright.
    pairs = np.minimum(far_over_near, 1 / np.asarray(far_over_near))
    assert 0.1 < float((pairs < 0.75).mean()) < 0.7, sorted(pairs)
    # The ER of a rounded mitotic cell is an even haze, far less contrasted than an interphase network.
    assert er_cv[True] and er_cv[False]
    assert max(er_cv[True]) < np.median(er_cv[False]), (sorted(er_cv[True]), np.median(er_cv[False]))


def test_background_stain_is_faint_granular_and_perinuclear_inside_cells_only():
    ctx = _context(1)
    bg = background_stain(ctx)
    assert float(bg[~ctx.cell_mask].max()) == 0.0
    cyto = bg[ctx.cyto]
    assert cyto.std() / cyto.mean() > 0.5, "grains, not a flat wash"
    near = ctx.cyto & (ctx.d_nuc_out < ctx.px(15.0))
    far = ctx.cyto & (ctx.d_nuc_out > ctx.px(60.0))
    assert bg[near].mean() > 1.2 * bg[far].mean(), "denser round the nucleus"
    over = bg[ctx.nuc_mask].mean() / cyto.mean()
    assert 0.1 < over < 0.9, "fainter over the nucleus, not absent"


def test_background_stain_follows_the_er_marker_and_gathers_round_the_nucleus():
    """The real spindle field's unannotated green lies along the ER marker (correlation 0.66) and gathers round the
    nucleus (1.89), ``compare --background``. HPA-sim 2.8's grains ignored the ER: 0.25 and 1.31 on these maps."""
    corr, peri = [], []
    for seed in range(4):
        ctx = _context(seed)
        for c, p in er_likeness(background_stain(ctx), yellow_channel(ctx), ctx.cells, ctx.geo.nuclei).values():
            corr.append(c)
            peri.append(p)
    assert len(corr) >= 20
    assert np.median(corr) > 0.5, sorted(np.round(corr, 2))
    assert np.median(peri) > 1.6, sorted(np.round(peri, 2))


def _mitotic_fields(seeds: range = range(4)) -> Iterator[tuple[PaintContext, np.ndarray]]:
    """Per seed, a field with about half its cells mitotic (3 at least), and the ids of those cells."""
    for seed in seeds:
        ctx = _context(seed, mitotic_fraction=0.5, min_mitotic=3)
        yield ctx, np.array([k for k in range(1, ctx.geo.n + 1) if ctx.geo.mitotic[k - 1]], dtype=np.int64)


def test_a_mitotic_cells_er_gathers_round_its_spindle_poles():
    """On the real mitotic cell of b6a469d8 the ER marker follows the tubulin (correlation 0.57) and is 1.62 times
    as bright where the tubulin is (``compare --mitosis``); HPA-sim 2.9's even haze: 0.14 and 1.07 on these maps
    (2.10: 0.54 and 1.61)."""
    corr, ratio = [], []
    for ctx, ids in _mitotic_fields():
        yellow, red = yellow_channel(ctx), red_channel(ctx)
        for k in ids:
            c, r = er_at_spindle(yellow, red, ctx.cells == k)
            corr.append(c)
            ratio.append(r)
    assert len(corr) >= 8
    assert np.median(corr) > 0.45, sorted(np.round(corr, 2))
    assert np.median(ratio) > 1.4, sorted(np.round(ratio, 2))


def test_a_mitotic_cell_holds_the_background_stain_evenly_not_round_its_chromosomes():
    """A mitotic cell has no nuclear envelope for the unannotated stain to gather round; HPA-sim 2.9 drew it
    densest round the chromosomes (1.83 times as dense near them as further out on these maps), a spindle-like
    glow in cells labelled without the spindle."""
    glow, level = [], []
    for ctx, ids in _mitotic_fields():
        bg = cv2.GaussianBlur(background_stain(ctx), (0, 0), ctx.px(4.0))
        interphase = ctx.cyto & ~ctx.mitotic_cells
        for k in ids:
            cell = ctx.cells == k
            chromatin = ctx.geo.nuclei == k
            d = cv2.distanceTransform((~chromatin).astype(np.uint8), cv2.DIST_L2, 3)
            radius = np.sqrt(cell.sum() / np.pi)
            near, far = cell & ~chromatin & (d < 0.4 * radius), cell & (d >= 0.4 * radius)
            if near.sum() > 100 and far.sum() > 100:
                glow.append(float(bg[near].mean() / bg[far].mean()))
                level.append(float(bg[cell].mean() / bg[interphase].mean()))
    assert len(glow) >= 8
    assert np.median(glow) < 1.1, sorted(np.round(glow, 2))
    # At the interphase cytoplasm's level: neither the brightest cells of the field nor bare.
    assert 0.6 < np.median(level) < 1.5, sorted(np.round(level, 2))
