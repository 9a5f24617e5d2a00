"""Cell and nucleus geometry of an HPA-sim field of view.

Cells are grown from seed points placed by dart throwing (Poisson-disc with a
per-cell radius and a smooth density field, so cells cluster with background
between groups). Each cell owns an ellipse-like territory with a noisy radial
profile, some drawn out into one tapering process (teardrop) or two (spindle);
touching territories are split by a weighted Voronoi rule (the smallest
normalised elliptical distance wins) whose boundaries are perturbed by smooth
noise, and where one of two touching cells overlaps the other the shared zone
is recorded (its stains add up). Each cell holds one nucleus (a smaller noisy
ellipse, or a condensed metaphase plate for mitotic cells); a few hold two.
All lengths are given at the 2048-pixel reference scale (0.08 um per pixel,
HPA's confocal images) and multiplied by ``scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "METAPHASE_SHORT",
    "MITOTIC_CHROMATIN_LONG",
    "PROMETAPHASE_SHORT",
    "FieldGeometry",
    "make_geometry",
    "smooth_noise",
]

#: Reference (2048² field) mean cell radius in pixels: cells 250-400 px across.
REF_CELL_RADIUS = 160.0
_TABLE = 1024
#: Semi-axes of a mitotic cell's chromatin relative to the rounded cell's radius (HPA-sim 2.7): the long one (the
#: metaphase plate's half-length, or the prometaphase cloud's), the short one of a metaphase plate and of a
#: prometaphase cloud. Chromosomes condense but do not shrink: the plate spans about the interphase nucleus' length,
#: over half the rounded cell. Measured with ``python -m locus.training.sim.compare --mitosis`` (length and width of
#: the chromatin over the cell's diameter): the real mitotic cell of b6a469d8 0.96 by 0.41; HPA-sim 2.6's mitotic
#: cells (0.33-0.42, and 0.08-0.13 or 0.22-0.3) 0.41 (0.23-0.60) by 0.16 (0.08-0.36); 2.7's 0.72 (0.55-1.02) by 0.36
#: (0.13-0.52), short of the real cell, whose segmented outline is tighter than the truth masks' outlines.
MITOTIC_CHROMATIN_LONG = (0.5, 0.68)
METAPHASE_SHORT = (0.12, 0.2)
PROMETAPHASE_SHORT = (0.36, 0.5)


def smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-correlated noise with zero mean and unit standard deviation.

    Parameters
    ----------
    shape : tuple of int
        (height, width) of the result.
    sigma : float
        Correlation length in pixels. Large values are generated at a lower
        resolution and upsampled, so the cost stays low.
    rng : numpy.random.Generator
        Random source.

    Returns
    -------
    numpy.ndarray
        float32 array of ``shape``.
    """
    h, w = shape
    factor = max(1.0, sigma / 2.0)
    sh, sw = max(4, int(np.ceil(h / factor)) + 2), max(4, int(np.ceil(w / factor)) + 2)
    small = rng.standard_normal((sh, sw), dtype=np.float32)
    small = cv2.GaussianBlur(small, (0, 0), max(0.5, sigma / factor), borderType=cv2.BORDER_REFLECT)
    # Normalise on the small array (cheap); upsampling keeps mean and, closely, the spread.
    small -= np.float32(small.mean())
    std = float(small.std())
    if std > 0:
        small *= np.float32(1.0 / std)
    return small if (sh, sw) == (h, w) else cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


