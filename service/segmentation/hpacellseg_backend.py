"""The ``hpacellseg`` segmentation backend: HPA-Cell-Segmentation's own ``CellSegmentator`` (PyTorch).

``hpacellseg`` is optional: it is not on PyPI, installs from its Git repository
together with ``pytorch_zoo`` from GitHub, and pins old libraries. This backend
calls it directly where it is importable and works around its known breakages
on current libraries:

* ``skimage.transform.rescale(..., multichannel=True)`` raises on scikit-image
  >= 0.19 (the keyword became ``channel_axis``): while the package runs, its
  module sees a ``transform`` whose ``rescale`` translates the keyword.
* ``torch.load`` defaults to ``weights_only=True`` since torch 2.6, and HPA's
  weights are whole pickled modules: while the networks load, ``torch.load``
  defaults to ``weights_only=False`` (the files are HPA's own, from Zenodo).
* 1728² fields fail without padding: ``padding=True`` always.

The package's probability maps are post-processed by this project's
:func:`~locus.service.segmentation.hpa_postprocess.label_cell` at ``scale_factor``
(so both HPA backends label alike); ``postprocess="hpacellseg"`` uses the
package's own ``utils.label_cell`` at full resolution instead.

The ONNX ``hpa`` backend runs the same networks without PyTorch and batches
them across requests; prefer it for serving.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from locus.service.config import REPO_MODELS
from locus.service.imaging import to_unit255
from locus.service.segmentation.base import SegmentationError, check_field
from locus.service.segmentation.hpa_postprocess import HpaPostprocessConfig, label_cell

__all__ = ["HpaCellSegSegmenter", "INSTALL_HINT", "relabel_pair"]

log = logging.getLogger("locus.segmentation.hpacellseg")

INSTALL_HINT = (
    "the hpacellseg backend needs the hpacellseg package, which is not on PyPI: install it with "
    "`pip install git+https://github.com/haoxusci/pytorch_zoo@master#egg=pytorch_zoo` and "
    "`pip install git+https://github.com/CellProfiling/HPA-Cell-Segmentation.git` (plus torch). "
    "The same networks run without PyTorch in the `hpa` backend: convert the weights with "
    "`locus hpa-export` and set LOCUS_SEGMENTER=hpa"
)

_PATCH_LOCK = threading.RLock()


class _RescaleCompat:
    """``skimage.transform`` whose ``rescale`` still accepts the removed ``multichannel`` keyword."""

    def __init__(self, wrapped) -> None:
        self._wrapped = wrapped

    def __getattr__(self, name: str):
        return getattr(self._wrapped, name)

    def rescale(self, image, scale, *args, multichannel: bool | None = None, **kwargs):
        if multichannel is not None and "channel_axis" not in kwargs:
            kwargs["channel_axis"] = -1 if multichannel else None
        return self._wrapped.rescale(image, scale, *args, **kwargs)


@contextlib.contextmanager
def _compat(module, load_modules: bool = False) -> Iterator[None]:
    """Within the block, ``module.transform`` is the rescale shim and, with ``load_modules``,
    ``torch.load`` loads whole pickled modules (``weights_only=False``)."""
    with _PATCH_LOCK:
        saved_transform = getattr(module, "transform", None)
        if saved_transform is not None and not isinstance(saved_transform, _RescaleCompat):
            module.transform = _RescaleCompat(saved_transform)
        torch = None
        saved_load = None
        if load_modules:
            with contextlib.suppress(ImportError):
                torch = importlib.import_module("torch")
        if torch is not None:
            saved_load = torch.load
            torch.load = functools.partial(saved_load, weights_only=False)
        try:
            yield
        finally:
            if saved_transform is not None:
                module.transform = saved_transform
            if torch is not None and saved_load is not None:
                torch.load = saved_load


def relabel_pair(cells: np.ndarray, nuclei: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bring a (cells, nuclei) pair to the Segmenter contract: cells ``1..n``, nucleus ``k`` inside cell ``k``.

    Parameters
    ----------
    cells : numpy.ndarray
        (H, W) integer cell labels (any ids).
    nuclei : numpy.ndarray
        (H, W) nucleus labels; each nucleus pixel is kept with the id of the cell it lies in.

    Returns
    -------
    cells, nuclei : numpy.ndarray
        (H, W) int32 each.
    """
    cells = np.asarray(cells).astype(np.int64)
    ids = np.unique(cells)
    ids = ids[ids != 0]
    lut = np.zeros(int(cells.max()) + 1 if cells.size else 1, dtype=np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    new_cells = lut[cells]
    new_nuclei = np.where(np.asarray(nuclei) > 0, new_cells, 0).astype(np.int32)
    return new_cells.astype(np.int32), new_nuclei


class HpaCellSegSegmenter:
    """HPA-Cell-Segmentation's ``CellSegmentator``, called directly, with compatibility shims.

    Parameters
    ----------
    nuclei_model, cell_model : str or Path, optional
        The official weights (``dpn_unet_nuclei_v1.pth``, ``dpn_unet_cell_3ch_v1.pth``); default
        ``models/hpa/`` in the repository (the package downloads missing files there).
    device : str
        ``"cuda"`` or ``"cpu"`` (the package falls back to the CPU without CUDA).
    scale_factor : float
        Scale at which the networks run (HPA: 0.25).
    postprocess : {"locus", "hpacellseg"}
        Label with this project's ``label_cell`` at ``scale_factor`` (default) or with the package's own.
    postprocess_config : HpaPostprocessConfig, optional
        Thresholds of the project's post-processing.

    Raises
    ------
    SegmentationError
        ``hpacellseg`` is not importable (the message says how to install it), or its networks cannot load.
    """

    name: str = "hpacellseg"

    def __init__(
        self,
        nuclei_model: str | Path | None = None,
        cell_model: str | Path | None = None,
        device: str = "cuda",
        scale_factor: float = 0.25,
        postprocess: Literal["locus", "hpacellseg"] = "locus",
        postprocess_config: HpaPostprocessConfig | None = None,
    ) -> None:
        try:
            self._module = importlib.import_module("hpacellseg.cellsegmentator")
        except ImportError as exc:
            raise SegmentationError(f"{INSTALL_HINT} ({exc})") from exc
        if postprocess not in ("locus", "hpacellseg"):
            raise ValueError(f"postprocess must be 'locus' or 'hpacellseg', got {postprocess!r}")
        hpa_dir = REPO_MODELS / "hpa"
        self.nuclei_model = str(nuclei_model or hpa_dir / "dpn_unet_nuclei_v1.pth")
        self.cell_model = str(cell_model or hpa_dir / "dpn_unet_cell_3ch_v1.pth")
        self.scale_factor = float(scale_factor)
        self.postprocess = postprocess
        self.postprocess_config = postprocess_config or HpaPostprocessConfig()
        try:
            with _compat(self._module, load_modules=True):
                self._segmentator = self._module.CellSegmentator(
                    self.nuclei_model,
                    self.cell_model,
                    scale_factor=self.scale_factor,
                    device=device,
                    padding=True,
                )
        except SegmentationError:
            raise
        except Exception as exc:  # the package raises whatever torch or its downloader raises
            raise SegmentationError(
                f"hpacellseg could not load its networks ({self.nuclei_model}, {self.cell_model}): {exc}"
            ) from exc
        self.device = str(getattr(self._segmentator, "device", device))
        log.info("hpacellseg segmenter on %s (scale %.3g, post-processing %s)", self.device, scale_factor, postprocess)

    def __repr__(self) -> str:
        return f"HpaCellSegSegmenter(device={self.device!r}, scale_factor={self.scale_factor})"

    def predict_maps(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The package's full-resolution nuclei and cell probability maps of one field.

        Parameters
        ----------
        image : numpy.ndarray
            (H, W, 4) field, R, G, B, Y.

        Returns
        -------
        nuclei_map, cell_map : numpy.ndarray
            (H, W, 3) ``uint8`` each (channel 1 border, 2 interior).
        """
        u8 = np.clip(to_unit255(check_field(image)) + 0.5, 0, 255).astype(np.uint8)
        red, blue, yellow = u8[:, :, 0], u8[:, :, 2], u8[:, :, 3]
        with _compat(self._module):
            nuclei_map = self._segmentator.pred_nuclei([blue])[0]
            cell_map = self._segmentator.pred_cells([[red], [yellow], [blue]])[0]
        return np.asarray(nuclei_map), np.asarray(cell_map)

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment one field of view.

        Parameters
        ----------
        image : numpy.ndarray
            (H, W, 4) field in R, G, B, Y order, ``uint8`` or ``uint16``.

        Returns
        -------
        cell_labels, nuclei_labels : numpy.ndarray
            (H, W) ``int32`` each; cells ``1..n``, nucleus ``k`` inside cell ``k``.
        """
        H, W = image.shape[:2]
        nuclei_map, cell_map = self.predict_maps(image)
        if self.postprocess == "hpacellseg":
            utils = importlib.import_module("hpacellseg.utils")
            nuclei, cells = utils.label_cell(nuclei_map, cell_map)
            return relabel_pair(cells, nuclei)
        s = self.scale_factor
        if s < 1:
            size = (max(1, round(W * s)), max(1, round(H * s)))
            nuclei_map = cv2.resize(nuclei_map, size, interpolation=cv2.INTER_AREA)
            cell_map = cv2.resize(cell_map, size, interpolation=cv2.INTER_AREA)
        nuclei, cells = label_cell(nuclei_map, cell_map, scale=min(s, 1.0), config=self.postprocess_config)
        if cells.shape != (H, W):
            cells = cv2.resize(cells, (W, H), interpolation=cv2.INTER_NEAREST_EXACT)
            nuclei = cv2.resize(nuclei, (W, H), interpolation=cv2.INTER_NEAREST_EXACT)
        return np.ascontiguousarray(cells, dtype=np.int32), np.ascontiguousarray(nuclei, dtype=np.int32)
