"""Textures of the four HPA channels and the green patterns of the 19 classes.

Every function works on the whole field at once: primitives (dots, fibres,
arcs) are drawn for all selected cells in a few OpenCV calls and masked by the
label maps, so no Python loop runs over pixels. Maps are float32, roughly in
[0, 1]; the generator scales, sums and quantises them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import cv2
import numpy as np

from locus.training.sim.geometry import FieldGeometry, smooth_noise

__all__ = [
    "PaintContext",
    "SPINDLE_POLE_ZONE",
    "SPINDLE_POOL",
    "PATTERNS",
    "NUCLEAR_CLASSES",
    "BACKGROUND_ER_FOLLOW",
    "BACKGROUND_PERINUCLEAR",
    "background_stain",
    "red_channel",
    "yellow_channel",
    "blue_channel",
]

#: Gaussian width (sigma, reference px) of the bright zone a spindle protein fills round each pole, where the fibres
#: converge (HPA-sim 2.8; 2.7 drew a 9 px glow under a point-like pole).
SPINDLE_POLE_ZONE = 20.0
#: A spindle protein's granular pool in its mitotic cell, relative to the spindle (HPA-sim 2.8; 2.7 drew a smooth
#: pool of 0.12-0.35; measured as median over 99th percentile, 2.7's cells held 0.26 and the real cell 0.12).
SPINDLE_POOL = (0.03, 0.1)
#: How far an unannotated background stain's grains follow the ER marker's network, per field: 0 independent of
#: it, 1 only on it (HPA-sim 2.9; 2.8 drew them independently).
BACKGROUND_ER_FOLLOW = (0.2, 1.0)
#: Decay length (reference px) of the background stain's perinuclear gathering (HPA-sim 2.9; 2.8: 40 px over a
#: floor of one half, which gave an enrichment of 1.24 where the real fields show 1.6-1.9).
BACKGROUND_PERINUCLEAR = 18.0
#: Width (sigma, reference px) of the zone round each spindle pole where a mitotic cell's ER gathers, and how much
#: brighter it is there (HPA-sim 2.10; before, an even haze denser round the chromosomes). Measured with
#: :func:`locus.training.sim.compare.er_at_spindle`: on the real mitotic cell of b6a469d8 the ER marker follows the
#: tubulin (correlation 0.57) and is 1.62 times as bright where the tubulin is (its top quarter) as where it is not
#: (its bottom half); HPA-sim 2.9's mitotic cells 0.20 and 1.11, 2.10's 0.58 and 1.62 (31 cells of 6 spindle fields
#: at 2048², seed 4242).
MITOTIC_ER_POLE_ZONE = 40.0
MITOTIC_ER_POLE_GAIN = 1.2

#: Classes whose pattern lies inside the nucleus (they dissolve in mitosis).
NUCLEAR_CLASSES: frozenset[int] = frozenset({0, 1, 2, 3, 4, 5})


class PaintContext:
    """Shared, lazily computed maps of one field (masks, distances, base structures).

    Parameters
    ----------
    geo : FieldGeometry
        The field's cells and nuclei.
    rng : numpy.random.Generator
        The field's random source.
    """

    def __init__(self, geo: FieldGeometry, rng: np.random.Generator):
        self.geo = geo
        self.rng = rng
        self.s = geo.scale
        self.shape = geo.cells.shape
        self.cells = geo.cells
        self.cell_mask = geo.cells > 0
        self.nuc_mask = geo.nuclei > 0
        self.cyto = self.cell_mask & ~self.nuc_mask

    def px(self, ref: float) -> float:
        """Convert a length at the 2048² reference scale to pixels of this field."""
        return ref * self.s

    @cached_property
    def d_nuc_out(self) -> np.ndarray:
        """Distance (px) from the nearest nucleus; 0 inside nuclei."""
        return cv2.distanceTransform((~self.nuc_mask).astype(np.uint8), cv2.DIST_L2, 3)

    @cached_property
    def d_nuc_in(self) -> np.ndarray:
        """Distance (px) inside a nucleus to its border; 0 outside."""
        return cv2.distanceTransform(self.nuc_mask.astype(np.uint8), cv2.DIST_L2, 3)

    @cached_property
    def d_border(self) -> np.ndarray:
        """Distance (px) inside a cell to its border (background or a neighbouring cell)."""
        c = self.cells
        inner = self.cell_mask.copy()
        inner[:, 1:] &= c[:, 1:] == c[:, :-1]
        inner[:, :-1] &= c[:, :-1] == c[:, 1:]
        inner[1:, :] &= c[1:, :] == c[:-1, :]
        inner[:-1, :] &= c[:-1, :] == c[1:, :]
        return cv2.distanceTransform(inner.astype(np.uint8), cv2.DIST_L2, 3)

    @cached_property
    def over_nucleus(self) -> np.ndarray:
        """Per cell, how much of its cytoplasmic stain shows over its nucleus (0.15-0.7; 0 outside nuclei).

        A cultured cell is flat but not flat enough for the nucleus to be a hole in the cytoplasm: in a confocal
        slice the cytoplasm above and below it shows. On the real fields (``../shared/hpa-real``, the HPA
        website sample) every cytoplasmic stain (ER, cytosol, actin, microtubules) continues over the nucleus at
        roughly a third to four fifths of its level beside it, with its texture; drawn black there, a model
        learns a dark nucleus as part of each cytoplasmic pattern and calls nucleoplasm where it is not.
        """
        lut = self.rng.uniform(0.15, 0.7, self.geo.n + 1).astype(np.float32)
        lut[0] = 0.0
        return lut[self.geo.nuclei]

    @cached_property
    def cyto_weight(self) -> np.ndarray:
        """Weight of a cytoplasmic stain: 1 in the cytoplasm, :attr:`over_nucleus` over the nucleus."""
        return (self.cyto + self.over_nucleus).astype(np.float32)

    @cached_property
    def er(self) -> np.ndarray:
        """Reticular ER network: Voronoi edges of points denser near the nucleus, plus perinuclear sheets."""
        return er_network(self)

    @cached_property
    def mt(self) -> np.ndarray:
        """Microtubule network: fibres radiating from the centrosome plus a curved meshwork."""
        return microtubules(self)

    @cached_property
    def mitotic_cells(self) -> np.ndarray:
        """bool HxW: the pixels of mitotic cells."""
        return cell_lut(self.geo.n, np.flatnonzero(self.geo.mitotic) + 1, 1.0)[self.cells] > 0

    @cached_property
    def spindle(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Spindle microtubules of every mitotic cell: (map, pole positions (p, 2), pole brightness (p,)).

        Tubulin is in the spindle during mitosis, so the same structure is the microtubule channel of a
        mitotic cell and the pattern of a protein that marks the spindle.
        """
        return spindle_network(self)

    @cached_property
    def seam(self) -> np.ndarray:
        """Multiplicative dimming (0.45-1) along cell borders: the dark line between touching cells.

        Where a cell overlaps its neighbour there is no line and both cells' stains add up (factor above 1).
        Weaker lines (as between some real touching cells) were tried: the classical segmenter then matched
        only 84% of the cells at IoU 0.6 (93% with these), so the lines stay until it segments better.
        """
        dim = 1.0 - 0.55 * np.exp(-self.d_border / np.float32(self.px(2.5)))
        ov = self.geo.overlap
        return (dim * (1.0 - ov) + ov * 1.35).astype(np.float32)

    def sample_points(self, region: np.ndarray, density: float, weight: np.ndarray | None = None) -> np.ndarray:
        """Uniform random points (x, y) inside ``region`` at ``density`` per reference px².

        Parameters
        ----------
        region : numpy.ndarray
            bool HxW mask.
        density : float
            Expected points per pixel at the reference scale (a pixel here covers ``1/s²`` of those).
        weight : numpy.ndarray, optional
            Acceptance probability map in [0, 1].

        Returns
        -------
        numpy.ndarray
            (k, 2) float positions.
        """
        h, w = self.shape
        n = self.rng.poisson(density / (self.s**2) * h * w) if density > 0 else 0
        n = int(min(n, 4_000_000))
        xy = self.rng.uniform(0, 1, (n, 2)) * np.array([w, h])
        xi = np.minimum(xy[:, 0].astype(np.int32), w - 1)
        yi = np.minimum(xy[:, 1].astype(np.int32), h - 1)
        ok = region[yi, xi]
        if weight is not None:
            ok &= self.rng.random(n) < weight[yi, xi]
        return xy[ok]