@dataclass
class FieldGeometry:
    """Label maps and per-cell metadata of one field; arrays are indexed by ``cell_id - 1``.

    Attributes
    ----------
    cells, nuclei : numpy.ndarray
        uint16 label images, 0 = background, cells ``1..n``; nucleus k lies inside cell k.
    n : int
        Number of cells.
    scale : float
        Pixel scale relative to the 2048² reference field.
    cell_center : numpy.ndarray
        (n, 2) float x, y of each cell's territory centre.
    cell_radius : numpy.ndarray
        (n,) nominal radius of each cell.
    nuc_center, nuc_axes, nuc_angle : numpy.ndarray
        Nucleus ellipse: (n, 2) centre x, y; (n, 2) semi-axes; (n,) orientation in radians.
    centrosome : numpy.ndarray
        (n, 2) x, y of the centrosome (next to the nucleus); for mitotic cells the first spindle pole.
    mitotic : numpy.ndarray
        (n,) bool, cell is in mitosis (condensed chromosomes).
    spindle_angle : numpy.ndarray
        (n,) spindle axis of mitotic cells (perpendicular to the metaphase plate).
    nucleoli : numpy.ndarray
        float32 map in [0, 1] of nucleoli (inside nuclei of interphase cells).
    nucleoli_spots : list of numpy.ndarray
        Per cell, (k, 3) x, y, radius of its nucleoli.
    overlap : numpy.ndarray
        float32 map in [0, 1]: where a cell lies over its neighbour (both cells' stains add up there;
        the label image gives the pixel to one of them, as a segmentation would).
    multinucleate : numpy.ndarray
        (n,) bool, the cell holds two nuclei (one nucleus label, two blobs).
    prometaphase : numpy.ndarray
        (n,) bool, a mitotic cell whose chromosomes are a rounded cloud of separate condensed rods (the
        others hold a metaphase plate).
    """

    cells: np.ndarray
    nuclei: np.ndarray
    n: int
    scale: float
    cell_center: np.ndarray
    cell_radius: np.ndarray
    nuc_center: np.ndarray
    nuc_axes: np.ndarray
    nuc_angle: np.ndarray
    centrosome: np.ndarray
    mitotic: np.ndarray
    spindle_angle: np.ndarray
    nucleoli: np.ndarray
    nucleoli_spots: list[np.ndarray]
    overlap: np.ndarray
    multinucleate: np.ndarray
    prometaphase: np.ndarray


def _place_seeds(
    size: int, rng: np.random.Generator, n_target: int, r_mean: float, spacing: float
) -> tuple[np.ndarray, np.ndarray]:
    """Dart-throw seed points with per-seed radii; returns (points (m, 2), radii (m,))."""
    margin = 0.7 * r_mean
    grid = rng.standard_normal((4, 4)).astype(np.float32)
    density = cv2.resize(grid, (64, 64), interpolation=cv2.INTER_CUBIC)
    bias = rng.uniform(-0.5, 1.5)
    attempts = 60 * n_target + 200
    cand = rng.uniform(-margin, size + margin, (attempts, 2))
    radii = r_mean * rng.uniform(0.72, 1.32, attempts)
    gx = np.clip((cand[:, 0] / size * 63).astype(int), 0, 63)
    gy = np.clip((cand[:, 1] / size * 63).astype(int), 0, 63)
    p_accept = 1.0 / (1.0 + np.exp(-(2.0 * density[gy, gx] + bias)))
    keep = rng.random(attempts) < p_accept
    cand, radii = cand[keep], radii[keep]
    inside = (cand[:, 0] >= 0) & (cand[:, 0] < size) & (cand[:, 1] >= 0) & (cand[:, 1] < size)
    pts = np.empty((len(cand), 2))
    rad = np.empty(len(cand))
    m = 0
    n_in = 0
    for i in range(len(cand)):
        if m:
            d = np.hypot(pts[:m, 0] - cand[i, 0], pts[:m, 1] - cand[i, 1])
            if np.any(d < spacing * (rad[:m] + radii[i])):
                continue
        pts[m], rad[m] = cand[i], radii[i]
        m += 1
        n_in += bool(inside[i])
        if n_in >= n_target:
            break
    return pts[:m], rad[:m]


def _radial_profile(rng: np.random.Generator, amp: float, n_terms: int = 5) -> np.ndarray:
    """Fourier coefficients (k, amplitude, phase) of a noisy radial profile."""
    ks = np.arange(1, 1 + n_terms)
    amps = amp * rng.uniform(0.2, 1.0, n_terms) / np.maximum(ks - 1, 1) ** 0.8
    phases = rng.uniform(0, 2 * np.pi, n_terms)
    return np.stack([ks, amps, phases], axis=1)


