"""Pipeline settings and defaults: the one home of every knob the array pipeline reads.

:class:`PipelineSettings` holds what building and running the pipeline needs (model
folder, segmentation backend, ONNX Runtime, integrated-gradient defaults and the pixel
limit of decoding); it reads ``LOCUS_*`` environment variables. The HTTP service's
:class:`locus.service.settings.Settings` extends it with server-only settings (limits,
keys, logging), so ``locus serve``, ``locus predict``, ``locus overlay`` and training's
crop extraction all read the same values from the same variables.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from locus.service.tta import TTA_VIEWS

__all__ = [
    "PipelineSettings",
    "DEFAULT_MODEL_DIR",
    "REPO_MODELS",
    "IG_STEPS",
    "IG_MAX_STEPS",
    "IG_TOLERANCE",
    "IG_MAX_CELLS",
    "IG_BASELINE",
    "IG_BUDGET",
    "MAX_MAP_BYTES",
    "MAX_IMAGE_PIXELS",
    "BYTES_PER_PIXEL",
    "PER_REQUEST_MB",
    "peak_memory_mb",
    "add_hpa_compat_argument",
    "apply_hpa_compat",
]

REPO_MODELS = Path(__file__).resolve().parents[1] / "models"
DEFAULT_MODEL_DIR = REPO_MODELS / "locus-sim-b0"

IG_STEPS = 64
"""Default integrated-gradient steps (trapezoid intervals; ``steps + 1`` gradient evaluations per cell and class)."""
IG_MAX_STEPS = 512
"""Largest step count a caller may ask for, and the most a map is refined to (see ``IG_TOLERANCE``)."""
IG_TOLERANCE = 0.05
"""Relative completeness error a map must meet: maps over it are refined to 2x, 4x ... the steps (midpoints only),
up to ``IG_MAX_STEPS`` and within ``IG_BUDGET``; each map reports the steps it used. 5 % is the bound of the IG paper
(Sundararajan et al. 2017) for a converged integral."""
IG_MAX_CELLS = 64
"""Largest number of cells given attribution maps in one field."""
IG_BUDGET = 16384
"""Most gradient-model evaluations (cells x classes x (steps + 1)) one field's attributions may cost: 64 cells x
3 classes at 84 steps, or 11 cells x 19 classes at 77 steps. About 20 ms each on one CPU core, 0.2 ms on a GPU."""
MAX_MAP_BYTES = 64 * 1024 * 1024
"""Most bytes the encoded attribution maps of one field may add to the answer."""
IG_BASELINE = "black"
"""Default integrated-gradient baseline."""
MAX_IMAGE_PIXELS = 6144 * 6144
"""Largest height x width of one channel, checked before any pixel is decoded."""


BYTES_PER_PIXEL = 12
"""Working memory of one running request per pixel of one channel (16-bit field; measured, see docs/OPERATIONS.md)."""
PER_REQUEST_MB = 80
"""Working memory of one running request that does not grow with the field (measured)."""
SPOOL_MB = 4
"""Upload bytes a queued request keeps in memory: the multipart parser spools each file to disk beyond 1 MiB."""


def peak_memory_mb(*, running: int, queued: int, pixels: int, request_bytes: int) -> float:
    """Peak resident memory above the idle service, from the limits (the formula of docs/OPERATIONS.md).

    Parameters
    ----------
    running : int
        Requests classified at once (``LOCUS_MAX_CONCURRENT``, default the number of cores).
    queued : int
        Requests waiting (``LOCUS_MAX_QUEUE``).
    pixels : int
        Pixels of one channel (at most ``LOCUS_MAX_IMAGE_PIXELS``).
    request_bytes : int
        Upload bytes of one request (at most ``LOCUS_MAX_REQUEST_BYTES``).

    Returns
    -------
    float
        ``running x (PER_REQUEST_MB + BYTES_PER_PIXEL x pixels + request_bytes) + queued x SPOOL_MB``, in MiB.
    """
    per_running = PER_REQUEST_MB + (BYTES_PER_PIXEL * pixels + request_bytes) / 2**20
    return running * per_running + queued * SPOOL_MB


def add_hpa_compat_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--hpa-compat/--no-hpa-compat`` to a command (applied with :func:`apply_hpa_compat`).

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The command's parser.
    """
    parser.add_argument(
        "--hpa-compat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="hpa segmenter: HPA's official post-processing step by step (or --no-hpa-compat: Locus's default); "
        "sets LOCUS_HPA_COMPAT for this run",
    )


def apply_hpa_compat(args: object) -> None:
    """Carry a command's ``--hpa-compat/--no-hpa-compat`` into ``LOCUS_HPA_COMPAT`` for this run.

    The setting then reaches every pipeline the command builds (and, with ``--engine ray`` on a
    local cluster, the actors, which inherit the environment) through the one settings class.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments; ``hpa_compat`` None leaves the environment as it is.
    """
    value = getattr(args, "hpa_compat", None)
    if value is not None:
        os.environ["LOCUS_HPA_COMPAT"] = "true" if value else "false"


