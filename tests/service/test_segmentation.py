"""Tests of the segmentation registry and the classical backend."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from locus.service.segmentation import SegmentationError, Segmenter, backend_names, make_segmenter
from locus.service.segmentation.classical import ClassicalConfig, ClassicalSegmenter

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
SAMPLE = SHARED / "hpa-samples"


# ----------------------------------------------------------------------------- helpers
def draw_field(
    shape: tuple[int, int] = (512, 512), seed: int = 0, spacing: float = 0.14, dtype=np.uint8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw an HPA-like field: cells on a jittered grid, many touching, each with one nucleus.

    Cells are Voronoi regions of their centres cut by an ellipse around the centre;
    the cytoplasm (red, yellow) fades towards the cell edge and nuclei (blue) are
    ellipses. Sizes scale with ``sqrt(H * W)``.

    Returns
    -------
    image : (H, W, 4) field, cells : (H, W) int32 truth, nuclei : (H, W) int32 truth.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    side = np.sqrt(h * w)
    step = spacing * side
    centres = []
    for r in np.arange(step / 2, h, step):
        for c in np.arange(step / 2, w, step):
            if rng.random() < 0.8:
                centres.append((r + rng.uniform(-0.2, 0.2) * step, c + rng.uniform(-0.2, 0.2) * step))
    centres = np.array(centres)
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
    nearest = np.full((h, w), -1, dtype=np.int32)
    best = np.full((h, w), np.inf, dtype=np.float32)
    for k, (r, c) in enumerate(centres):
        a, b = rng.uniform(0.45, 0.7, size=2) * step
        theta = rng.uniform(0, np.pi)
        dr, dc = rr - r, cc - c
        u = (dr * np.cos(theta) + dc * np.sin(theta)) / a
        v = (-dr * np.sin(theta) + dc * np.cos(theta)) / b
        d = np.sqrt(u * u + v * v)
        inside = (d < 1.0) & (d < best)
        nearest[inside] = k
        best[inside] = d[inside]
    cells = (nearest + 1).astype(np.int32)
    nuclei = np.zeros((h, w), dtype=np.int32)
    image = np.zeros((h, w, 4), dtype=np.float32)
    for k, (r, c) in enumerate(centres):
        mask = cells == k + 1
        if mask.sum() < 0.2 * step * step:
            cells[mask] = 0
            continue
        cyto = rng.uniform(0.4, 1.0)
        image[mask, 0] = cyto * (1.0 - 0.6 * best[mask]) * 200
        image[mask, 3] = cyto * (1.0 - 0.5 * best[mask]) * 160
        image[mask, 1] = rng.uniform(10, 120)
        axes = (int(rng.uniform(0.17, 0.24) * step), int(rng.uniform(0.17, 0.24) * step))
        nmask = np.zeros((h, w), dtype=np.uint8)
        cv2.ellipse(nmask, (int(c), int(r)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
        nmask = nmask.astype(bool) & mask
        nuclei[nmask] = k + 1
        image[nmask, 2] = rng.uniform(0.35, 1.0) * 230
    # Relabel truth to 1..n (nucleus k in cell k).
    ids = np.unique(cells[cells > 0])
    lut = np.zeros(cells.max() + 1, dtype=np.int32)
    lut[ids] = np.arange(1, ids.size + 1)
    cells, nuclei = lut[cells], lut[nuclei]
    image = cv2.GaussianBlur(image, (0, 0), 0.004 * side)
    image += rng.normal(0, 3, image.shape).astype(np.float32) + 5
    image = np.clip(image, 0, 255)
    if dtype == np.uint16:
        return (image * 257).astype(np.uint16), cells, nuclei
    return image.astype(np.uint8), cells, nuclei


def match_scores(pred: np.ndarray, true: np.ndarray, iou: float = 0.5) -> tuple[float, float]:
    """F1 of a one-to-one matching at IoU > ``iou`` and mean IoU of the matched pairs."""
    n_pred, n_true = int(pred.max()), int(true.max())
    if n_pred == 0 and n_true == 0:
        return 1.0, 1.0
    if n_pred == 0 or n_true == 0:
        return 0.0, 0.0
    inter = np.bincount(
        true.ravel().astype(np.int64) * (n_pred + 1) + pred.ravel(), minlength=(n_true + 1) * (n_pred + 1)
    )
    inter = inter.reshape(n_true + 1, n_pred + 1)[1:, 1:].astype(np.float64)
    at = np.bincount(true.ravel(), minlength=n_true + 1)[1:, None]
    ap = np.bincount(pred.ravel(), minlength=n_pred + 1)[None, 1:]
    ious = inter / np.maximum(at + ap - inter, 1)
    matched = ious[ious > iou]
    tp = matched.size
    f1 = 2 * tp / (n_pred + n_true)
    return f1, float(matched.mean()) if tp else 0.0


@pytest.fixture(scope="module")
def seg() -> ClassicalSegmenter:
    return make_segmenter("classical")


def check_contract(image: np.ndarray, cells: np.ndarray, nuclei: np.ndarray) -> None:
    assert cells.shape == image.shape[:2] and nuclei.shape == image.shape[:2]
    assert cells.dtype == np.int32 and nuclei.dtype == np.int32
    n = int(cells.max())
    assert set(np.unique(cells)) - {0} == set(range(1, n + 1)), "cell ids must be 1..n"
    assert set(np.unique(nuclei)) - {0} == set(range(1, n + 1)), "every cell must have its nucleus"
    inside = nuclei > 0
    assert np.array_equal(cells[inside], nuclei[inside]), "nucleus k must lie inside cell k"


# ----------------------------------------------------------------------------- registry
def test_registry_builds_classical() -> None:
    seg = make_segmenter("classical", work_side=256)
    assert isinstance(seg, Segmenter)
    assert seg.name == "classical"
    assert seg.config.work_side == 256
    assert "classical" in backend_names()


def test_registry_unknown_name_lists_valid() -> None:
    with pytest.raises(ValueError, match="classical"):
        make_segmenter("nope")


def test_unknown_option_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown classical segmenter option"):
        make_segmenter("classical", not_an_option=1)


def test_config_object_and_options_exclusive() -> None:
    with pytest.raises(ValueError):
        ClassicalSegmenter(ClassicalConfig(), work_side=128)


@pytest.mark.parametrize(
    "bad", [np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8), np.zeros((64, 64, 4), np.float32)]
)
def test_bad_input_raises(seg, bad) -> None:
    with pytest.raises(SegmentationError):
        seg.segment(bad)


# ----------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("value", [0, 7, 40000])
def test_blank_image_has_no_cells(seg, dtype, value) -> None:
    image = np.full((300, 400, 4), min(value, np.iinfo(dtype).max), dtype=dtype)
    cells, nuclei = seg.segment(image)
    assert cells.shape == (300, 400) and cells.dtype == np.int32
    assert cells.max() == 0 and nuclei.max() == 0


def test_pure_noise_has_no_cells(seg) -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(30, 8, (512, 512, 4)).clip(0, 255).astype(np.uint8)
    cells, _ = seg.segment(image)
    assert cells.max() == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quality_on_drawn_fields(seg, seed) -> None:
    image, true_cells, true_nuclei = draw_field((512, 512), seed=seed)
    cells, nuclei = seg.segment(image)
    check_contract(image, cells, nuclei)
    f1, miou = match_scores(cells, true_cells)
    nf1, _ = match_scores(nuclei, true_nuclei)
    assert f1 >= 0.8, f"cell F1 {f1:.3f}"
    assert miou >= 0.75, f"cell mean IoU {miou:.3f}"
    assert nf1 >= 0.8, f"nucleus F1 {nf1:.3f}"


@pytest.mark.slow
def test_large_field_matches_small(seg) -> None:
    image, true_cells, _ = draw_field((2048, 2048), seed=5)
    cells, nuclei = seg.segment(image)
    check_contract(image, cells, nuclei)
    f1, miou = match_scores(cells, true_cells)
    assert f1 >= 0.8 and miou >= 0.75, (f1, miou)


def test_uint8_and_uint16_agree(seg) -> None:
    image8, _, _ = draw_field((384, 384), seed=4)
    image16 = image8.astype(np.uint16) * 257
    c8, n8 = seg.segment(image8)
    c16, n16 = seg.segment(image16)
    assert c8.max() > 0
    assert np.array_equal(c8, c16) and np.array_equal(n8, n16)


def test_dim_image(seg) -> None:
    image, true_cells, _ = draw_field((512, 512), seed=6)
    dim = (image.astype(np.float32) / 12).astype(np.uint8)  # max ~21 of 255
    cells, nuclei = seg.segment(dim)
    check_contract(dim, cells, nuclei)
    f1, _ = match_scores(cells, true_cells)
    assert f1 >= 0.7, f1


def test_dim_uint16_twelve_bit(seg) -> None:
    image, true_cells, _ = draw_field((512, 512), seed=7)
    twelve = (image.astype(np.uint16) * 16).astype(np.uint16)  # 12-bit camera in a 16-bit file
    cells, nuclei = seg.segment(twelve)
    check_contract(twelve, cells, nuclei)
    assert match_scores(cells, true_cells)[0] >= 0.8


@pytest.mark.parametrize("shape", [(300, 700), (700, 300), (1000, 1500)])
@pytest.mark.slow
def test_non_square(seg, shape) -> None:
    image, true_cells, _ = draw_field(shape, seed=8)
    cells, nuclei = seg.segment(image)
    check_contract(image, cells, nuclei)
    assert match_scores(cells, true_cells)[0] >= 0.8


def test_small_field_is_not_upscaled(seg) -> None:
    image, true_cells, _ = draw_field((160, 160), seed=9, spacing=0.3)
    cells, nuclei = seg.segment(image)
    check_contract(image, cells, nuclei)
    assert cells.max() > 0


# ----------------------------------------------------------------------------- HPA-sim
def _sim():
    try:
        from locus.training.sim.generator import SimConfig, generate_field
    except ImportError as exc:  # pragma: no cover - depends on the generator being present
        pytest.skip(f"HPA-sim generator not importable: {exc}")
    return SimConfig, generate_field


@pytest.mark.slow
def test_quality_on_hpa_sim(seg) -> None:
    SimConfig, generate_field = _sim()
    scores = []
    for i in range(4):
        field = generate_field(i, 123, SimConfig())
        cells, nuclei = seg.segment(field.image)
        check_contract(field.image, cells, nuclei)
        scores.append(match_scores(cells, np.asarray(field.cells)))
    f1 = float(np.mean([s[0] for s in scores]))
    miou = float(np.mean([s[1] for s in scores]))
    assert f1 >= 0.8, f"HPA-sim cell F1 {f1:.3f}"
    assert miou >= 0.7, f"HPA-sim mean IoU {miou:.3f}"


# ----------------------------------------------------------------------------- real sample
@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real HPA sample folder {SAMPLE} is absent")
def test_real_sample(seg) -> None:
    from locus.service.imaging import decode_channel, stack_channels

    channels = {}
    for c in ("red", "green", "blue", "yellow"):
        data = (SAMPLE / f"89_B5_1_{c}.jpg").read_bytes()
        try:
            channels[c] = decode_channel(data, field=c)
        except ValueError:  # the decoder may refuse JPEG colour noise; the channel is the max over colour
            channels[c] = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).max(axis=2)
    image = stack_channels(channels)
    cells, nuclei = seg.segment(image)
    check_contract(image, cells, nuclei)
    n = int(cells.max())
    assert 8 <= n <= 16, f"{n} cells; the field shows about 11-12"
    # Most of the nuclear (blue) signal lies inside cells.
    blue = image[:, :, 2].astype(np.float64)
    assert blue[cells > 0].sum() >= 0.9 * blue.sum()
    areas = np.bincount(cells.ravel())[1:]
    assert areas.min() >= 5500 * image.shape[0] * image.shape[1] / 2048**2


# ----------------------------------------------------------------------------- building blocks
def test_h_maxima_equals_skimage() -> None:
    """The OpenCV h-maxima gives skimage's result exactly, plateaus and ties included."""
    from skimage.morphology import h_maxima as sk_h_maxima

    from locus.service.segmentation.classical import h_maxima

    rng = np.random.default_rng(7)
    for trial in range(120):
        h, w = (int(v) for v in rng.integers(3, 70, 2))
        img = rng.random((h, w)).astype(np.float32) * np.float32(rng.uniform(1, 30))
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.5, 4)))
        if trial % 3 == 0:
            img[rng.random((h, w)) < 0.3] = 0  # a masked distance map: zeros around
        if trial % 4 == 0:
            img = np.round(img)  # plateaus
        height = float(rng.uniform(0.05, 3.0))
        np.testing.assert_array_equal(h_maxima(img, height), sk_h_maxima(img, height), err_msg=f"trial {trial}")