def _ellipse_metric(
    xs: np.ndarray,
    ys: np.ndarray,
    cx: float,
    cy: float,
    a: float,
    b: float,
    theta: float,
    profile: np.ndarray,
    tails: np.ndarray | None = None,
) -> np.ndarray:
    """Normalised elliptical distance (1 on the noisy boundary) over a pixel grid.

    ``tails`` holds rows (direction in the ellipse frame, amplitude, angular width): each
    stretches the boundary into a tapering process (a teardrop tail; two opposite tails give a
    spindle-shaped cell).
    """
    dx = xs - np.float32(cx)
    dy = ys - np.float32(cy)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    u = (dx * c + dy * s) * np.float32(1.0 / a)
    v = (dy * c - dx * s) * np.float32(1.0 / b)
    mag, ang = cv2.cartToPolar(u, v)
    table_ang = np.linspace(0, 2 * np.pi, _TABLE, endpoint=False)
    rmod = np.ones(_TABLE + 1, np.float32)
    for k, amp, ph in profile:
        rmod[:_TABLE] += amp * np.cos(k * table_ang + ph)
    if tails is not None:
        for direction, amp, width in tails:
            dang = np.angle(np.exp(1j * (table_ang - direction)))
            rmod[:_TABLE] += amp * np.exp(-((dang / width) ** 2))
    rmod[_TABLE] = rmod[0]
    idx = (ang * np.float32(_TABLE / (2 * np.pi))).astype(np.int32)
    return mag / rmod[idx]