def split_list(value: object) -> object:
    """Read a list setting given as JSON (``'["a", "b"]'``) or comma-separated text.

    Parameters
    ----------
    value : object
        The raw value.

    Returns
    -------
    object
        A list for text input, ``value`` unchanged otherwise.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class PipelineSettings(BaseSettings):
    """Settings of the array pipeline; each field reads ``LOCUS_<FIELD NAME>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix="LOCUS_", env_file=None, extra="ignore", protected_namespaces=())

    # Model and segmentation
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Model folder (model.onnx, manifest.json, ...)")
    segmenter: str = Field("classical", description="Segmentation backend: classical, hpa or hpacellseg")
    segmenter_fallback: bool = Field(
        False, description="When the chosen segmenter cannot start (e.g. missing HPA weights), fall back to classical"
    )
    hpa_nuclei_model: Path | None = Field(None, description="ONNX file of the HPA nuclei network (hpa backend)")
    hpa_cell_model: Path | None = Field(None, description="ONNX file of the HPA cell network (hpa backend)")
    hpa_compat: bool = Field(
        False,
        description="hpa backend: reproduce HPA's official post-processing, defects included "
        "(touching nuclei can merge); default: the defects fixed",
    )
    cell_per_nucleus: bool = Field(
        False,
        description="classical backend: give every part of a split nucleus mask its own cell, as HPA's "
        "segmentation (and so the HPA competition's masks) does; default: lobes and the two nuclei of a binucleate "
        "cell make one cell",
    )

    # ONNX Runtime
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="ONNX Runtime execution providers in order of preference",
    )
    require_gpu: bool = Field(False, description="Refuse to start when CUDA was asked for but is not obtained")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = number of cores (max 8)")
    max_batch: int = Field(64, ge=1, le=4096, description="Largest batch of cells sent to the model at once")
    fixed_batch: bool | None = Field(
        None,
        description="Pad every model call to max_batch cells (one input shape, planned once at load); unset = on a "
        "GPU only, where each new batch shape costs a cuDNN algorithm search of 0.5-2.7 s",
    )
    cudnn_conv_algo_search: Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"] = Field(
        "HEURISTIC",
        description="cuDNN convolution algorithm search on CUDA: HEURISTIC plans a batch shape in about 0.5 s, "
        "EXHAUSTIVE (ONNX Runtime's default) in 1-3 s for the same speed afterwards, DEFAULT fast but runs slowly",
    )
    max_wait_ms: float = Field(
        2.0, ge=0.0, le=1000.0, description="How long the batcher waits for cells of other requests to join a batch"
    )
    tta: str = Field(
        "auto",
        description="Test-time augmentation: each cell's scores averaged over 1, 2, 4 or 8 flipped/transposed views "
        "of its crop; 'auto' (default) = 8 when the model runs on a GPU, 1 on a CPU",
    )
    field_context: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Weight of the field's mean scores in each cell's scores (0 = each cell's own scores)",
    )

    # Attributions (integrated gradients)
    ig_steps: int = Field(IG_STEPS, ge=2, description="Default number of integrated-gradient steps")
    ig_max_steps: int = Field(
        IG_MAX_STEPS, ge=2, description="Largest step count a request may ask for, and the most a map is refined to"
    )
    ig_tolerance: float = Field(
        IG_TOLERANCE,
        ge=0.0,
        le=1.0,
        description="Relative completeness error a map must meet; maps over it are refined to 2x, 4x ... the steps "
        "(within ig_max_steps and ig_budget); 0 turns refinement off",
    )
    ig_max_cells: int = Field(IG_MAX_CELLS, ge=1, description="Largest number of cells with attributions per field")
    ig_budget: int = Field(
        IG_BUDGET, ge=1, description="Most gradient evaluations (cells x classes x (steps + 1)) per field"
    )

    max_map_bytes: int = Field(
        MAX_MAP_BYTES, ge=1, description="Most bytes the attribution maps of one field may add to the answer"
    )

    # Decoding
    max_image_pixels: int = Field(
        MAX_IMAGE_PIXELS, ge=1, description="Largest height x width of a channel, checked before decoding"
    )

    @field_validator("tta", mode="before")
    @classmethod
    def _tta(cls, value: object) -> object:
        text = str(value).strip().lower()
        if text != "auto" and text not in {str(v) for v in TTA_VIEWS}:
            raise ValueError(f"LOCUS_TTA must be auto, 1, 2, 4 or 8, got {value!r}")
        return text

    def resolved_tta(self, on_gpu: bool) -> int:
        """Test-time augmentation views: the setting, or for ``auto`` 8 on a GPU and 1 on a CPU.

        Parameters
        ----------
        on_gpu : bool
            Whether the classifier's session runs on a GPU provider.

        Returns
        -------
        int
            1, 2, 4 or 8.
        """
        if self.tta == "auto":
            return 8 if on_gpu else 1
        return int(self.tta)

    @field_validator("providers", mode="before")
    @classmethod
    def _providers(cls, value: object) -> object:
        return split_list(value)

    def cores(self) -> int:
        """Number of usable CPU cores."""
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)

    def resolved_threads(self) -> int:
        """ONNX Runtime intra-op threads actually used."""
        return self.intra_op_threads or min(self.cores(), 8)

    def segmenter_options(self, name: str | None = None) -> dict:
        """Constructor options of a segmentation backend, from these settings.

        Parameters
        ----------
        name : str, optional
            Backend name; default :attr:`segmenter`.

        Returns
        -------
        dict
            Keyword options for :func:`locus.service.segmentation.make_segmenter` (for ``classical`` only
            ``merge_depth=0`` with :attr:`cell_per_nucleus`).
        """
        if (name or self.segmenter) == "classical":
            return {"merge_depth": 0.0} if self.cell_per_nucleus else {}
        if (name or self.segmenter) != "hpa":
            return {}
        return {
            "nuclei_model": self.hpa_nuclei_model,
            "cell_model": self.hpa_cell_model,
            "providers": self.providers,
            "intra_op_threads": self.resolved_threads(),
            "require_gpu": self.require_gpu,
            "hpa_compat": self.hpa_compat,
        }