def cell_lut(n: int, ids: np.ndarray | list[int], value: float | np.ndarray = 1.0) -> np.ndarray:
    """A lookup table over cell ids 0..n with ``value`` at ``ids`` and 0 elsewhere."""
    lut = np.zeros(n + 1, np.float32)
    lut[np.asarray(ids, dtype=np.int64)] = value
    return lut


def splat(shape: tuple[int, int], xy: np.ndarray, sigma: float, amp: np.ndarray | float = 1.0) -> np.ndarray:
    """Gaussian spots of width ``sigma`` at ``xy``, peak about ``amp``.

    Parameters
    ----------
    shape : tuple of int
        (height, width).
    xy : numpy.ndarray
        (k, 2) positions.
    sigma : float
        Spot width in pixels.
    amp : float or numpy.ndarray
        Peak height(s).

    Returns
    -------
    numpy.ndarray
        float32 map.
    """
    h, w = shape
    out = np.zeros((h, w), np.float32)
    if len(xy) == 0:
        return out
    xi = np.clip(np.rint(xy[:, 0]).astype(np.int64), 0, w - 1)
    yi = np.clip(np.rint(xy[:, 1]).astype(np.int64), 0, h - 1)
    np.add.at(out.ravel(), yi * w + xi, np.broadcast_to(np.asarray(amp, np.float32), (len(xy),)))
    sigma = max(sigma, 0.5)
    out = cv2.GaussianBlur(out, (0, 0), sigma)
    out *= np.float32(2 * np.pi * sigma * sigma)
    return out


def walk(
    starts: np.ndarray, angles: np.ndarray, step: float, nsteps: int, curvature: float, rng: np.random.Generator
) -> np.ndarray:
    """Random-walk polylines: (F, nsteps + 1, 2) points from ``starts`` heading ``angles``."""
    f = len(starts)
    dth = rng.normal(0.0, curvature, (f, nsteps))
    theta = angles[:, None] + np.cumsum(dth, axis=1)
    steps = step * np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    pts = np.concatenate([starts[:, None, :], starts[:, None, :] + np.cumsum(steps, axis=1)], axis=1)
    return pts


