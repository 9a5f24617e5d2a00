"""HPA-sim field generator and dataset writer.

A field is fully determined by ``(seed, index, config)``: its random source is
``numpy.random.default_rng(numpy.random.SeedSequence([seed, index]))``, so field
``i`` is byte-identical whether it is generated alone, in a batch or by another
worker process.

Label model
-----------
Each field picks an image-level "protein" localisation set (a primary class and
often a co-occurring partner, e.g. nucleoplasm + cytosol). Most cells show it;
some are negative or show a subset, and some fields hold a second population
with a different class, so image labels (the union of cell labels) are weak as
in the Kaggle competition. Mitotic cells lose nuclear patterns (a nucleoplasm
protein spreads into the cytosol); only they can show the mitotic spindle.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from locus.service.classes import CLASS_NAMES, NEGATIVE, NUM_CLASSES, format_label
from locus.training.sim.geometry import FieldGeometry, make_geometry
from locus.training.sim.patterns import (
    NUCLEAR_CLASSES,
    PATTERNS,
    PaintContext,
    background_stain,
    blue_channel,
    cell_lut,
    red_channel,
    yellow_channel,
)

__all__ = [
    "REF_CELL_DIAMETER_PX",
    "REF_PIXEL_SIZE_UM",
    "MIN_RENDER_SCALE",
    "PRIMARY_CYCLE_LENGTH",
    "SIM_VERSION",
    "SimConfig",
    "SimField",
    "generate_field",
    "write_dataset",
    "field_id",
]

#: Pixel size of the 2048² reference scale in micrometres (HPA confocal images, 63x objective).
REF_PIXEL_SIZE_UM = 0.08
#: Median equivalent diameter (diameter of the disc of equal area) of whole cells at the reference scale,
#: measured on HPA-sim truth masks; ``cell_diameter_px`` is relative to it.
REF_CELL_DIAMETER_PX = 335.0
_MAX_SEED_CELLS = 3000
_SCALE_SALT = 0x5343414C45  # "SCALE": the per-field cell-diameter draw's own stream

SIM_VERSION = "2.10"
#: Relative level of cytosol in a field that also shows a cytoplasmic structure (every other class draws its level
#: from 0.55-1.0, :func:`relative_level`). Before HPA-sim 2.4 cytosol drew 0.55-1.0 too, and a cytosolic pool at
#: full level hid the microtubules, centrosomes and ER of the same cells; HPA-sim 2.4 drew 0.3-0.55, so every
#: such pool was faint. Real pools span both: 2.5 draws 0.3-0.8, up to where the structure still stands out.
DIFFUSE_UNDER_STRUCTURE = (0.3, 0.8)
_CYTOSOL = 16
_NUCLEOPLASM = 0
#: Share of fields whose cells all carry a faint, unannotated background stain
#: (:func:`locus.training.sim.patterns.background_stain`).
BACKGROUND_STAIN_RATE = 0.5
#: Share of fields whose protein has only cytoplasmic structures (no nuclear class, no cytosol) that also carry a
#: faint, unannotated nucleoplasmic pool, at :data:`NUCLEAR_HAZE_LEVEL` of the protein's level. Many cytoplasmic
#: proteins keep a small nuclear pool that annotators leave out. Measured with
#: :func:`locus.training.sim.compare.nucleus_to_cytoplasm` (``python -m locus.training.sim.compare --stats``): the
#: protein of the real ER field 89_B5_1 holds 1.22 (0.61-2.02) over the nucleus and its ER marker (yellow) 0.63
#: (0.41-0.94), so the protein there is more than ER over the nucleus; HPA-sim's ER cells without the pool hold 0.77
#: (0.35-1.21), and the 2.4 and 2.5 models read the brightest real ones as nucleoplasm.
NUCLEAR_HAZE_RATE = 0.4
NUCLEAR_HAZE_LEVEL = (0.08, 0.3)
#: Even protein-channel level in every cell, per field (HPA-sim 2.8; before, 0.025 everywhere). Real unannotated
#: cells sit at the background: the negative field a34d8680's cells have a green median of 0 and 90th percentile 1
#: (8 bit), HPA-sim 2.7's negative cells 6-9 and 10-19. The 0.025 level was also half of HPA-sim's spindle-protein
#: pool (2.7's spindle-only cells: 0.21 of the 99th percentile with it, 0.11 without; the real spindle cell: 0.12).
GREEN_BASELINE = (0.0, 0.008)
#: Fields at a smaller scale than this (relative to the 2048² reference) are drawn larger and reduced (pixel
#: integration, ``SimConfig.max_supersample``).
MIN_RENDER_SCALE = 0.5
MITOTIC_SPINDLE = 11

#: Primary classes in one balanced cycle: every class once, nucleoplasm and cytosol (the commonest HPA
#: localisations) and a few others more often. Each block of consecutive fields uses a seeded permutation
#: of this cycle, so every class is a primary localisation in every block and no class is starved.
_PRIMARY_CYCLE: tuple[int, ...] = tuple(range(NUM_CLASSES - 1)) + (0, 16, 0, 16, 13, 2)
#: Fields per block of the cycle: fields ``b * PRIMARY_CYCLE_LENGTH`` to ``(b + 1) * PRIMARY_CYCLE_LENGTH - 1`` hold
#: every class as a primary localisation (a held-out set that starts on a block and has this many fields sees them all).
PRIMARY_CYCLE_LENGTH = len(_PRIMARY_CYCLE)
_CYCLE_SALT = 0x48504153494D  # "HPASIM": keeps the cycle's seed stream apart from the fields' streams


#: The diffuse localisations (nucleoplasm, cytosol): ``SimConfig.diffuse_partner_rate`` adds one of them.
_DIFFUSE: frozenset[int] = frozenset({0, 16})

#: Co-occurring partners of a primary class: (partner, probability).
_PARTNERS: dict[int, list[tuple[int, float]]] = {
    0: [(16, 0.45), (2, 0.08), (5, 0.06), (4, 0.04), (1, 0.04)],
    1: [(0, 0.3), (6, 0.1)],
    2: [(0, 0.35), (3, 0.1)],
    3: [(2, 0.3), (0, 0.2)],
    4: [(0, 0.35)],
    5: [(0, 0.4), (16, 0.1)],
    6: [(16, 0.1), (1, 0.1)],
    7: [(16, 0.2), (17, 0.15), (0, 0.1)],
    8: [(16, 0.15)],
    9: [(13, 0.3), (16, 0.15)],
    10: [(16, 0.15), (11, 0.12)],
    11: [(12, 0.3), (10, 0.25), (16, 0.2)],
    12: [(16, 0.3), (0, 0.2), (11, 0.1)],
    13: [(16, 0.3), (0, 0.15)],
    14: [(16, 0.1), (0, 0.1)],
    15: [(16, 0.3), (0, 0.2)],
    16: [(0, 0.55), (17, 0.1), (13, 0.05)],
    17: [(16, 0.3), (0, 0.15), (7, 0.1)],
}


@dataclass
class SimConfig:
    """Options of HPA-sim.

    Attributes
    ----------
    size : int
        Side of the square field in pixels (2048 is real HPA resolution; 512 the same field at 1/4).
        Without ``cell_diameter_px`` or ``pixel_size_um`` the magnification follows the field size (the same
        field of view at another resolution): cells about ``0.15 * size`` across.
    bit_depth : int
        8 or 16: dtype of the channel images.
    cell_scale : float
        Multiplier on cell size (1.0: cells 250-400 px across at 2048², ~60-100 px at 512²).
    n_cells : tuple of int
        Range of the number of cells seeded in a field that spans 2048 reference pixels (0.08 um each,
        164 um); the count follows the field's area in those units, so a field that sees more holds more cells
        (capped at 3000). Cells cut by the border are then dropped.
    cell_diameter_px : float, optional
        Median cell diameter in pixels (equivalent-area diameter of whole cells), independent of ``size``:
        the magnification. Overrides the size-proportional default; ``cell_scale`` still multiplies it.
    pixel_size_um : float, optional
        Pixel size in micrometres (HPA's confocal images: 0.08); cells are about 27 um across, so
        ``pixel_size_um=0.16`` gives cells about 170 px across. Give this or ``cell_diameter_px``, not both.
    cell_diameter_range : tuple of float, optional
        (low, high): each field draws its median cell diameter in pixels log-uniformly from this range (a
        training set that mixes magnifications). Overrides the other scale options.
    mitotic_fraction : float
        Probability that a cell is mitotic (fields with a spindle protein always get a few).
    negative_field_fraction : float
        Probability that a field's protein shows no specific staining (all cells negative).
    noise : float
        Multiplier on shot and read noise (0 disables noise).
    illumination : float
        Strength of the uneven illumination gradient (0 disables it).
    extra_label_rate : float
        Probability that a field with a protein gets one more localisation, drawn uniformly from the classes
        it lacks (up to three per field), on top of the biological partners. Real HPA images often hold
        combinations that a partner table never draws (about half of them have more than one label), and a
        model trained on few mixtures misses a pattern whenever another one is laid over it. 0 (the
        default) leaves the random stream, and so every field, as without the option.
    diffuse_partner_rate : float
        Probability that a field with a protein but with neither nucleoplasm nor cytosol in its set (and fewer
        than three localisations) gains one of the two, drawn at even odds. In HPA's data these two diffuse
        localisations are the commonest and co-occur with nearly every other one; a model that has seen a
        specific pattern only with a dark nucleus and cytoplasm learns that darkness as part of the pattern,
        and misses mitochondria over a stained nucleoplasm or nuclear bodies in a stained cytosol. 0 (the
        default) leaves the random stream, and so every field, as without the option.
    max_supersample : int
        Pixel integration: a field whose scale is below :data:`MIN_RENDER_SCALE` is drawn at up to this
        many times its side and reduced by area averaging before the noise, as a camera pixel integrates
        the light over its area (point-sampled fine texture aliases into pixel-sized speckle, which no real
        low-magnification or downscaled field shows). 1 disables it.
    """

    size: int = 512
    bit_depth: int = 8
    cell_scale: float = 1.0
    n_cells: tuple[int, int] = (15, 35)
    mitotic_fraction: float = 0.03
    negative_field_fraction: float = 0.05
    noise: float = 1.0
    illumination: float = 1.0
    max_supersample: int = 4
    extra_label_rate: float = 0.0
    diffuse_partner_rate: float = 0.0
    cell_diameter_px: float | None = None
    pixel_size_um: float | None = None
    cell_diameter_range: tuple[float, float] | None = None

    def for_field(self, seed: int, index: int) -> SimConfig:
        """The configuration of one field: with ``cell_diameter_range``, its own drawn cell diameter.

        The draw uses its own random stream (``SeedSequence([seed, index, salt])``), so the field's other
        randomness is that of a fixed-diameter configuration.
        """
        if self.cell_diameter_range is None:
            return self
        lo, hi = self.cell_diameter_range
        u = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), _SCALE_SALT])).random()
        d = float(np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo))))
        return replace(self, cell_diameter_px=d, pixel_size_um=None, cell_diameter_range=None)

    @property
    def scale(self) -> float:
        """Pixel scale relative to the 2048² reference field (lengths there are multiplied by this)."""
        if self.cell_diameter_range is not None:
            lo, hi = self.cell_diameter_range
            base = float(np.sqrt(lo * hi)) / REF_CELL_DIAMETER_PX
        elif self.cell_diameter_px is not None:
            base = float(self.cell_diameter_px) / REF_CELL_DIAMETER_PX
        elif self.pixel_size_um is not None:
            base = REF_PIXEL_SIZE_UM / float(self.pixel_size_um)
        else:
            base = self.size / 2048.0
        return base * self.cell_scale

    @property
    def effective_pixel_size_um(self) -> float:
        """The pixel size in micrometres that this configuration draws at."""
        return REF_PIXEL_SIZE_UM / self.scale

    def __post_init__(self) -> None:
        if self.bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {self.bit_depth}")
        if self.size < 64:
            raise ValueError(f"size must be at least 64 px, got {self.size}")
        if self.cell_scale <= 0:
            raise ValueError("cell_scale must be positive")
        if self.cell_diameter_px is not None and self.pixel_size_um is not None:
            raise ValueError("give cell_diameter_px or pixel_size_um, not both")
        if self.cell_diameter_px is not None and not 8 <= self.cell_diameter_px <= 4096:
            raise ValueError(f"cell_diameter_px must be within 8-4096, got {self.cell_diameter_px}")
        if self.cell_diameter_range is not None:
            lo, hi = (float(v) for v in self.cell_diameter_range)
            if not 8 <= lo <= hi <= 4096:
                raise ValueError(
                    f"cell_diameter_range must be 8 <= low <= high <= 4096, got {self.cell_diameter_range}"
                )
            self.cell_diameter_range = (lo, hi)
        if self.pixel_size_um is not None and not 0.005 <= self.pixel_size_um <= 5.0:
            raise ValueError(f"pixel_size_um must be within 0.005-5, got {self.pixel_size_um}")
        if not 0.0 <= self.extra_label_rate <= 1.0:
            raise ValueError(f"extra_label_rate must be within 0-1, got {self.extra_label_rate}")
        if not 0.0 <= self.diffuse_partner_rate <= 1.0:
            raise ValueError(f"diffuse_partner_rate must be within 0-1, got {self.diffuse_partner_rate}")
        self.n_cells = (int(self.n_cells[0]), int(self.n_cells[1]))
        if not 1 <= self.n_cells[0] <= self.n_cells[1]:
            raise ValueError(f"n_cells must be a range lo <= hi with lo >= 1, got {self.n_cells}")


@dataclass
class SimField:
    """One generated field of view with its ground truth.

    Attributes
    ----------
    image : numpy.ndarray
        HxWx4 uint8 or uint16, channels R, G, B, Y.
    cells : numpy.ndarray
        uint16 cell labels, 0 = background, 1..n.
    nuclei : numpy.ndarray
        uint16 nucleus labels; nucleus k lies inside cell k.
    cell_labels : dict of int to list of int
        Sorted class ids per cell id (``[18]`` for negative cells).
    field_labels : list of int
        The field's intended protein localisation set (primary class first), before per-cell heterogeneity.
    mitotic : list of int
        Ids of mitotic cells.
    multinucleate : list of int
        Ids of cells with two nuclei (one nucleus label; the two may touch).
    overlap_fraction : float
        Share of the field's pixels where one cell lies over another (stains add up there).
    """

    image: np.ndarray
    cells: np.ndarray
    nuclei: np.ndarray
    cell_labels: dict[int, list[int]]
    field_labels: list[int] = field(default_factory=list)
    mitotic: list[int] = field(default_factory=list)
    multinucleate: list[int] = field(default_factory=list)
    overlap_fraction: float = 0.0

    @property
    def image_labels(self) -> list[int]:
        """The image-level label: the sorted union of all cell labels."""
        return sorted({c for labels in self.cell_labels.values() for c in labels})


def field_id(index: int) -> str:
    """The dataset ID of field ``index``, e.g. ``sim_00042``."""
    return f"sim_{index:05d}"


def _field_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _primary_class(seed: int, index: int) -> int:
    """The primary localisation of field ``index``: a seeded permutation of the balanced cycle per block."""
    n = len(_PRIMARY_CYCLE)
    block, pos = divmod(int(index), n)
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), block, _CYCLE_SALT])).permutation(n)
    return _PRIMARY_CYCLE[int(perm[pos])]


def _sample_field_set(rng: np.random.Generator, config: SimConfig, seed: int, index: int) -> list[int]:
    if rng.random() < config.negative_field_fraction:
        return [NEGATIVE]
    primary = _primary_class(seed, index)
    labels = {primary}
    for partner, p in _PARTNERS.get(primary, []):
        if rng.random() < p and len(labels) < 3:
            labels.add(partner)
    # Drawn only when asked, so that fields without the option keep their random stream.
    if config.extra_label_rate > 0 and len(labels) < 3 and rng.random() < config.extra_label_rate:
        options = [c for c in range(NEGATIVE) if c not in labels]
        labels.add(int(rng.choice(options)))
    if (
        config.diffuse_partner_rate > 0
        and len(labels) < 3
        and not labels & _DIFFUSE
        and rng.random() < config.diffuse_partner_rate
    ):
        labels.add(int(rng.choice(sorted(_DIFFUSE))))
    return [primary] + sorted(labels - {primary})


def relative_level(c: int, present: list[int], rng: np.random.Generator) -> float:
    """Relative stain level of class ``c`` among the field's localisations ``present`` (one draw from ``rng``).

    A single localisation has level 1. Otherwise each draws from 0.55-1.0, except cytosol beside a cytoplasmic
    structure, which draws from :data:`DIFFUSE_UNDER_STRUCTURE`: a diffuse pool spreads the protein over the
    whole cytoplasm while a structure concentrates it, and an annotator calls the structure only where it stands
    out over the pool. Nucleoplasm keeps 0.55-1.0: nuclear structures drawn over it stand out by their own
    brightness (nucleoli, speckles, fibrillar centres, nuclear bodies), and a dim nucleoplasm looks like the faint
    cytoplasmic stain that shows over every nucleus (a model trained on dim nucleoplasm called it on the ER cells
    of the real field 89_B5_1).

    Parameters
    ----------
    c : int
        The class.
    present : list of int
        The field's localisations (without Negative).
    rng : numpy.random.Generator
        The field's random source (one number drawn unless ``present`` has one class).

    Returns
    -------
    float
        The level.
    """
    if len(present) == 1:
        return 1.0
    if c == _CYTOSOL and any(k not in _DIFFUSE and k not in NUCLEAR_CLASSES for k in present):
        return float(rng.uniform(*DIFFUSE_UNDER_STRUCTURE))
    return float(rng.uniform(0.55, 1.0))


def _assign_cell_labels(rng: np.random.Generator, geo: FieldGeometry, field_set: list[int]) -> dict[int, list[int]]:
    """Per-cell labels with heterogeneity around the field's set."""
    n = geo.n
    main = set(field_set) - {MITOTIC_SPINDLE}
    alt: set[int] = set()
    alt_frac = 0.0
    if NEGATIVE not in field_set and rng.random() < 0.25:
        primary = field_set[0]
        options = [c for c, _ in _PARTNERS.get(primary, []) if c != MITOTIC_SPINDLE and c not in field_set]
        if not options or rng.random() < 0.5:
            options = [c for c in range(NUM_CLASSES - 1) if c not in field_set and c != MITOTIC_SPINDLE]
        alt = {int(rng.choice(options))}
        alt_frac = rng.uniform(0.1, 0.35)
    # Share of cells without the protein (negative) and of cells showing only part of the set.
    p_neg = 0.0 if rng.random() < 0.55 else rng.uniform(0.05, 0.3)
    p_sub = rng.uniform(0.0, 0.3) if len(main) > 1 else 0.0
    out: dict[int, list[int]] = {}
    for k in range(1, n + 1):
        u = rng.random()
        if NEGATIVE in field_set:
            labels: set[int] = set()
        elif u < alt_frac:
            labels = set(alt)
        elif u < alt_frac + (1 - alt_frac) * p_neg:
            labels = set()
        elif rng.random() < p_sub:
            ordered = sorted(main)
            keep = rng.random(len(ordered)) < 0.5
            if not keep.any():
                keep[rng.integers(len(ordered))] = True
            labels = {c for c, kk in zip(ordered, keep, strict=True) if kk}
        else:
            labels = set(main)
        if geo.mitotic[k - 1]:
            had_nucleoplasm = 0 in labels
            labels -= NUCLEAR_CLASSES
            if had_nucleoplasm:
                labels.add(16)
            if MITOTIC_SPINDLE in field_set and NEGATIVE not in field_set and rng.random() < 0.9:
                labels.add(MITOTIC_SPINDLE)
        out[k] = sorted(labels) if labels else [NEGATIVE]
    return out


def _quantise(v: np.ndarray, bit_depth: int) -> np.ndarray:
    top = 255.0 if bit_depth == 8 else 65535.0
    out = np.clip(v, 0.0, 1.0) * np.float32(top) + np.float32(0.5)
    return out.astype(np.uint8 if bit_depth == 8 else np.uint16)


def generate_field(index: int, seed: int, config: SimConfig | None = None) -> SimField:
    """Generate field ``index`` of the dataset with seed ``seed``.

    Parameters
    ----------
    index : int
        Field index (the dataset ID is ``sim_{index:05d}``).
    seed : int
        Dataset seed.
    config : SimConfig, optional
        Options (default ``SimConfig()``: 512², 8-bit).

    Returns
    -------
    SimField
        The image and its ground truth; identical for equal ``(index, seed, config)``.
    """
    config = (config or SimConfig()).for_field(seed, index)
    rng = _field_rng(seed, index)
    size = int(config.size)
    scale = config.scale
    # Cells seeded in proportion to the area seen (in reference units), as a microscope at this magnification.
    area = (size / (2048.0 * scale)) ** 2
    n_cells = tuple(min(_MAX_SEED_CELLS, max(1, int(round(v * area)))) for v in config.n_cells)
    field_set = _sample_field_set(rng, config, seed, index)
    want_spindle = MITOTIC_SPINDLE in field_set
    # Pixel integration: small scales are drawn k times larger and area-reduced before acquisition noise.
    k = max(1, min(int(config.max_supersample), math.ceil(MIN_RENDER_SCALE / scale - 1e-9)))
    geo = make_geometry(
        size * k,
        rng,
        scale=scale * k,
        n_cells=n_cells,  # type: ignore[arg-type]
        mitotic_fraction=max(config.mitotic_fraction, 0.08 if want_spindle else 0.0),
        min_mitotic=int(rng.integers(2, 5)) if want_spindle else 0,
    )
    cell_labels = _assign_cell_labels(rng, geo, field_set)
    ctx = PaintContext(geo, rng)
    n = geo.n
    h = w = size
    cells, nuclei = geo.cells, geo.nuclei
    if k > 1:  # truth: the label at each final pixel's centre
        cells = np.ascontiguousarray(cells[k // 2 :: k, k // 2 :: k])
        nuclei = np.ascontiguousarray(nuclei[k // 2 :: k, k // 2 :: k])

    # Per-field, per-cell intensities.
    def cell_gain(sigma: float) -> np.ndarray:
        lut = np.exp(rng.normal(0.0, sigma, n + 1)).astype(np.float32)
        lut[0] = 0.0
        return lut

    mit_boost = 1.0 + 0.35 * cell_lut(n, np.flatnonzero(geo.mitotic) + 1, 1.0)
    red = red_channel(ctx) * (cell_gain(0.2) * mit_boost)[geo.cells] * np.float32(rng.uniform(0.7, 1.05))
    yellow = yellow_channel(ctx) * (cell_gain(0.25) * mit_boost)[geo.cells] * np.float32(rng.uniform(0.45, 0.8))
    blue = blue_channel(ctx) * cell_gain(0.15)[geo.nuclei] * np.float32(rng.uniform(0.5, 0.85))

    green = np.float32(rng.uniform(*GREEN_BASELINE)) * ctx.cell_mask.astype(np.float32)
    protein_gain = float(np.exp(rng.normal(np.log(0.32), 0.35)))
    per_cell = cell_gain(0.4)
    present = sorted({c for labels in cell_labels.values() for c in labels} - {NEGATIVE})
    for c in present:
        ids = np.array([k for k, labels in cell_labels.items() if c in labels], dtype=np.int64)
        rel = relative_level(c, present, rng)
        lut = np.zeros(n + 1, np.float32)
        lut[ids] = per_cell[ids] * protein_gain * rel
        green += PATTERNS[c](ctx, ids) * lut[geo.cells]
    # Half the fields carry a faint unannotated background stain in every cell (labels unchanged).
    if rng.random() < BACKGROUND_STAIN_RATE:
        level = protein_gain * rng.uniform(0.04, 0.25)
        green += background_stain(ctx) * (cell_gain(0.3) * np.float32(level))[geo.cells]
    # A cytoplasmic structure's protein with a faint nuclear pool, left unannotated (labels unchanged).
    if present and not set(present) & (NUCLEAR_CLASSES | _DIFFUSE) and rng.random() < NUCLEAR_HAZE_RATE:
        ids = np.array(
            [k for k, labels in cell_labels.items() if set(labels) - {NEGATIVE} and not geo.mitotic[k - 1]],
            dtype=np.int64,
        )
        level = protein_gain * rng.uniform(*NUCLEAR_HAZE_LEVEL)
        green += PATTERNS[_NUCLEOPLASM](ctx, ids) * (per_cell * np.float32(level))[geo.cells]
    # Where one cell lies over another, both cells' protein adds up.
    green *= 1.0 + 0.35 * geo.overlap

    if k > 1:
        red, green, blue, yellow = (
            cv2.resize(v.astype(np.float32, copy=False), (w, h), interpolation=cv2.INTER_AREA)
            for v in (red, green, blue, yellow)
        )
    # Acquisition: uneven illumination, background, shot and read noise, quantisation.
    g = 64
    yy, xx = np.mgrid[0:g, 0:g].astype(np.float32) / np.float32(g - 1)
    ang = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)) * 2.0
    blob = cv2.GaussianBlur(rng.standard_normal((g, g)).astype(np.float32), (0, 0), 0.3 * g)
    blob /= max(float(blob.std()), 1e-6)
    illum = 1.0 + config.illumination * (rng.uniform(0.0, 0.25) * grad + 0.08 * blob)
    illum = cv2.resize(illum.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    channels = []
    for v in (red, green, blue, yellow):
        v = v * illum + np.float32(rng.uniform(0.0, 0.01))
        if config.noise > 0:
            photons = rng.uniform(150.0, 600.0)
            sd = np.sqrt(np.maximum(v, 0) / np.float32(photons)) + np.float32(rng.uniform(0.003, 0.01))
            v = v + np.float32(config.noise) * sd * rng.standard_normal((h, w), dtype=np.float32)
        channels.append(_quantise(v, config.bit_depth))
    image = np.stack(channels, axis=-1)
    return SimField(
        image=image,
        cells=cells,
        nuclei=nuclei,
        cell_labels=cell_labels,
        field_labels=field_set,
        mitotic=[int(k) + 1 for k in np.flatnonzero(geo.mitotic)],
        multinucleate=[int(k) + 1 for k in np.flatnonzero(geo.multinucleate)],
        overlap_fraction=float((geo.overlap > 0.5).mean()),
    )


_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 3]


def _write_one(args: tuple[int, int, SimConfig, str]) -> tuple[str, dict[int, list[int]]]:
    index, seed, config, out = args
    f = generate_field(index, seed, config)
    fid = field_id(index)
    root = Path(out)
    for k, name in enumerate(("red", "green", "blue", "yellow")):
        cv2.imwrite(str(root / f"{fid}_{name}.png"), f.image[:, :, k], _PNG)
    cv2.imwrite(str(root / "truth" / f"{fid}_cells.png"), f.cells, _PNG)
    cv2.imwrite(str(root / "truth" / f"{fid}_nuclei.png"), f.nuclei, _PNG)
    return fid, f.cell_labels


def _init_worker() -> None:
    cv2.setNumThreads(1)


def write_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    config: SimConfig | None = None,
    workers: int = 1,
    progress: bool = True,
    start: int = 0,
) -> Path:
    """Generate ``n`` fields and write them in the Locus dataset layout (docs/CONTRACTS.md).

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created; existing files of the same IDs are overwritten).
    n : int
        Number of fields.
    seed : int
        Dataset seed.
    config : SimConfig, optional
        Options.
    workers : int
        Worker processes (1: generate in this process).
    progress : bool
        Show a tqdm progress bar.
    start : int
        Index of the first field (IDs ``sim_{start:05d}`` on).

    Returns
    -------
    Path
        The output folder, holding ``train.csv``, the channel PNGs, ``truth/`` and ``sim.json``.
    """
    from tqdm import tqdm

    config = config or SimConfig()
    out = Path(out_dir)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    tasks = [(i, int(seed), config, str(out)) for i in range(start, start + n)]
    results: list[tuple[str, dict[int, list[int]]]] = []
    bar = tqdm(total=n, desc="HPA-sim", unit="field", disable=not progress)
    if workers <= 1 or n <= 1:
        for t in tasks:
            results.append(_write_one(t))
            bar.update(1)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes=int(workers), initializer=_init_worker) as pool:
            for r in pool.imap(_write_one, tasks, chunksize=1):
                results.append(r)
                bar.update(1)
    bar.close()
    with open(out / "train.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["ID", "Label"])
        for fid, labels in results:
            wr.writerow([fid, format_label({c for ls in labels.values() for c in ls})])
    with open(out / "truth" / "cells.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["ID", "cell_id", "Label"])
        for fid, labels in results:
            for k in sorted(labels):
                wr.writerow([fid, k, format_label(labels[k])])
    meta = {
        "generator": "HPA-sim",
        "version": SIM_VERSION,
        "seed": int(seed),
        "n": int(n),
        "start": int(start),
        "ids": [field_id(start), field_id(start + n - 1)] if n else [],
        "config": asdict(config),
        "classes": list(CLASS_NAMES),
        "rng": "numpy.random.default_rng(numpy.random.SeedSequence([seed, index]))",
    }
    (out / "sim.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