def make_geometry(
    size: int,
    rng: np.random.Generator,
    *,
    scale: float,
    n_cells: tuple[int, int] = (15, 35),
    mitotic_fraction: float = 0.03,
    min_mitotic: int = 0,
) -> FieldGeometry:
    """Build the cells and nuclei of one square field.

    Parameters
    ----------
    size : int
        Field side in pixels.
    rng : numpy.random.Generator
        Random source (the field's own).
    scale : float
        Pixel scale relative to the 2048² reference (``size / 2048 * cell_scale``).
    n_cells : tuple of int
        Range of the number of seed cells whose centre lies in the field.
    mitotic_fraction : float
        Probability that a cell is mitotic.
    min_mitotic : int
        At least this many cells (when that many exist) are mitotic.

    Returns
    -------
    FieldGeometry
        Label maps (ids 1..n contiguous, nucleus k inside cell k) and metadata.
    """
    r_mean = REF_CELL_RADIUS * scale
    n_target = int(rng.integers(n_cells[0], n_cells[1] + 1))
    spacing = rng.uniform(0.68, 0.9)
    pts, rad = _place_seeds(size, rng, n_target, r_mean, spacing)
    m = len(pts)
    mitotic = rng.random(m) < mitotic_fraction
    inside_idx = np.flatnonzero(
        (pts[:, 0] > 0.05 * size) & (pts[:, 0] < 0.95 * size) & (pts[:, 1] > 0.05 * size) & (pts[:, 1] < 0.95 * size)
    )
    if min_mitotic > mitotic[inside_idx].sum() and len(inside_idx):
        extra = rng.choice(inside_idx, size=min(min_mitotic, len(inside_idx)), replace=False)
        mitotic[extra] = True

    # Per-cell shape parameters: smooth ellipses, some drawn out into a teardrop (one tapering process)
    # or a spindle (two opposite processes), as fibroblast-like and epithelial cells look in HPA images.
    asp = np.where(mitotic, rng.uniform(1.0, 1.12, m), rng.uniform(1.0, 2.0, m) ** 1.3)
    asp = np.minimum(asp, 2.4)
    rad = np.where(mitotic, rad * 0.72, rad)
    reach_f = np.where(mitotic, 1.0, rng.uniform(1.05, 1.3, m))
    a_cell = rad * np.sqrt(asp) * reach_f
    b_cell = rad / np.sqrt(asp) * reach_f
    th_cell = rng.uniform(0, np.pi, m)
    shape_u = rng.random(m)
    n_tails = np.where(mitotic, 0, np.where(shape_u < 0.3, 1, np.where(shape_u < 0.45, 2, 0)))
    tail_dir = rng.choice([0.0, np.pi], m)
    tail_amp = rng.uniform(0.35, 0.9, (m, 2))
    tail_w = rng.uniform(0.22, 0.4, (m, 2))
    # Half-side of the window that holds a cell with its processes: where it is drawn and where its stray pieces
    # are removed (one window for both, so no piece lies outside the clean-up).
    reach = a_cell * 1.35 * (1.0 + np.where(n_tails > 0, tail_amp.max(axis=1), 0.0))
    # Nucleus: offset from the cell centre (into the round body, away from a teardrop's tail).
    b_nuc = np.minimum(b_cell / reach_f * rng.uniform(0.6, 0.82, m), rad * 0.5)
    a_nuc = np.minimum(b_nuc * rng.uniform(1.0, 1.4, m), rad * 0.58)
    th_nuc = th_cell + rng.normal(0, 0.35, m)
    off = np.minimum(rng.uniform(0, 0.3, m) * np.maximum(a_cell - a_nuc, 0), np.maximum(0.62 * rad - a_nuc, 0))
    off_dir = np.where(n_tails == 1, -np.cos(tail_dir), rng.choice([-1.0, 1.0], m))
    nuc_c = pts + (off * off_dir)[:, None] * np.stack([np.cos(th_cell), np.sin(th_cell)], 1)
    # Multinucleate cells: two smaller nuclei side by side along the nucleus' long axis.
    multi = ~mitotic & (n_tails == 0) & (rng.random(m) < 0.07)
    a_nuc = np.where(multi, a_nuc * 0.78, a_nuc)
    b_nuc = np.where(multi, b_nuc * 0.85, b_nuc)
    nuc_dir = np.stack([np.cos(th_nuc), np.sin(th_nuc)], 1)
    nuc_c2 = nuc_c + (0.95 * a_nuc)[:, None] * nuc_dir
    nuc_c = np.where(multi[:, None], nuc_c - (0.95 * a_nuc)[:, None] * nuc_dir, nuc_c)
    # Mitotic: a metaphase plate (thin, long), spindle perpendicular to it; or, in prometaphase, a rounder
    # cloud of condensed chromosomes that the spindle fans into.
    prometa = mitotic & (rng.random(m) < 0.4)
    a_nuc = np.where(mitotic, rad * rng.uniform(*MITOTIC_CHROMATIN_LONG, m), a_nuc)
    b_short = np.where(prometa, rng.uniform(*PROMETAPHASE_SHORT, m), rng.uniform(*METAPHASE_SHORT, m))
    b_nuc = np.where(mitotic, rad * b_short, b_nuc)
    nuc_c = np.where(mitotic[:, None], pts, nuc_c)
    spindle = th_nuc + np.pi / 2
    # Cells that overlap their neighbours (one lies over the other; both stains add up there).
    overlapper = rng.random(m) < 0.2

    h = w = size
    best = np.full((h, w), np.inf, np.float32)
    second = np.full((h, w), np.inf, np.float32)
    owner = np.zeros((h, w), np.int32)
    owner2 = np.zeros((h, w), np.int32)
    nuclei = np.zeros((h, w), np.int32)
    n_a = smooth_noise((h, w), 0.12 * r_mean, rng)
    n_b = smooth_noise((h, w), 0.05 * r_mean, rng)
    mix = rng.uniform(-1, 1, (m, 2)).astype(np.float32)
    nuc_area_full = np.pi * a_nuc * b_nuc * np.where(multi, 2.0, 1.0)
    for i in range(m):
        tails = None
        if n_tails[i]:
            dirs = [tail_dir[i], tail_dir[i] + np.pi][: n_tails[i]]
            tails = np.array([[d, tail_amp[i, j], tail_w[i, j]] for j, d in enumerate(dirs)])
        x0, x1 = int(max(0, pts[i, 0] - reach[i])), int(min(w, pts[i, 0] + reach[i] + 1))
        y0, y1 = int(max(0, pts[i, 1] - reach[i])), int(min(h, pts[i, 1] + reach[i] + 1))
        if x0 >= x1 or y0 >= y1:
            continue
        xs = np.arange(x0, x1, dtype=np.float32)[None, :]
        ys = np.arange(y0, y1, dtype=np.float32)[:, None]
        xs, ys = np.broadcast_to(xs, (y1 - y0, x1 - x0)), np.broadcast_to(ys, (y1 - y0, x1 - x0))
        prof = _radial_profile(rng, 0.06 if mitotic[i] else 0.13)
        met = _ellipse_metric(xs, ys, pts[i, 0], pts[i, 1], a_cell[i], b_cell[i], th_cell[i], prof, tails)
        met += 0.045 * mix[i, 0] * n_a[y0:y1, x0:x1] + 0.008 * mix[i, 1] * n_b[y0:y1, x0:x1]
        sub_best = best[y0:y1, x0:x1]
        sub_second = second[y0:y1, x0:x1]
        sub_owner = owner[y0:y1, x0:x1]
        sub_owner2 = owner2[y0:y1, x0:x1]
        win = met < sub_best
        runner = ~win & (met < sub_second)
        sub_second[win] = sub_best[win]
        sub_owner2[win] = sub_owner[win]
        sub_second[runner] = met[runner]
        sub_owner2[runner] = i + 1
        sub_best[win] = met[win]
        sub_owner[win] = i + 1
        centres = [nuc_c[i]] + ([nuc_c2[i]] if multi[i] else [])
        for centre in centres:
            nprof = _radial_profile(rng, 0.25 if mitotic[i] else 0.13, 4)
            nr = a_nuc[i] * 1.4
            nx0, nx1 = int(max(0, centre[0] - nr)), int(min(w, centre[0] + nr + 1))
            ny0, ny1 = int(max(0, centre[1] - nr)), int(min(h, centre[1] + nr + 1))
            if nx0 >= nx1 or ny0 >= ny1:
                continue
            nxs = np.broadcast_to(np.arange(nx0, nx1, dtype=np.float32)[None, :], (ny1 - ny0, nx1 - nx0))
            nys = np.broadcast_to(np.arange(ny0, ny1, dtype=np.float32)[:, None], (ny1 - ny0, nx1 - nx0))
            nmet = _ellipse_metric(nxs, nys, centre[0], centre[1], a_nuc[i], b_nuc[i], th_nuc[i], nprof)
            if mitotic[i]:
                nmet += 0.25 * n_b[ny0:ny1, nx0:nx1]
            sub_nuc = nuclei[ny0:ny1, nx0:nx1]
            sub_nuc[(nmet < 1.0) & (sub_nuc == 0)] = i + 1
    cells = np.where(best < 1.0, owner, 0)
    # Fill small background pockets enclosed by cells (noise holes) from the nearest territory.
    nb, comp, stats, _ = cv2.connectedComponentsWithStats((cells == 0).astype(np.uint8), connectivity=4)
    small = (stats[:, cv2.CC_STAT_AREA] < 0.08 * r_mean**2) & (
        (stats[:, cv2.CC_STAT_LEFT] > 0)
        & (stats[:, cv2.CC_STAT_TOP] > 0)
        & (stats[:, cv2.CC_STAT_LEFT] + stats[:, cv2.CC_STAT_WIDTH] < w)
        & (stats[:, cv2.CC_STAT_TOP] + stats[:, cv2.CC_STAT_HEIGHT] < h)
    )
    small[0] = False
    if small.any():
        pocket = small[comp] & (cells == 0)
        cells[pocket] = owner[pocket]
    has_nuc = nuclei > 0
    cells[has_nuc] = nuclei[has_nuc]
    # Overlap zones: inside two territories where one of the pair overlaps its neighbours.
    flag = np.concatenate([[False], overlapper])
    overlap = (best < 1.0) & (second < 1.0) & (flag[owner] | flag[owner2]) & ~has_nuc

    # Keep the connected part of each cell that holds its nucleus; drop cells whose nucleus is mostly cut.
    keep = np.zeros(m + 1, bool)
    nuc_area = np.bincount(nuclei.ravel(), minlength=m + 1)
    for i in range(m):
        k = i + 1
        if nuc_area[k] < 0.3 * nuc_area_full[i] or nuc_area[k] < 12:
            continue
        x0, x1 = int(max(0, pts[i, 0] - reach[i])), int(min(w, pts[i, 0] + reach[i] + 1))
        y0, y1 = int(max(0, pts[i, 1] - reach[i])), int(min(h, pts[i, 1] + reach[i] + 1))
        sub = cells[y0:y1, x0:x1]
        mask = (sub == k).astype(np.uint8)
        _, comp = cv2.connectedComponents(mask, connectivity=4)
        nuc_sub = nuclei[y0:y1, x0:x1] == k
        comp_ids = np.bincount(comp[nuc_sub].ravel())
        if comp_ids.size == 0:
            continue
        main = int(np.argmax(comp_ids[1:]) + 1) if comp_ids.size > 1 else 0
        sub[(mask > 0) & (comp != main)] = 0
        keep[k] = True
    lut = np.zeros(m + 1, np.int32)
    kept = np.flatnonzero(keep)
    lut[kept] = np.arange(1, len(kept) + 1)
    cells = lut[cells].astype(np.uint16)
    nuclei = lut[nuclei].astype(np.uint16)
    nuclei[cells != nuclei] = 0
    idx = kept - 1
    n = len(kept)

    # Centrosome next to the nucleus; first spindle pole for mitotic cells.
    cdir = rng.uniform(0, 2 * np.pi, n)
    r_n = 0.5 * (a_nuc[idx] + b_nuc[idx])
    cen = nuc_c[idx] + ((r_n + 0.08 * rad[idx])[:, None] * np.stack([np.cos(cdir), np.sin(cdir)], 1))
    sp = spindle[idx]
    pole = nuc_c[idx] + (0.45 * rad[idx])[:, None] * np.stack([np.cos(sp), np.sin(sp)], 1)
    cen = np.where(mitotic[idx][:, None], pole, cen)

    # Nucleoli: 2-5 blobs inside interphase nuclei.
    nucleoli = np.zeros((h, w), np.float32)
    spots: list[np.ndarray] = []
    for i in idx:
        if mitotic[i]:
            spots.append(np.zeros((0, 3)))
            continue
        k = int(rng.integers(2, 6))
        rr = np.sqrt(rng.uniform(0, 1, k)) * 0.55
        ang = rng.uniform(0, 2 * np.pi, k)
        u, v = rr * np.cos(ang) * a_nuc[i], rr * np.sin(ang) * b_nuc[i]
        c, s = np.cos(th_nuc[i]), np.sin(th_nuc[i])
        # In a binucleate cell the nucleoli are shared out between the two nuclei.
        centre = np.where((np.arange(k) % 2 == 1)[:, None] & multi[i], nuc_c2[i], nuc_c[i])
        x = centre[:, 0] + u * c - v * s
        y = centre[:, 1] + u * s + v * c
        r = b_nuc[i] * rng.uniform(0.1, 0.22, k)
        spots.append(np.stack([x, y, r], 1))
        for xx, yy, rr_, ax in zip(x, y, r, rng.uniform(0.7, 1.0, k), strict=True):
            cv2.ellipse(
                nucleoli,
                (int(round(xx * 4)), int(round(yy * 4))),
                (max(1, int(rr_ * 4)), max(1, int(rr_ * ax * 4))),
                float(rng.uniform(0, 180)),
                0,
                360,
                1.0,
                -1,
                cv2.LINE_8,
                2,
            )
    nucleoli = cv2.GaussianBlur(nucleoli, (0, 0), max(0.6, 2.0 * scale))
    nucleoli *= nuclei > 0
    overlap_map = cv2.GaussianBlur((overlap & (cells > 0)).astype(np.float32), (0, 0), max(0.6, 6.0 * scale))
    return FieldGeometry(
        cells=cells,
        nuclei=nuclei,
        n=n,
        scale=scale,
        cell_center=pts[idx],
        cell_radius=rad[idx],
        nuc_center=nuc_c[idx],
        nuc_axes=np.stack([a_nuc[idx], b_nuc[idx]], 1),
        nuc_angle=th_nuc[idx],
        centrosome=cen,
        mitotic=mitotic[idx],
        spindle_angle=sp,
        nucleoli=nucleoli,
        nucleoli_spots=spots,
        overlap=overlap_map,
        multinucleate=multi[idx],
        prometaphase=prometa[idx],
    )