def test_landscape_option() -> None:
    """Both cell landscapes segment a drawn field; an unknown one is refused with the valid names."""
    image, truth, _ = draw_field((384, 384), seed=3)
    for landscape in ("gradient", "intensity"):
        seg = make_segmenter("classical", landscape=landscape)
        cells, nuclei = seg.segment(image)
        check_contract(image, cells, nuclei)
        f1, miou = match_scores(cells, truth)
        assert f1 >= 0.8, (landscape, f1)
    with pytest.raises(ValueError, match="gradient"):
        ClassicalConfig(landscape="sobel")


def test_gradient_landscape_follows_a_dim_neighbour() -> None:
    """Two touching cells of unequal brightness and size: the boundary is the step in the signal, not halfway.

    A bright large cell (nucleus at x=130) meets a dim small one (nucleus at x=330) along x=260, a
    straight edge 70 px from the dim nucleus and 130 from the bright one; halfway between the nuclei
    would put it at x=230.
    """
    h, w = 256, 448
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((yy - 128) / 110.0) ** 2 + ((xx - 224) / 215.0) ** 2 < 1.0
    image = np.zeros((h, w, 4), np.uint8)
    bright = inside & (xx < 260)
    dim = inside & (xx >= 260)
    for ch in (0, 3):
        image[..., ch][bright] = 170
        image[..., ch][dim] = 60
    for cx in (130, 330):
        image[..., 2][((yy - 128) ** 2 + (xx - cx) ** 2) < 30**2] = 220
    seg = make_segmenter("classical", reference_side=700)
    cells, _ = seg.segment(image)
    left = cells[128, 130]
    right = cells[128, 330]
    assert left and right and left != right
    row = cells[128]
    edge = int(np.flatnonzero(row == right).min())
    assert abs(edge - 260) <= 6, f"boundary at x={edge}, the step is at x=260"


