"""The model folder contract: ``manifest.json`` and its validation.

A model folder (``models/<name>/``) holds ``model.onnx``, optionally
``grad.onnx``, ``manifest.json`` and ``MODEL_CARD.md``. The service refuses a
folder whose manifest is missing, malformed, or does not match its ONNX files,
with a :class:`ModelFolderError` that names the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from locus.service.classes import CHANNELS, CLASS_NAMES, NUM_CLASSES
from locus.service.crop import CropRule
from locus.service.tta import TTA_VIEWS

__all__ = ["CropSpec", "GradSpec", "Manifest", "ModelFolderError", "load_manifest", "sha256_file", "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.json"


class ModelFolderError(RuntimeError):
    """A model folder that cannot be served; the message names the file and what is wrong."""


class CropSpec(BaseModel):
    """The crop rule as stored in the manifest (see :mod:`locus.service.crop`)."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(gt=0, le=2048)
    padding: float = Field(ge=0.0, le=2.0)
    mask_other_cells: bool
    min_side: int = Field(default=16, ge=1)

    def rule(self) -> CropRule:
        """Return the executable :class:`~locus.service.crop.CropRule`."""
        return CropRule(
            size=self.size, padding=self.padding, mask_other_cells=self.mask_other_cells, min_side=self.min_side
        )


class GradSpec(BaseModel):
    """The gradient model used for integrated gradients."""

    model_config = ConfigDict(extra="forbid")

    file: str = "grad.onnx"
    batch: int = Field(gt=0, description="Fixed batch size of grad.onnx")
    inputs: list[str] = Field(default_factory=lambda: ["image", "weights"])
    outputs: list[str] = Field(default_factory=lambda: ["gradients", "probabilities"])


class Manifest(BaseModel):
    """Everything the service needs to serve a model folder, and nothing it must guess."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = 1
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    architecture: str
    input_size: int = Field(gt=0)
    input_name: str = "image"
    output_name: str = "probabilities"
    channels: list[str] = Field(default_factory=lambda: list(CHANNELS))
    value_range: list[float] = Field(default_factory=lambda: [0.0, 255.0])
    crop: CropSpec
    class_names: list[str]
    thresholds: list[float]
    view_thresholds: dict[int, list[float]] = Field(
        default_factory=dict,
        description="Per-class thresholds for scores averaged over 2, 4 or 8 test-time views, by view count, tuned "
        "on the same validation cells as `thresholds` (which holds for one view). A view count without its own "
        "set uses `thresholds`.",
    )
    files: dict[str, str] = Field(description="sha256 of each ONNX file in the folder, by file name")
    grad: GradSpec | None = None
    training: dict[str, Any] = Field(default_factory=dict, description="Training data summary and metrics")
    config: dict[str, Any] = Field(default_factory=dict, description="The full training config")
    created: str | None = None
    pixel_size: float | None = Field(
        default=None,
        gt=0.0,
        le=100.0,
        description="Pixel size (micrometres per pixel) the model was trained at; a request that gives its own "
        "pixel_size is resampled to this scale for segmentation and cropping. None: unknown, no resampling.",
    )

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[str]) -> list[str]:
        if v != list(CHANNELS):
            raise ValueError(f"channels must be {list(CHANNELS)}, got {v}")
        return v

    @field_validator("class_names")
    @classmethod
    def _class_names(cls, v: list[str]) -> list[str]:
        if v != list(CLASS_NAMES):
            raise ValueError("class_names must be the 19 HPA classes in the competition's order")
        return v

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: list[float]) -> list[float]:
        if len(v) != NUM_CLASSES or not all(0.0 <= t <= 1.0 for t in v):
            raise ValueError(f"thresholds must be {NUM_CLASSES} numbers in [0, 1]")
        return v

    @field_validator("view_thresholds")
    @classmethod
    def _view_thresholds(cls, v: dict[int, list[float]]) -> dict[int, list[float]]:
        for n, values in v.items():
            if n not in TTA_VIEWS or n == 1:
                raise ValueError(f"view_thresholds: view counts are 2, 4 or 8, got {n}")
            if len(values) != NUM_CLASSES or not all(0.0 <= t <= 1.0 for t in values):
                raise ValueError(f"view_thresholds[{n}] must be {NUM_CLASSES} numbers in [0, 1]")
        return v

    def thresholds_for(self, views: int) -> list[float]:
        """The per-class thresholds for scores averaged over ``views`` test-time views.

        Parameters
        ----------
        views : int
            Views averaged (1, 2, 4 or 8).

        Returns
        -------
        list of float
            ``view_thresholds[views]`` when the model has that set, else ``thresholds``.
        """
        return self.view_thresholds.get(int(views), self.thresholds)

    @model_validator(mode="after")
    def _files(self) -> Manifest:
        if "model.onnx" not in self.files:
            raise ValueError("files must list model.onnx with its sha256")
        if self.grad is not None and self.grad.file not in self.files:
            raise ValueError(f"grad is declared but files does not list {self.grad.file}")
        if self.crop.size != self.input_size:
            raise ValueError(f"crop.size {self.crop.size} differs from input_size {self.input_size}")
        return self


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks.

    Parameters
    ----------
    path : str or Path
        The file.

    Returns
    -------
    str
        64 hex digits.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(folder: str | Path, *, verify_hashes: bool = True) -> Manifest:
    """Read and validate a model folder's manifest.

    Parameters
    ----------
    folder : str or Path
        The model folder.
    verify_hashes : bool
        Check each listed ONNX file exists and matches its sha256.

    Returns
    -------
    Manifest
        The validated manifest.

    Raises
    ------
    ModelFolderError
        The folder, the manifest or an ONNX file is missing, malformed or does not match.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist or is not a directory")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ModelFolderError(f"{path}: missing; a model folder needs manifest.json (written by `locus export`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{path}: not valid JSON ({exc})") from exc
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors())
        raise ModelFolderError(f"{path}: invalid manifest: {problems}") from exc
    if verify_hashes:
        for name, digest in manifest.files.items():
            fpath = folder / name
            if not fpath.is_file():
                raise ModelFolderError(f"{fpath}: listed in manifest.json but missing")
            actual = sha256_file(fpath)
            if actual != digest:
                raise ModelFolderError(
                    f"{fpath}: sha256 {actual[:12]}... does not match manifest.json ({digest[:12]}...); "
                    "the file was changed or the manifest belongs to another export"
                )
    return manifest
