"""The ``hpa`` segmentation backend: HPA's nuclei and cell networks in ONNX Runtime (GPU when available).

The two networks of HPA-Cell-Segmentation (DPN92 U-Nets), converted to ONNX by
``locus hpa-export``, each take a float32 ``[N, 3, H, W]`` tensor (H, W multiples
of 32) and return ``[N, 3, H, W]`` softmax probabilities: channel 1 the border
(touching) class, channel 2 the interior.

Per field:

1. Preprocessing (as HPA's): the field is rescaled by ``scale_factor`` (1/4 by
   default; area averaging) to float [0, 1]; the nuclei input is the blue channel
   repeated 3 times, the cell input stacks (red, yellow, blue); each input channel
   ``c`` is normalised as ``(x - mean[c]) / std`` with ``mean = (124, 117, 104) / 255``
   and ``std = 1 / (0.0167 * 255)``; the result is reflect-padded by ``margin``
   pixels and up to a multiple of 32.
2. Both networks run, each on a batch of fields: :meth:`HpaSegmenter.segment_many`
   batches the fields it is given, and :meth:`HpaSegmenter.segment`, called by
   concurrent requests, shares network batches across requests through one
   :class:`~locus.service.batcher.DynamicBatcher` per network and input shape.
3. The padding is cropped off and :func:`~locus.service.segmentation.hpa_postprocess.label_cell`
   labels nuclei and cells at the reduced scale (HPA's thresholds scaled by
   area); the labels are brought back to full size (nearest neighbour). With
   ``hpa_compat`` (constructor option, or per call) it reproduces HPA's official
   post-processing, defects included; by default the defects are fixed (see
   :mod:`locus.service.segmentation.hpa_postprocess`).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from locus.service.batcher import DynamicBatcher
from locus.service.imaging import to_unit255
from locus.service.inference import ProviderReport, create_session
from locus.service.labelgrid import LabelGrid
from locus.service.manifest import ModelFolderError
from locus.service.segmentation.base import SegmentationError, check_field
from locus.service.segmentation.hpa_postprocess import HpaPostprocessConfig, label_cell

__all__ = [
    "HPA_MEAN",
    "HPA_STD",
    "HpaSegmenter",
    "NUCLEI_ONNX",
    "CELL_ONNX",
    "hpa_inputs",
    "missing_weights_message",
    "pad_to_multiple",
]

log = logging.getLogger("locus.segmentation.hpa")

#: Per-channel mean of HPA's normalisation (input channel order of the networks).
HPA_MEAN = np.array([124.0, 117.0, 104.0], dtype=np.float32) / np.float32(255.0)
#: Standard deviation of HPA's normalisation: ``(x - mean) / HPA_STD`` multiplies by 0.0167 * 255 = 4.26.
HPA_STD = np.float32(1.0 / (0.0167 * 255.0))
#: File names ``locus hpa-export`` writes.
NUCLEI_ONNX = "dpn_unet_nuclei_v1.onnx"
CELL_ONNX = "dpn_unet_cell_3ch_v1.onnx"

_HOW_TO_GET = (
    "Convert HPA's official weights (Zenodo record 4665863) with "
    "`locus hpa-export --download --out-dir models/hpa` (needs torch and hpacellseg, see the README), "
    f"then set LOCUS_HPA_NUCLEI_MODEL=models/hpa/{NUCLEI_ONNX} and LOCUS_HPA_CELL_MODEL=models/hpa/{CELL_ONNX}; "
    "or use LOCUS_SEGMENTER=classical, or LOCUS_SEGMENTER_FALLBACK=true to fall back to it"
)


def missing_weights_message(nuclei_model: Path | None, cell_model: Path | None) -> str | None:
    """Say which HPA network files are missing and how to get them.

    Parameters
    ----------
    nuclei_model, cell_model : Path or None
        The configured ONNX files.

    Returns
    -------
    str or None
        The message, or None when both files exist.
    """
    problems = []
    for what, path, env in (
        ("nuclei", nuclei_model, "LOCUS_HPA_NUCLEI_MODEL"),
        ("cell", cell_model, "LOCUS_HPA_CELL_MODEL"),
    ):
        if path is None or str(path) == "":
            problems.append(f"the HPA {what} network is not configured ({env} is not set)")
        elif not Path(path).is_file():
            problems.append(f"the HPA {what} network file {path} does not exist ({env})")
    if not problems:
        return None
    return "hpa segmenter: " + "; ".join(problems) + ". " + _HOW_TO_GET + "."


def pad_to_multiple(x: np.ndarray, multiple: int = 32, margin: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad an (H, W, C) array by ``margin`` on every side and up to a multiple of ``multiple``.

    Parameters
    ----------
    x : numpy.ndarray
        (H, W, C) array.
    multiple : int
        The padded height and width are multiples of this.
    margin : int
        Pixels of context added on every side before rounding up.

    Returns
    -------
    padded : numpy.ndarray
        (H', W', C) array; the original sits at ``[margin:margin + H, margin:margin + W]``.
    offset : tuple of int
        (row, column) of the original's top-left corner, ``(margin, margin)``.
    """
    h, w = x.shape[:2]
    ph = math.ceil((h + 2 * margin) / multiple) * multiple
    pw = math.ceil((w + 2 * margin) / multiple) * multiple
    bottom, right = ph - h - margin, pw - w - margin
    if margin == 0 and bottom == 0 and right == 0:
        return x, (0, 0)
    # cv2's reflection needs the pad to be smaller than the image; np.pad handles any size.
    if max(margin, bottom) < h and max(margin, right) < w:
        padded = cv2.copyMakeBorder(x, margin, bottom, margin, right, cv2.BORDER_REFLECT)
        if padded.ndim == 2:
            padded = padded[:, :, None]
    else:
        padded = np.pad(x, ((margin, bottom), (margin, right), (0, 0)), mode="symmetric")
    return padded, (margin, margin)