def _mitotic_field() -> tuple[np.ndarray, np.ndarray]:
    """A 1024² field at reference scale: three interphase cells and one mitotic cell with a metaphase plate.

    Returns the field and the mitotic cell's truth mask. The plate is a bright ellipse of semi-axes
    30 x 7 px (716 px; HPA-sim draws 400-2500 reference px), whose smoothed outline stays under
    HPA's 2500 px nucleus minimum.
    """
    h = w = 1024
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.full((h, w, 4), 4, np.uint8)
    for cy, cx in ((250, 250), (250, 700), (720, 260)):
        cell = (yy - cy) ** 2 + (xx - cx) ** 2 < 160**2
        image[..., 0][cell] = 120
        image[..., 3][cell] = 100
        image[..., 2][(yy - cy) ** 2 + (xx - cx) ** 2 < 60**2] = 150
    mitotic = (yy - 720) ** 2 + (xx - 720) ** 2 < 115**2
    image[..., 0][mitotic] = 160
    image[..., 3][mitotic] = 140
    plate = np.zeros((h, w), np.uint8)
    cv2.ellipse(plate, (720, 720), (30, 7), 30, 0, 360, 1, -1)
    image[..., 2][plate > 0] = 230
    image = cv2.GaussianBlur(image, (0, 0), 2)
    return image, mitotic