def draw_fibres(
    shape: tuple[int, int],
    pts: np.ndarray,
    owner: np.ndarray,
    cells: np.ndarray,
    *,
    thickness: int = 1,
    prefix: bool = True,
    value: float = 1.0,
    groups: int = 3,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Draw polylines clipped to their owner cell.

    Parameters
    ----------
    shape : tuple of int
        (height, width).
    pts : numpy.ndarray
        (F, S, 2) polyline points.
    owner : numpy.ndarray
        (F,) cell id of each fibre.
    cells : numpy.ndarray
        Cell label image.
    thickness : int
        Line thickness in pixels.
    prefix : bool
        Stop a fibre where it first leaves its cell (else draw every segment that lies in it).
    value : float
        Brightness of the brightest group.
    groups : int
        Fibres are split into this many brightness groups (overlaps within a group do not add up).
    rng : numpy.random.Generator, optional
        Source for the brightness group of each fibre.

    Returns
    -------
    numpy.ndarray
        float32 map.
    """
    h, w = shape
    out = np.zeros((h, w), np.float32)
    if len(pts) == 0:
        return out
    xi = np.rint(pts[..., 0]).astype(np.int64)
    yi = np.rint(pts[..., 1]).astype(np.int64)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    lab = cells[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
    ok = inside & (lab == owner[:, None])
    if prefix:
        ok = np.cumprod(ok, axis=1).astype(bool)
    grp = rng.integers(0, groups, len(pts)) if rng is not None else np.arange(len(pts)) % groups
    fixed = np.rint(pts * 4).astype(np.int32)
    if prefix:
        # Each fibre is one polyline up to where it first leaves its cell.
        length = ok.sum(axis=1)
        per_group = [[fixed[f, : length[f]] for f in np.flatnonzero((length >= 2) & (grp == g))] for g in range(groups)]
    else:
        seg = ok[:, :-1] & ok[:, 1:]
        per_group = []
        for g in range(groups):
            sel = seg & (grp == g)[:, None]
            per_group.append(list(np.stack([fixed[:, :-1][sel], fixed[:, 1:][sel]], axis=1)))
    for g, lines in enumerate(per_group):
        if not lines:
            continue
        canvas = np.zeros((h, w), np.float32)
        cv2.polylines(canvas, lines, False, value * (0.45 + 0.55 * (g + 1) / groups), thickness, cv2.LINE_8, 2)
        out += canvas
    return out


def _thin(ctx: PaintContext) -> int:
    return 1 if ctx.s < 0.7 else 2


def er_network(ctx: PaintContext) -> np.ndarray:
    """Reticular ER: polygon network, denser and brighter near the nucleus, within cells."""
    h, w = ctx.shape
    d = ctx.d_nuc_out
    weight = np.exp(-d / np.float32(ctx.px(45.0)))
    pts = ctx.sample_points(ctx.cell_mask, 1.0 / 70.0, weight * 0.8 + 0.2)
    if len(pts) < 2:
        return np.zeros((h, w), np.float32)
    seeds = np.ones((h, w), np.uint8)
    xi = np.clip(pts[:, 0].astype(np.int64), 0, w - 1)
    yi = np.clip(pts[:, 1].astype(np.int64), 0, h - 1)
    seeds[yi, xi] = 0
    _, lab = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_PIXEL)
    edge = np.zeros((h, w), np.float32)
    edge[:, 1:] += lab[:, 1:] != lab[:, :-1]
    edge[1:, :] += lab[1:, :] != lab[:-1, :]
    edge = np.minimum(edge, 1.0)
    edge = cv2.GaussianBlur(edge, (0, 0), max(0.5, ctx.px(1.3)))
    edge /= max(float(edge.max()), 1e-6)
    # Clipped at 3 sd: a deeper trough would turn the stain negative (a black line after quantisation).
    grain = np.clip(smooth_noise((h, w), ctx.px(6.0), ctx.rng), -3.0, 3.0)
    gaps = np.clip(0.6 + 0.5 * smooth_noise((h, w), ctx.px(10.0), ctx.rng), 0.0, 1.0)
    net = edge * (0.75 + 0.25 * grain) * gaps * (0.35 + 0.65 * weight)
    # Perinuclear sheets: a broad, mottled (not smooth) zone that fades into the network; the nuclear
    # envelope is part of the ER, so a thin rim lines the nucleus, but the stain never stops at the rim.
    mottle = np.clip(0.55 + 0.45 * smooth_noise((h, w), ctx.px(4.0), ctx.rng), 0.0, 1.0)
    sheet = 0.32 * np.exp(-d / np.float32(ctx.px(40.0))) * mottle
    envelope = 0.25 * np.exp(-(((ctx.d_nuc_out - ctx.px(1.5)) / np.float32(ctx.px(3.0))) ** 2))
    base = 0.08
    out = (net + sheet + envelope + base) * ctx.cyto
    # The network (and the edge of the sheets) above and below the nucleus.
    out += (net + 0.5 * sheet + base) * ctx.over_nucleus
    if ctx.geo.mitotic.any():
        # A mitotic cell's ER is a fine haze through the rounded cell (the real mitotic cell of b6a469d8), not an
        # interphase network round a nucleus: the envelope is gone, and the ER gathers round the spindle poles
        # (brighter round the in-focus pole, as the tubulin is).
        _, poles, amps = ctx.spindle
        zone = np.minimum(splat(ctx.shape, poles, ctx.px(MITOTIC_ER_POLE_ZONE), amps), 1.0)
        haze = (0.2 * (0.8 + 0.2 * grain) + 0.35 * net) * (1.0 + MITOTIC_ER_POLE_GAIN * zone)
        out = np.where(ctx.mitotic_cells, haze * ctx.cell_mask, out)
    return out.astype(np.float32)


def microtubules(ctx: PaintContext) -> np.ndarray:
    """Microtubules: fibres radiating from each centrosome to the cell edge plus a curved meshwork."""
    g, rng = ctx.geo, ctx.rng
    h, w = ctx.shape
    if g.n == 0:
        return np.zeros((h, w), np.float32)
    per_cell = np.maximum(6, (g.cell_radius / ctx.s * 0.22).astype(int))
    owner = np.repeat(np.arange(1, g.n + 1), per_cell)
    starts = np.repeat(g.centrosome, per_cell, axis=0) + rng.normal(0, ctx.px(4), (len(owner), 2))
    ang = rng.uniform(0, 2 * np.pi, len(owner))
    step = ctx.px(9.0)
    nsteps = int(np.ceil(2.6 * g.cell_radius.max() / step))
    pts = walk(starts, ang, step, nsteps, 0.13, rng)
    radial = draw_fibres(ctx.shape, pts, owner, ctx.cells, thickness=1, rng=rng, value=0.8)
    mstarts = ctx.sample_points(ctx.cyto, 1.0 / 260.0)
    mown = ctx.cells[mstarts[:, 1].astype(int), mstarts[:, 0].astype(int)].astype(np.int64)
    mpts = walk(mstarts, rng.uniform(0, 2 * np.pi, len(mstarts)), step, 12, 0.2, rng)
    mesh = draw_fibres(ctx.shape, mpts, mown, ctx.cells, thickness=1, prefix=True, rng=rng, value=0.6)
    fib = cv2.GaussianBlur(radial + mesh, (0, 0), max(0.5, ctx.px(1.0)))
    fib = np.minimum(fib, 1.3)
    cortex = np.exp(-ctx.d_border / np.float32(ctx.px(12.0)))
    peri = np.exp(-ctx.d_nuc_out / np.float32(ctx.px(25.0)))
    out = (0.6 * fib + 0.12 + 0.3 * cortex + 0.25 * peri) * ctx.cell_mask
    out *= np.where(ctx.nuc_mask, np.float32(0.55), np.float32(1.0))
    if g.mitotic.any():
        # In mitosis the interphase array is gone: tubulin is in the spindle and a soluble pool round it.
        spindle = ctx.spindle[0]
        out = np.where(ctx.mitotic_cells, 0.8 * spindle + 0.12 + 0.1 * cortex, out)
    return out.astype(np.float32)


def spindle_network(ctx: PaintContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spindles of all mitotic cells, as a confocal slice sees them.

    Each half-spindle is a fan of kinetochore fibres from its pole to the chromosomes, a dense cone and a
    few short astral fibres from the pole towards the cortex; the poles are brightest. Most spindles lie
    parallel to the dish, some are tilted (on the real mitotic-spindle field b6a469d8 one pole is in focus
    and bright, the other faint): a tilted axis is foreshortened, and its far half is dimmer and blurred.

    Returns
    -------
    tuple of numpy.ndarray
        The float32 map (0 outside mitotic cells), the poles' (x, y) positions and their brightness.
    """
    g, rng = ctx.geo, ctx.rng
    h, w = ctx.shape
    ids = np.flatnonzero(g.mitotic) + 1
    if len(ids) == 0:
        return np.zeros((h, w), np.float32), np.zeros((0, 2)), np.zeros(0)
    halves: dict[bool, tuple[list[np.ndarray], list[np.ndarray]]] = {True: ([], []), False: ([], [])}
    poles, pole_amp = [], []
    cone = np.zeros((h, w), np.float32)
    far_lut = np.ones(g.n + 1, np.float32)
    for k in ids:
        i = k - 1
        c = g.nuc_center[i]
        sp = g.spindle_angle[i]
        d = np.array([np.cos(sp), np.sin(sp)])
        perp = np.array([-d[1], d[0]])
        # Adherent cells mostly hold the spindle parallel to the dish; some tilt it.
        tilt_cos = rng.uniform(0.97, 1.0) if rng.random() < 0.6 else rng.uniform(0.4, 0.9)
        far_amp = 1.0 - 0.75 * np.sqrt(1.0 - tilt_cos**2)
        far_lut[k] = far_amp
        half = rng.uniform(0.42, 0.55) * g.cell_radius[i] * tilt_cos
        reach = g.nuc_axes[i, 0] * 0.95
        near_sign = rng.choice([-1.0, 1.0])
        for sign in (-1.0, 1.0):
            near = sign == near_sign
            amp = 1.0 if near else far_amp
            pole = c + sign * half * d
            poles.append(pole)
            pole_amp.append(amp)
            m = 20
            ends = (
                c
                + perp * rng.uniform(-1, 1, m)[:, None] * reach
                - sign * d * rng.uniform(0, 0.5, m)[:, None] * g.nuc_axes[i, 1]
            )
            t = np.linspace(0, 1, 12)[None, :, None]
            pts = pole[None, None, :] * (1 - t) + ends[:, None, :] * t
            # Astral fibres: straight, from the pole away from the chromosomes, many reaching towards the cortex
            # (HPA-sim 2.7; before, ten short ones left the rest of the cell an even glow).
            na = 22
            ang = sp + (np.pi if sign < 0 else 0.0) + rng.uniform(-1.6, 1.6, na)
            length = rng.uniform(0.25, 0.75, na) * g.cell_radius[i]
            dirs = np.stack([np.cos(ang), np.sin(ang)], 1)
            astral = pole[None, None, :] + t * (length[:, None] * dirs)[:, None, :]
            halves[near][0].extend([pts, astral])
            halves[near][1].extend([np.full(m, k), np.full(na, k)])
            tri = np.array([pole, c + perp * reach, c - perp * reach]) * 4
            cv2.fillConvexPoly(cone, np.rint(tri).astype(np.int32), amp, cv2.LINE_8, 2)
    fib = np.zeros((h, w), np.float32)
    for near, (pts_list, own_list) in halves.items():
        if not pts_list:
            continue
        f = draw_fibres(
            ctx.shape,
            np.concatenate(pts_list),
            np.concatenate(own_list),
            ctx.cells,
            thickness=_thin(ctx),
            prefix=False,
            rng=rng,
            value=0.5,
        )
        f = cv2.GaussianBlur(f, (0, 0), max(0.6, ctx.px(1.5 if near else 3.0)))
        fib += f if near else f * far_lut[ctx.cells]
    # Soft saturation: streaks stay visible where fibres are sparse; the poles, where they meet, are brightest.
    fib = 1.2 * (1.0 - np.exp(-fib / np.float32(0.5)))
    poles_xy, amps = np.array(poles), np.array(pole_amp)
    fib += splat(ctx.shape, poles_xy, ctx.px(5.0), 0.8 * amps)
    fib += 0.1 * cv2.GaussianBlur(cone, (0, 0), max(0.6, ctx.px(12.0)))
    return (fib * ctx.mitotic_cells).astype(np.float32), poles_xy, amps


def red_channel(ctx: PaintContext) -> np.ndarray:
    """The red (microtubule) channel structure, dimmed along the seams between cells."""
    return ctx.mt * ctx.seam


def yellow_channel(ctx: PaintContext) -> np.ndarray:
    """The yellow (ER) channel structure, dimmed along the seams between cells."""
    return ctx.er * ctx.seam


def blue_channel(ctx: PaintContext) -> np.ndarray:
    """The blue (nucleus) channel: textured chromatin, darker nucleoli, condensed bright mitotic plates."""
    g = ctx.geo
    tex = smooth_noise(ctx.shape, ctx.px(5.0), ctx.rng)
    fine = smooth_noise(ctx.shape, ctx.px(2.0), ctx.rng)
    coarse = smooth_noise(ctx.shape, ctx.px(25.0), ctx.rng)
    mit = cell_lut(g.n, np.flatnonzero(g.mitotic) + 1, 1.0)[g.nuclei]
    # Chromatin: granular, with brighter heterochromatin clumps and dark holes where the nucleoli sit.
    clumps = np.maximum(smooth_noise(ctx.shape, ctx.px(7.0), ctx.rng) - 0.8, 0.0)
    base = 1.0 + 0.16 * tex + 0.1 * fine + 0.12 * coarse + 0.35 * clumps
    rim = np.exp(-ctx.d_nuc_in / np.float32(ctx.px(8.0)))
    val = base * (1.0 - 0.6 * g.nucleoli) * (0.9 + 0.15 * rim)
    val = np.where(mit > 0, 1.5 + 0.3 * tex, val) * ctx.nuc_mask
    if g.prometaphase.any():
        pro = cell_lut(g.n, np.flatnonzero(g.prometaphase) + 1, 1.0)[g.nuclei] > 0
        val = np.where(pro, _chromosomes(ctx, pro), val)
    val = cv2.GaussianBlur(val.astype(np.float32), (0, 0), max(0.5, ctx.px(1.5)))
    return val


def _chromosomes(ctx: PaintContext, region: np.ndarray) -> np.ndarray:
    """Condensed prometaphase chromosomes: short, thick, bright rods packed in ``region`` with gaps between.

    Sized as real ones at HPA's 0.08 um per pixel (HPA-sim 2.7): about 0.7 um thick and 1.7 um long, as the
    chromosomes of the real mitotic cell of b6a469d8 look (before 2.7: 0.24 um thick and 0.7 um long, specks).
    """
    rng = ctx.rng
    starts = ctx.sample_points(region, 1.0 / 320.0)
    own = ctx.geo.nuclei[starts[:, 1].astype(int), starts[:, 0].astype(int)].astype(np.int64)
    pts = walk(starts, rng.uniform(0, 2 * np.pi, len(starts)), ctx.px(6.0), 2, 0.4, rng)
    thick = max(1, int(round(ctx.px(9.0))))
    rods = draw_fibres(ctx.shape, pts, own, ctx.geo.nuclei, thickness=thick, prefix=False, rng=rng, groups=1)
    return (1.6 * np.minimum(rods, 1.0) + 0.12).astype(np.float32)


def background_stain(ctx: PaintContext) -> np.ndarray:
    """Faint, unannotated granular stain in every cell: an antibody's nonspecific background.

    Real fields show it where nothing is annotated: fine grains over the cytoplasm, gathered round the nucleus,
    fainter over it, and in many fields lying along the ER (the interphase cells of the mitotic-spindle field
    b6a469d8: correlation with the ER marker 0.66, perinuclear enrichment 1.89; the negative field a34d8680: 0.29,
    1.61; measured by ``python -m locus.training.sim.compare --background``). Annotators leave it out, so a model
    must learn it as no localisation rather than as ER or vesicles.

    HPA-sim 2.9: per field, how far the grains follow the ER marker's network (:data:`BACKGROUND_ER_FOLLOW`) and
    a perinuclear zone of :data:`BACKGROUND_PERINUCLEAR` reference px (2.10: not in mitotic cells, which hold it
    evenly); HPA-sim 2.8 drew the grains independently of the ER and only mildly perinuclear (0.26 and 1.24 by the
    same measure), so the only ER-like green a model saw was annotated ER.
    """
    cell = ctx.cell_mask
    er = ctx.er
    ref = float(np.percentile(er[cell], 99)) if cell.any() else 1.0
    er = np.clip(er / max(ref, 1e-6), 0.0, 1.0)
    follow = ctx.rng.uniform(*BACKGROUND_ER_FOLLOW)
    peri = np.exp(-ctx.d_nuc_out / np.float32(ctx.px(BACKGROUND_PERINUCLEAR)))
    shape = (0.25 + 0.75 * peri) * ((1.0 - follow) + follow * er)
    if ctx.geo.mitotic.any():
        # A mitotic cell has no envelope to gather round and no interphase ER to follow: it holds the stain evenly,
        # at the interphase cytoplasm's mean (HPA-sim 2.10; 2.9 drew it densest round the chromosomes, a glow
        # like a spindle protein's in cells labelled without it).
        mit = ctx.mitotic_cells
        rest = ctx.cyto & ~mit
        even = np.float32(shape[rest].mean()) if rest.any() else np.float32(1.0)
        shape = np.where(mit, even, shape).astype(np.float32)
    # Mean acceptance 0.6 over the cytoplasm whatever the field's shape, so the level stays the caller's.
    shape *= np.float32(0.6 / max(float(shape[ctx.cyto].mean()), 1e-6)) if ctx.cyto.any() else np.float32(1.0)
    weight = ctx.cyto_weight * np.minimum(shape, 1.0)
    pts = ctx.sample_points(cell, 1.0 / 16.0, weight)
    grains = splat(ctx.shape, pts, ctx.px(1.2), ctx.rng.uniform(0.3, 1.0, len(pts)))
    return ((np.minimum(grains, 1.2) + 0.8 * weight) * cell).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Green patterns, one per class. Each takes the context and the ids of the cells that show the
# class and returns a float32 map (0 outside those cells' relevant compartment).
# ----------------------------------------------------------------------------------------------


def _sel(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    return cell_lut(ctx.geo.n, ids, 1.0).astype(bool)[ctx.cells]


def _nucleoplasm(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    tex = smooth_noise(ctx.shape, ctx.px(4.0), ctx.rng)
    v = (0.9 + 0.12 * tex) * (1.0 - 0.9 * ctx.geo.nucleoli)
    return v * (ctx.nuc_mask & _sel(ctx, ids))


def _nuclear_membrane(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    w = np.float32(ctx.px(3.0))
    s = ctx.d_nuc_in - ctx.d_nuc_out
    rim = np.exp(-(((s - w * 0.5) / w) ** 2))
    rim *= 0.85 + 0.15 * smooth_noise(ctx.shape, ctx.px(6.0), ctx.rng)
    sel = _sel(ctx, ids)
    return (rim * sel + 0.05 * (ctx.nuc_mask & sel)).astype(np.float32)


def _nucleoli(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    """Nucleoli: filled bodies, or (in about a third of the cells) rings brighter at the rim than inside.

    Many nucleolar proteins sit at the nucleolar rim (HPA's "nucleoli rim", merged into nucleoli in the Kaggle
    labels); on the real fields such nucleoli show as bright rings around a dimmer core.
    """
    nl = ctx.geo.nucleoli
    ring_ids = ids[ctx.rng.random(len(ids)) < 0.35] if len(ids) else ids
    ring = cell_lut(ctx.geo.n, ring_ids, 1.0)[ctx.cells]
    # A nucleolar protein is concentrated there: the nucleoli are the brightest structure of the cell, well
    # above a nucleoplasm or cytosol stain of the same protein (as on the real field 000a6c98).
    # On a blurred disc, nl (1 - nl) peaks at the edge: a ring whose inside keeps a third of the level.
    rim = np.clip(4.0 * nl * (1.0 - nl), 0.0, 1.0) * 1.8 + 0.5 * nl
    body = ring * rim + (1.0 - ring) * 1.8 * nl
    return (body + 0.04 * ctx.nuc_mask) * _sel(ctx, ids)


def _fibrillar_center(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    region = (ctx.geo.nucleoli > 0.4) & _sel(ctx, ids)
    pts = ctx.sample_points(region, 1.0 / 25.0)
    dots = splat(ctx.shape, pts, ctx.px(1.6), 1.0)
    return np.minimum(dots, 1.4) + 0.1 * ctx.geo.nucleoli * _sel(ctx, ids)


def _speckles(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    sel = _sel(ctx, ids)
    region = ctx.nuc_mask & sel & (ctx.geo.nucleoli < 0.3) & (ctx.d_nuc_in > ctx.px(8.0))
    pts = ctx.sample_points(region, 1.0 / 650.0)
    # Irregular blobs: clusters of 3 offset spots.
    jitter = np.concatenate([pts + ctx.rng.normal(0, ctx.px(4.0), pts.shape) for _ in range(3)])
    blobs = splat(ctx.shape, jitter, ctx.px(3.2), 1.0)
    blobs = np.minimum(blobs, 1.3)
    return (blobs + 0.15 * (ctx.nuc_mask & sel) * (1 - ctx.geo.nucleoli)) * ctx.nuc_mask


def _per_cell_nuclear_points(ctx: PaintContext, ids: np.ndarray, lo: int, hi: int, shrink: float) -> np.ndarray:
    g, rng = ctx.geo, ctx.rng
    out = []
    for k in ids:
        i = k - 1
        m = int(rng.integers(lo, hi + 1))
        r = np.sqrt(rng.uniform(0, 1, m)) * shrink
        a = rng.uniform(0, 2 * np.pi, m)
        u, v = r * np.cos(a) * g.nuc_axes[i, 0], r * np.sin(a) * g.nuc_axes[i, 1]
        c, s = np.cos(g.nuc_angle[i]), np.sin(g.nuc_angle[i])
        out.append(np.stack([g.nuc_center[i, 0] + u * c - v * s, g.nuc_center[i, 1] + u * s + v * c], 1))
    return np.concatenate(out) if out else np.zeros((0, 2))


def _nuclear_bodies(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    """Nuclear bodies: a few bright round foci in the nucleus.

    The protein is concentrated in the bodies, so they stand out well above a nucleoplasmic stain of the same
    protein (peaks 1.6-2.6 against nucleoplasm's 0.9). Before HPA-sim 2.4 they peaked at 0.7-1.0, level with the
    nucleoplasm, and vanished in its texture: the model called nuclear bodies on none of the cells that showed
    both.
    """
    pts = _per_cell_nuclear_points(ctx, ids, 2, 6, 0.75)
    amp = ctx.rng.uniform(1.6, 2.6, len(pts))
    dots = splat(ctx.shape, pts, ctx.px(3.5), amp)
    return (dots + 0.06 * _sel(ctx, ids)) * ctx.nuc_mask


def _er(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    return ctx.er * _sel(ctx, ids)


def _golgi_ribbon(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    g, rng = ctx.geo, ctx.rng
    canvas = np.zeros(ctx.shape, np.float32)
    for k in ids:
        i = k - 1
        cx, cy = g.nuc_center[i]
        dx, dy = g.centrosome[i, 0] - cx, g.centrosome[i, 1] - cy
        base = np.arctan2(dy, dx)
        r_n = float(np.hypot(dx, dy))
        m = int(rng.integers(12, 26))
        ang = base + rng.normal(0, 0.45, m)
        rr = r_n + rng.normal(0, ctx.px(6.0), m)
        for a, r in zip(ang, rr, strict=True):
            px, py = cx + r * np.cos(a), cy + r * np.sin(a)
            ax = max(1, int(ctx.px(rng.uniform(6, 16)) * 4))
            cv2.ellipse(
                canvas,
                (int(px * 4), int(py * 4)),
                (ax, max(1, int(ctx.px(2.5) * 4))),
                float(np.degrees(a) + 90 + rng.normal(0, 20)),
                0,
                360,
                float(rng.uniform(0.6, 1.0)),
                -1,
                cv2.LINE_8,
                2,
            )
    canvas = cv2.GaussianBlur(canvas, (0, 0), max(0.5, ctx.px(1.5)))
    return (canvas + 0.04) * ctx.cyto_weight * _sel(ctx, ids)


def _golgi(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    """Golgi apparatus on one side of the nucleus, as a compact ribbon or (in 40% of cells) dispersed tubules.

    The ribbon is a crescent of stacked elongated cisternae. Real Golgi is as often looser: thin, twisting
    tubules and small stacks spread over a wider perinuclear sector (on the real field 000a6c98 most cells
    show this form). Both keep to one side of the nucleus, which tells them from intermediate filaments
    (long fibres all round it) and the ER (the whole cytoplasm).
    """
    if len(ids) == 0:
        return np.zeros(ctx.shape, np.float32)
    loose = ctx.rng.random(len(ids)) < 0.4
    out = _golgi_ribbon(ctx, ids[~loose]) if (~loose).any() else np.zeros(ctx.shape, np.float32)
    if loose.any():
        out += _golgi_tubular(ctx, ids[loose])
    return out


def _golgi_tubular(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    g, rng = ctx.geo, ctx.rng
    starts, angles, owner = [], [], []
    for k in ids:
        i = k - 1
        c = g.nuc_center[i]
        to_c = g.centrosome[i] - c
        base = float(np.arctan2(to_c[1], to_c[0]))
        r_n = float(np.hypot(*to_c))
        m = int(rng.integers(14, 28))
        a = base + rng.normal(0, 0.8, m)
        r = r_n + np.abs(rng.normal(0, ctx.px(15.0), m))
        p = c + np.stack([np.cos(a), np.sin(a)], 1) * r[:, None]
        starts.append(p)
        angles.append(a + rng.choice([-1.0, 1.0], m) * np.pi / 2 + rng.normal(0, 0.6, m))
        owner.append(np.full(m, k))
    pts = walk(np.concatenate(starts), np.concatenate(angles), ctx.px(3.0), 10, 0.45, rng)
    fib = draw_fibres(
        ctx.shape, pts, np.concatenate(owner), ctx.cells, thickness=_thin(ctx), prefix=True, rng=rng, value=0.75
    )
    fib = cv2.GaussianBlur(fib, (0, 0), max(0.5, ctx.px(1.1)))
    # Small stacks: bright dots along the tubules.
    flat = pts.reshape(-1, 2)
    stacks = flat[rng.random(len(flat)) < 0.06]
    fib += splat(ctx.shape, stacks, ctx.px(2.0), rng.uniform(0.4, 0.9, len(stacks)))
    return ((np.minimum(fib, 1.3) + 0.04) * ctx.cyto_weight * _sel(ctx, ids)).astype(np.float32)


def _intermediate_filaments(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    """Intermediate filaments (vimentin-like): a dense perinuclear cage of long, wavy, bundled fibres.

    Unlike microtubules (fine, fairly straight fibres radiating from the centrosome over the whole cell), the
    filaments wrap around the nucleus: fibres start mostly near it, head tangentially to it and wander, thicker
    than a microtubule, thinning out towards the cell edge, over a faint perinuclear haze.
    """
    g, rng = ctx.geo, ctx.rng
    sel = _sel(ctx, ids)
    weight = 0.1 + 0.9 * np.exp(-ctx.d_nuc_out / np.float32(ctx.px(30.0)))
    starts = ctx.sample_points(ctx.cyto & sel, 1.0 / 1100.0, weight)
    if len(starts) == 0:
        return np.zeros(ctx.shape, np.float32)
    own = ctx.cells[starts[:, 1].astype(int), starts[:, 0].astype(int)].astype(np.int64)
    centre = g.nuc_center[own - 1]
    radial = np.arctan2(starts[:, 1] - centre[:, 1], starts[:, 0] - centre[:, 0])
    turn = np.where(rng.random(len(starts)) < 0.5, np.pi / 2, -np.pi / 2)
    ang = radial + turn + rng.normal(0.0, 0.4, len(starts))
    pts = walk(starts, ang, ctx.px(6.0), 44, 0.22, rng)
    thick = max(1, int(round(ctx.px(3.5))))
    fib = draw_fibres(ctx.shape, pts, own, ctx.cells, thickness=thick, prefix=False, rng=rng, value=0.9)
    fib = cv2.GaussianBlur(fib, (0, 0), max(0.5, ctx.px(1.5)))
    haze = np.exp(-ctx.d_nuc_out / np.float32(ctx.px(30.0)))
    return ((np.minimum(fib, 1.5) + 0.1 * haze + 0.04) * ctx.cyto_weight * sel).astype(np.float32)


def _actin(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    g, rng = ctx.geo, ctx.rng
    sel = _sel(ctx, ids)
    all_pts, owners = [], []
    step = ctx.px(8.0)
    for k in ids:
        i = k - 1
        theta = rng.uniform(0, np.pi)
        d = np.array([np.cos(theta), np.sin(theta)])
        perp = np.array([-d[1], d[0]])
        r = g.cell_radius[i] * 1.5
        m = int(rng.integers(18, 40))
        offs = rng.uniform(-r, r, m)
        starts = g.cell_center[i] + offs[:, None] * perp - r * d
        nsteps = int(2 * r / step)
        ang = np.full(m, theta) + rng.normal(0, 0.04, m)
        all_pts.append(walk(starts, ang, step, nsteps, 0.004, rng))
        owners.append(np.full(m, k))
    if not all_pts:
        return np.zeros(ctx.shape, np.float32)
    nmax = max(p.shape[1] for p in all_pts)
    pts = np.concatenate([np.pad(p, ((0, 0), (0, nmax - p.shape[1]), (0, 0)), mode="edge") for p in all_pts])
    fib = draw_fibres(ctx.shape, pts, np.concatenate(owners), ctx.cells, thickness=_thin(ctx), prefix=False, rng=rng)
    fib = cv2.GaussianBlur(fib, (0, 0), max(0.5, ctx.px(1.2)))
    cortex = np.exp(-ctx.d_border / np.float32(ctx.px(7.0)))
    return ((0.9 * np.minimum(fib, 1.2) + 0.7 * cortex + 0.08) * sel * ctx.cell_mask).astype(np.float32)


def _microtubules(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    return ctx.mt * _sel(ctx, ids)


def _mitotic_spindle(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    """A spindle protein: a broad bright zone round each pole, the fibres, and a faint granular pool.

    Measured on the real spindle cell of b6a469d8 (``python -m locus.training.sim.compare --mitosis``): its stain
    is brightest over a broad zone where the fibres converge at the in-focus pole (peak: 99.9th over 99th
    percentile 1.02, no point), and the rest of the cell holds a faint, grainy pool (median over 99th percentile
    0.12, grain 0.49). HPA-sim 2.7 drew point poles over a smooth, brighter pool (1.48, 0.26, 0.21); 2.8 draws
    the zone and the grains.
    """
    g, rng = ctx.geo, ctx.rng
    ids = np.asarray([k for k in ids if g.mitotic[k - 1]], dtype=np.int64)
    if len(ids) == 0:
        return np.zeros(ctx.shape, np.float32)
    spindle, poles, amps = ctx.spindle
    sel = _sel(ctx, ids)
    owner = g.cells[
        np.clip(np.rint(poles[:, 1]).astype(int), 0, ctx.shape[0] - 1),
        np.clip(np.rint(poles[:, 0]).astype(int), 0, ctx.shape[1] - 1),
    ]
    zone = splat(ctx.shape, poles, ctx.px(SPINDLE_POLE_ZONE), 0.9 * amps * np.isin(owner, ids))
    # Where fibres meet at a pole the stain plateaus over a zone instead of peaking at a point.
    stain = np.minimum(0.6 * spindle + zone, 1.0)
    pts = ctx.sample_points(sel, 1.0 / 25.0)
    grains = np.minimum(splat(ctx.shape, pts, ctx.px(1.2), rng.uniform(0.3, 1.0, len(pts))), 1.2)
    pool = cell_lut(g.n, ids, rng.uniform(*SPINDLE_POOL))[ctx.cells] * (0.3 + grains)
    return ((stain + pool) * sel).astype(np.float32)


def _centrosome(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    g, rng = ctx.geo, ctx.rng
    pts = []
    for k in ids:
        c = g.centrosome[k - 1]
        pts.append(c)
        if rng.random() < 0.5:
            pts.append(c + rng.normal(0, ctx.px(5.0), 2))
    dots = splat(ctx.shape, np.array(pts), ctx.px(3.0), 1.0)
    return np.minimum(dots, 1.2) * _sel(ctx, ids) + 0.03 * ctx.cyto * _sel(ctx, ids)


def _plasma_membrane(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    rim = np.exp(-((ctx.d_border / np.float32(ctx.px(5.0))) ** 2))
    rim *= 0.8 + 0.2 * smooth_noise(ctx.shape, ctx.px(8.0), ctx.rng)
    return (rim + 0.05) * ctx.cell_mask * _sel(ctx, ids)


def _mitochondria(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    sel = _sel(ctx, ids)
    weight = 0.35 + 0.65 * np.exp(-ctx.d_nuc_out / np.float32(ctx.px(50.0)))
    weight = np.where(ctx.nuc_mask, ctx.over_nucleus, weight)
    starts = ctx.sample_points(ctx.cell_mask & sel, 1.0 / 260.0, weight)
    own = ctx.cells[starts[:, 1].astype(int), starts[:, 0].astype(int)].astype(np.int64)
    step = ctx.px(5.0)
    pts = walk(starts, ctx.rng.uniform(0, 2 * np.pi, len(starts)), step, 4, 0.35, ctx.rng)
    fib = draw_fibres(ctx.shape, pts, own, ctx.cells, thickness=_thin(ctx) + 1, prefix=True, rng=ctx.rng)
    fib = cv2.GaussianBlur(fib, (0, 0), max(0.5, ctx.px(1.5)))
    return (np.minimum(fib, 1.3) + 0.04) * ctx.cyto_weight * sel


def _aggresome(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    g, rng = ctx.geo, ctx.rng
    pts, amps = [], []
    for k in ids:
        i = k - 1
        c = g.centrosome[i] + rng.normal(0, ctx.px(6.0), 2)
        for _ in range(4):
            pts.append(c + rng.normal(0, ctx.px(6.0), 2))
            amps.append(rng.uniform(0.6, 1.0))
    blob = splat(ctx.shape, np.array(pts), ctx.px(10.0), np.array(amps))
    blob = np.minimum(blob, 1.8)
    return (blob + 0.05 * ctx.cyto) * _sel(ctx, ids) * ctx.cell_mask


def _cytosol(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    tex = smooth_noise(ctx.shape, ctx.px(5.0), ctx.rng)
    edge = 1.0 - 0.35 * np.exp(-ctx.d_border / np.float32(ctx.px(10.0)))
    return ((0.85 + 0.15 * tex) * edge * ctx.cyto_weight * _sel(ctx, ids)).astype(np.float32)


def _vesicles(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    sel = _sel(ctx, ids)
    pts = ctx.sample_points(ctx.cell_mask & sel, 1.0 / 900.0, ctx.cyto_weight)
    amp = ctx.rng.uniform(0.5, 1.0, len(pts))
    dots = splat(ctx.shape, pts, ctx.px(2.6), amp)
    return (np.minimum(dots, 1.3) + 0.05) * ctx.cyto_weight * sel


def _negative(ctx: PaintContext, ids: np.ndarray) -> np.ndarray:
    return np.zeros(ctx.shape, np.float32)


#: Green pattern painter per class id: ``painter(ctx, cell_ids) -> float32 map``.
PATTERNS: dict[int, Callable[[PaintContext, np.ndarray], np.ndarray]] = {
    0: _nucleoplasm,
    1: _nuclear_membrane,
    2: _nucleoli,
    3: _fibrillar_center,
    4: _speckles,
    5: _nuclear_bodies,
    6: _er,
    7: _golgi,
    8: _intermediate_filaments,
    9: _actin,
    10: _microtubules,
    11: _mitotic_spindle,
    12: _centrosome,
    13: _plasma_membrane,
    14: _mitochondria,
    15: _aggresome,
    16: _cytosol,
    17: _vesicles,
    18: _negative,
}