def hpa_inputs(
    image: np.ndarray, scale_factor: float = 0.25, margin: int = 32
) -> tuple[np.ndarray, np.ndarray, tuple[int, int], tuple[int, int]]:
    """HPA's preprocessing of one field: the nuclei and cell network inputs.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W, 4) field, R, G, B, Y, ``uint8`` or ``uint16``.
    scale_factor : float
        Rescaling factor (area averaging when shrinking).
    margin : int
        Reflected context added on every side before padding to a multiple of 32.

    Returns
    -------
    nuclei_input : numpy.ndarray
        (3, H', W') float32: the normalised blue channel, three times.
    cell_input : numpy.ndarray
        (3, H', W') float32: normalised red, yellow, blue.
    size : tuple of int
        (h, w), the rescaled field's size.
    offset : tuple of int
        Where the rescaled field sits in the padded inputs.
    """
    H, W = image.shape[:2]
    h, w = max(1, round(H * scale_factor)), max(1, round(W * scale_factor))
    rgb = np.ascontiguousarray(to_unit255(image[:, :, [0, 3, 2]]))  # red, yellow, blue in 0-255
    if (h, w) != (H, W):
        interp = cv2.INTER_AREA if scale_factor < 1 else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (w, h), interpolation=interp)
    unit = rgb * np.float32(1.0 / 255.0)
    cell = (unit - HPA_MEAN) / HPA_STD
    nuc = (np.repeat(unit[:, :, 2:3], 3, axis=2) - HPA_MEAN) / HPA_STD
    cell, offset = pad_to_multiple(cell.astype(np.float32, copy=False), 32, margin)
    nuc, _ = pad_to_multiple(nuc.astype(np.float32, copy=False), 32, margin)
    return (
        np.ascontiguousarray(nuc.transpose(2, 0, 1)),
        np.ascontiguousarray(cell.transpose(2, 0, 1)),
        (h, w),
        offset,
    )