def test_mitotic_cell_with_a_thin_plate_is_segmented() -> None:
    """A mitotic cell whose condensed chromatin is a thin plate under 2500 px gets its own cell.

    HPA's 2500 px minimum (the earlier default) drops the plate's nucleus and with it the cell;
    the default minimum keeps it, and the interphase cells are found either way.
    """
    image, mitotic = _mitotic_field()

    def best_iou(cells: np.ndarray) -> float:
        ids = np.unique(cells[mitotic])
        ids = ids[ids > 0]
        ious = [(cells == k)[mitotic].sum() / ((cells == k) | mitotic).sum() for k in ids]
        return max(ious, default=0.0)

    cells, nuclei = make_segmenter("classical", reference_side=1024).segment(image)
    assert cells.max() == 4
    assert best_iou(cells) >= 0.8
    k = cells[720, 720]
    assert k and (nuclei == k).sum() > 0
    old, _ = make_segmenter("classical", reference_side=1024, min_nucleus_area=2500).segment(image)
    assert old.max() == 3 and best_iou(old) < 0.6


def _lobed_field() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 1024² field at reference scale: a binucleate cell, and a mitotic plate pressed against a neighbour's nucleus.

    Returns the field, the binucleate cell's truth mask and the mitotic cell's truth mask. The binucleate cell's two
    nuclei (radius 55, centres 90 px apart) are equally bright and touch along a wide neck; the condensed chromatin
    (an ellipse of 30 x 45 px, about twice as bright as the interphase nucleus, as on the real mitotic field
    b6a469d8) is pressed against the interphase nucleus of the cell beside it, and the smoothing joins them.
    """
    h = w = 1024
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.full((h, w, 4), 4, np.uint8)
    binucleate = ((yy - 260) / 170.0) ** 2 + ((xx - 300) / 230.0) ** 2 < 1
    image[..., 0][binucleate] = 120
    image[..., 3][binucleate] = 100
    for cx in (255, 345):
        image[..., 2][(yy - 260) ** 2 + (xx - cx) ** 2 < 55**2] = 150
    neighbour = (yy - 720) ** 2 + (xx - 330) ** 2 < 170**2
    mitotic = ((yy - 720) ** 2 + (xx - 640) ** 2 < 140**2) & ~neighbour
    image[..., 0][neighbour] = 120
    image[..., 3][neighbour] = 100
    image[..., 0][mitotic] = 170
    image[..., 3][mitotic] = 150
    image[..., 2][(yy - 720) ** 2 + (xx - 420) ** 2 < 65**2] = 120
    plate = np.zeros((h, w), np.uint8)
    cv2.ellipse(plate, (530, 720), (30, 45), 0, 0, 360, 1, -1)
    image[..., 2][plate > 0] = 250
    image = cv2.GaussianBlur(image, (0, 0), 2)
    return image, binucleate, mitotic


def test_binucleate_cell_is_one_cell_and_a_touching_mitotic_plate_is_not() -> None:
    """The two nuclei of a binucleate cell make one cell; condensed chromatin touching a neighbour keeps its own.

    Without the merge of shallow, equally bright necks (``merge_depth=0``) the binucleate cell is cut in two.
    """
    image, binucleate, mitotic = _lobed_field()

    def best_iou(cells: np.ndarray, truth: np.ndarray) -> float:
        ids = np.unique(cells[truth])
        ious = [(cells == k)[truth].sum() / ((cells == k) | truth).sum() for k in ids[ids > 0]]
        return max(ious, default=0.0)

    cells, nuclei = make_segmenter("classical", reference_side=1024).segment(image)
    check_contract(image, cells, nuclei)
    assert cells.max() == 3
    assert best_iou(cells, binucleate) >= 0.85
    assert best_iou(cells, mitotic) >= 0.6
    split, _ = make_segmenter("classical", reference_side=1024, merge_depth=0).segment(image)
    assert split.max() == 4 and best_iou(split, binucleate) < 0.6


def test_cell_per_nucleus_setting_splits_the_binucleate_cell(monkeypatch) -> None:
    """``LOCUS_CELL_PER_NUCLEUS=true`` gives each nucleus part its own cell, as HPA's segmentation does."""
    from locus.service.config import PipelineSettings
    from locus.service.factory import build_segmenter

    image, _, _ = _lobed_field()
    merged, _ = build_segmenter(PipelineSettings())[0].segment(image)
    monkeypatch.setenv("LOCUS_CELL_PER_NUCLEUS", "true")
    segmenter, name = build_segmenter(PipelineSettings())
    assert name == "classical" and segmenter.config.merge_depth == 0
    split, _ = segmenter.segment(image)
    assert split.max() == merged.max() + 1  # the binucleate cell is two