class _Network:
    """One HPA network: its session and, per input shape, a dynamic batcher for concurrent callers."""

    def __init__(self, what: str, path: Path, providers: list[str], threads: int, require_gpu: bool) -> None:
        self.what = what
        self.path = Path(path)
        try:
            self.session, self.report = create_session(
                self.path, providers, intra_op_threads=threads, require_gpu=require_gpu
            )
        except ModelFolderError as exc:
            raise SegmentationError(f"hpa segmenter: the {what} network {path} cannot be used: {exc}") from exc
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] not in (3, "C", None):
            shapes = [i.shape for i in inputs]
            raise SegmentationError(f"hpa segmenter: {path} must take one [N, 3, H, W] input, it takes {shapes}")
        if not outputs:
            raise SegmentationError(f"hpa segmenter: {path} has no output")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self._batchers: dict[tuple[int, ...], DynamicBatcher] = {}
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch (N, 3, H, W) -> (N, 3, H, W) probabilities."""
        (out,) = self.session.run([self.output_name], {self.input_name: batch})
        out = np.asarray(out, dtype=np.float32)
        if out.shape != batch.shape:
            raise SegmentationError(
                f"hpa segmenter: the {self.what} network {self.path.name} returned shape {out.shape} "
                f"for input {batch.shape}; expected [N, 3, H, W] probabilities"
            )
        return out

    def batcher(self, shape: tuple[int, ...], max_batch: int, max_wait_s: float) -> DynamicBatcher:
        """The dynamic batcher for inputs of one shape (created on first use)."""
        with self._lock:
            b = self._batchers.get(shape)
            if b is None:
                b = DynamicBatcher(self.run, max_batch=max_batch, max_wait_s=max_wait_s)
                self._batchers[shape] = b
            return b

    def close(self) -> None:
        with self._lock:
            for b in self._batchers.values():
                b.close()
            self._batchers.clear()


class HpaSegmenter:
    """HPA's nuclei and cell networks (ONNX Runtime) plus HPA's post-processing.

    Parameters
    ----------
    nuclei_model, cell_model : Path or None
        The ONNX files written by ``locus hpa-export``.
    providers : list of str, optional
        ONNX Runtime providers in order of preference (default CUDA, then CPU).
    scale_factor : float
        Scale at which the networks and the post-processing run (HPA: 0.25).
    margin : int
        Reflected context around the rescaled field before padding to a multiple of 32
        (32, as ``hpacellseg`` with ``padding=True``).
    intra_op_threads : int
        ONNX Runtime intra-op threads (0: ONNX Runtime's default).
    require_gpu : bool
        Refuse to start when a GPU provider was asked for but not obtained.
    max_batch : int
        Most fields in one network batch; concurrent :meth:`segment` calls share batches.
    max_wait_ms : float
        How long a network batch waits for fields of other requests.
    postprocess : HpaPostprocessConfig, optional
        Post-processing thresholds (full-resolution pixels).
    hpa_compat : bool, optional
        Reproduce HPA's official post-processing (defects included) instead of the
        default mode; overrides ``postprocess.hpa_compat`` when given.

    Raises
    ------
    SegmentationError
        A network file is not configured, missing or unusable; the message says how to get it.

    Examples
    --------
    >>> seg = HpaSegmenter(Path("models/hpa/dpn_unet_nuclei_v1.onnx"),
    ...                    Path("models/hpa/dpn_unet_cell_3ch_v1.onnx"))  # doctest: +SKIP
    >>> cells, nuclei = seg.segment(image)  # doctest: +SKIP
    """

    name: str = "hpa"

    def __init__(
        self,
        nuclei_model: Path | str | None = None,
        cell_model: Path | str | None = None,
        providers: list[str] | None = None,
        scale_factor: float = 0.25,
        margin: int = 32,
        intra_op_threads: int = 0,
        require_gpu: bool = False,
        max_batch: int = 4,
        max_wait_ms: float = 2.0,
        postprocess: HpaPostprocessConfig | None = None,
        hpa_compat: bool | None = None,
    ) -> None:
        nuclei_model = Path(nuclei_model) if nuclei_model not in (None, "") else None
        cell_model = Path(cell_model) if cell_model not in (None, "") else None
        message = missing_weights_message(nuclei_model, cell_model)
        if message:
            raise SegmentationError(message)
        if not 0 < scale_factor <= 1:
            raise ValueError(f"scale_factor must be in (0, 1], got {scale_factor}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.scale_factor = float(scale_factor)
        self.margin = int(margin)
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1e3
        self.postprocess = postprocess or HpaPostprocessConfig()
        if hpa_compat is not None:
            self.postprocess = replace(self.postprocess, hpa_compat=bool(hpa_compat))
        self.providers_requested = list(providers or ["CUDAExecutionProvider", "CPUExecutionProvider"])
        assert nuclei_model is not None and cell_model is not None  # checked above
        self.nuclei_net = _Network("nuclei", nuclei_model, self.providers_requested, intra_op_threads, require_gpu)
        self.cell_net = _Network("cell", cell_model, self.providers_requested, intra_op_threads, require_gpu)
        log.info(
            "hpa segmenter: nuclei network %s on %s, cell network %s on %s (scale %.3g)",
            nuclei_model.name,
            self.nuclei_net.report.primary,
            cell_model.name,
            self.cell_net.report.primary,
            self.scale_factor,
        )

    def __repr__(self) -> str:
        return (
            f"HpaSegmenter(nuclei_model={str(self.nuclei_net.path)!r}, cell_model={str(self.cell_net.path)!r}, "
            f"provider={self.provider.primary!r}, scale_factor={self.scale_factor})"
        )

    @property
    def provider(self) -> ProviderReport:
        """Providers asked for and obtained by the networks (the cell network's; both are built alike)."""
        return self.cell_net.report

    @property
    def providers_obtained(self) -> dict[str, tuple[str, ...]]:
        """The providers each network's session obtained."""
        return {"nuclei": self.nuclei_net.report.obtained, "cell": self.cell_net.report.obtained}

    def close(self) -> None:
        """Stop the per-shape batchers (sessions are released with the object)."""
        self.nuclei_net.close()
        self.cell_net.close()

    # ------------------------------------------------------------------ stages
    def predict_maps(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Run both networks over fields, batching fields of equal padded size.

        Parameters
        ----------
        images : list of numpy.ndarray
            (H, W, 4) fields.

        Returns
        -------
        list of (numpy.ndarray, numpy.ndarray)
            Per field, the (h, w, 3) float32 nuclei and cell probability maps at the reduced scale.
        """
        prepared = [hpa_inputs(check_field(im), self.scale_factor, self.margin) for im in images]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (nuc, _, _, _) in enumerate(prepared):
            groups.setdefault(nuc.shape, []).append(i)
        results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(images)
        for idx in groups.values():
            for start in range(0, len(idx), self.max_batch):
                chunk = idx[start : start + self.max_batch]
                nuc_out = self.nuclei_net.run(np.stack([prepared[i][0] for i in chunk]))
                cell_out = self.cell_net.run(np.stack([prepared[i][1] for i in chunk]))
                for j, i in enumerate(chunk):
                    results[i] = self._crop_pair(nuc_out[j], cell_out[j], prepared[i][2], prepared[i][3])
        return [r for r in results if r is not None]

    def _maps_shared(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both maps of one field, the networks' batches shared with concurrent callers."""
        nuc, cell, size, offset = hpa_inputs(image, self.scale_factor, self.margin)
        if self.max_batch == 1:
            nuc_out, cell_out = self.nuclei_net.run(nuc[None]), self.cell_net.run(cell[None])
        else:
            nuc_future = self.nuclei_net.batcher(nuc.shape, self.max_batch, self.max_wait_s).submit(nuc[None])
            cell_future = self.cell_net.batcher(cell.shape, self.max_batch, self.max_wait_s).submit(cell[None])
            nuc_out, cell_out = nuc_future.result(), cell_future.result()
        return self._crop_pair(nuc_out[0], cell_out[0], size, offset)

    @staticmethod
    def _crop_pair(
        nuc_out: np.ndarray, cell_out: np.ndarray, size: tuple[int, int], offset: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        (h, w), (r, c) = size, offset
        nuc_map = np.ascontiguousarray(nuc_out[:, r : r + h, c : c + w].transpose(1, 2, 0))
        cell_map = np.ascontiguousarray(cell_out[:, r : r + h, c : c + w].transpose(1, 2, 0))
        return nuc_map, cell_map

    def labels_from_maps(
        self, nuclei_map: np.ndarray, cell_map: np.ndarray, shape: tuple[int, int], hpa_compat: bool | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Post-process reduced-scale maps and bring the labels to full size.

        Parameters
        ----------
        nuclei_map, cell_map : numpy.ndarray
            (h, w, 3) probability maps at the reduced scale.
        shape : tuple of int
            (H, W) of the full-resolution field.
        hpa_compat : bool, optional
            HPA's official post-processing (True) or the default mode (False) for this
            call; None: the segmenter's setting.

        Returns
        -------
        cell_labels, nuclei_labels : numpy.ndarray
            (H, W) int32 each, nucleus ``k`` inside cell ``k``.
        """
        cells, nuclei = self.grids_from_maps(nuclei_map, cell_map, shape, hpa_compat)
        return cells.full(), nuclei.full()

    def grids_from_maps(
        self, nuclei_map: np.ndarray, cell_map: np.ndarray, shape: tuple[int, int], hpa_compat: bool | None = None
    ) -> tuple[LabelGrid, LabelGrid]:
        """Post-process reduced-scale maps into label grids of the full-size field (:mod:`locus.service.labelgrid`).

        The default mode brings its labels up by a plain nearest-neighbour resize, so they stay at the maps' scale
        with the index maps; HPA's compat mode clears the cells' edges at full resolution, so its grids hold
        full-resolution images. Parameters as :meth:`labels_from_maps`.

        Returns
        -------
        cells, nuclei : LabelGrid
            Cell labels ``1..n`` and nucleus labels (nucleus ``k`` inside cell ``k``), full size (H, W).
        """
        compat = self.postprocess.hpa_compat if hpa_compat is None else bool(hpa_compat)
        shape = (int(shape[0]), int(shape[1]))
        if compat:
            nuclei, cells = label_cell(
                nuclei_map,
                cell_map,
                scale=self.scale_factor,
                config=self.postprocess,
                hpa_compat=True,
                output_shape=shape,
            )
            return LabelGrid.identity(cells), LabelGrid.identity(nuclei)
        nuclei, cells = label_cell(
            nuclei_map, cell_map, scale=self.scale_factor, config=self.postprocess, hpa_compat=False
        )
        return LabelGrid.upsampled(cells, shape), LabelGrid.upsampled(nuclei, shape)

    # ------------------------------------------------------------------ public
    def segment(self, image: np.ndarray, *, hpa_compat: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Segment one field of view; concurrent calls share network batches.

        Parameters
        ----------
        image : numpy.ndarray
            (H, W, 4) field in R, G, B, Y order, ``uint8`` or ``uint16``.
        hpa_compat : bool, optional
            HPA's official post-processing (True) or the default mode (False) for this
            field; None: the segmenter's setting.

        Returns
        -------
        cell_labels : numpy.ndarray
            (H, W) ``int32``, 0 = background, cells ``1..n``.
        nuclei_labels : numpy.ndarray
            (H, W) ``int32``, nucleus ``k`` inside cell ``k`` (0 where a cell's nucleus was lost).

        Raises
        ------
        SegmentationError
            Not an (H, W, 4) ``uint8``/``uint16`` field, or a network returned the wrong shape.
        """
        check_field(image)
        nuc_map, cell_map = self._maps_shared(image)
        return self.labels_from_maps(nuc_map, cell_map, image.shape[:2], hpa_compat)

    def segment_grids(self, image: np.ndarray, *, hpa_compat: bool | None = None) -> tuple[LabelGrid, LabelGrid]:
        """Segment one field of view into label grids (:meth:`grids_from_maps`); :meth:`segment` is their ``full()``.

        Parameters
        ----------
        image : numpy.ndarray
            As for :meth:`segment`.
        hpa_compat : bool, optional
            As for :meth:`segment`.

        Returns
        -------
        cells, nuclei : LabelGrid
            Cell labels ``1..n`` and nucleus labels (nucleus ``k`` inside cell ``k``), full size (H, W).
        """
        check_field(image)
        nuc_map, cell_map = self._maps_shared(image)
        return self.grids_from_maps(nuc_map, cell_map, image.shape[:2], hpa_compat)

    def segment_many(
        self, images: list[np.ndarray], *, hpa_compat: bool | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Segment several fields, running each network once per batch of equally sized fields.

        Parameters
        ----------
        images : list of numpy.ndarray
            (H, W, 4) fields.
        hpa_compat : bool, optional
            As in :meth:`segment`.

        Returns
        -------
        list of (numpy.ndarray, numpy.ndarray)
            Per field, ``(cell_labels, nuclei_labels)`` as :meth:`segment` returns them.
        """
        maps = self.predict_maps(images)
        return [self.labels_from_maps(n, c, im.shape[:2], hpa_compat) for (n, c), im in zip(maps, images, strict=True)]
