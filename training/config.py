"""The training config: every choice of a training run in one object, saved into the manifest.

Load it from JSON (``locus train --config cfg.json``) and override common fields
on the command line. ``TrainConfig.model_dump()`` is what the manifest stores
under ``config``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from locus.service.crop import CropRule

__all__ = ["AugmentConfig", "CropConfig", "TrainConfig", "load_config"]


class CropConfig(BaseModel):
    """Crop rule settings (the size is ``TrainConfig.input_size``); see :mod:`locus.service.crop`."""

    model_config = ConfigDict(extra="forbid")

    padding: float = Field(
        default=0.1, ge=0.0, le=2.0, description="Context on each side, fraction of the longer box side"
    )
    mask_other_cells: bool = Field(default=True, description="Zero the pixels of neighbouring cells")
    min_side: int = Field(default=16, ge=1, description="Smallest window side in full-resolution pixels")


class AugmentConfig(BaseModel):
    """Training-time augmentation (validation crops are never augmented)."""

    model_config = ConfigDict(extra="forbid")

    flips: bool = Field(default=True, description="Random horizontal and vertical flips")
    rotate90: bool = Field(default=True, description="Random 90-degree rotations (transpose)")
    intensity: float = Field(default=0.2, ge=0.0, lt=1.0, description="Per-channel scale in [1-x, 1+x]; 0 disables")
    gamma: float = Field(default=0.2, ge=0.0, lt=1.0, description="Per-channel gamma in [1/(1+x), 1+x]; 0 disables")


class TrainConfig(BaseModel):
    """Every choice of a training run.

    Attributes are documented by their ``Field`` descriptions; see ``configs/*.json``
    for examples.
    """

    model_config = ConfigDict(extra="forbid")

    # data
    train_dirs: list[str] = Field(default_factory=list, description="Dataset folders (Kaggle layout / HPA-sim)")
    label_source: Literal["image", "cell"] = Field(
        default="image",
        description="'image': each cell inherits its image's labels (weak labels, the Kaggle setting); "
        "'cell': per-cell labels from truth/cells.csv (HPA-sim), falling back to 'image' where absent",
    )
    segmenter: str = Field(default="classical", description="Segmentation backend when truth/ masks are absent")
    use_truth_masks: bool = Field(default=True, description="Use truth/{ID}_cells.png when present")
    max_cells_per_field: int | None = Field(default=None, ge=1, description="Cap on cells taken per field (random)")
    min_cell_area: int = Field(default=0, ge=0, description="Drop cells with fewer pixels than this")
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0, description="Share of images held out for validation")
    seed: int = 0
    cache: bool = Field(default=True, description="Cache crops as .npy in cache_dir for fast repeat runs")
    cache_dir: str | None = Field(default=None, description="Default: <out>/cache")
    cache_dtype: Literal["uint8", "float32"] = Field(
        default="uint8", description="uint8: 4x smaller, rounds crop values (<= 0.5 of 255); float32: exact"
    )
    workers: int = Field(default=2, ge=1, description="Processes for crop extraction")

    # model
    architecture: str = Field(default="b0", description="EfficientNet variant b0..b7")
    input_size: int = Field(default=128, ge=32, le=1024, description="Crop side in pixels (model input)")
    crop: CropConfig = Field(default_factory=CropConfig)
    dropout: float = Field(default=0.3, ge=0.0, lt=1.0)
    imagenet_weights: str | None = Field(default=None, description="Local 3-channel EfficientNet notop weights file")

    # optimisation
    batch_size: int = Field(default=32, ge=1)
    epochs: int = Field(default=20, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0.0)
    schedule: Literal["cosine", "plateau", "constant"] = "cosine"
    warmup_epochs: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW decay; 0 = plain Adam")
    patience: int = Field(default=5, ge=1, description="Early stopping patience (epochs without val loss gain)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    jit_compile: bool = Field(default=False, description="XLA-compile the train step (slow start on CPU)")
    mixed_precision: bool = Field(
        default=False,
        description="Compute in float16 with float32 weights (Keras mixed_float16; a GPU with tensor cores); "
        "the exported model is rebuilt in float32",
    )
    distribute: Literal["none", "mirrored"] = Field(
        default="none",
        description="mirrored: tf.distribute.MirroredStrategy over every visible GPU (batch_size is the global "
        "batch, split across replicas; scale it and the learning rate with the number of GPUs)",
    )
    max_steps_per_epoch: int | None = Field(default=None, ge=1, description="Cap steps per epoch (quick runs)")

    # output
    out: str = Field(default="runs/locus", description="Run folder: checkpoints, logs, plots, model folder")
    name: str = Field(default="locus", description="Model name in the manifest")
    version: str = Field(default="0.1.0", description="Model version in the manifest")
    export: bool = Field(default=True, description="Export the model folder (<out>/model) after training")
    with_grad: bool = Field(default=True, description="Also export grad.onnx when grad_export is available")
    grad_batch: int = Field(default=16, ge=1, description="Fixed batch of grad.onnx")
    threshold_rule: Literal["one-se", "argmax"] = Field(
        default="one-se",
        description="How per-class thresholds are tuned for F1 on the validation cells: one-se, the middle of the "
        "thresholds within one bootstrap standard error of the best F1 (stable); argmax, the best F1's own",
    )
    view_thresholds: bool = Field(
        default=True,
        description="Also tune per-class thresholds for scores averaged over 2, 4 and 8 test-time views on the "
        "validation cells (one more pass over them in 8 views), stored in the manifest's view_thresholds",
    )
    plots: bool = True
    verbose: int = Field(default=1, ge=0, le=2, description="Keras progress: 0 silent, 1 bar, 2 one line per epoch")

    @field_validator("architecture")
    @classmethod
    def _arch(cls, v: str) -> str:
        key = v.strip().lower().removeprefix("efficientnet").removeprefix("-")
        if key not in {f"b{i}" for i in range(8)}:
            raise ValueError(f"architecture must be b0..b7, got {v!r}")
        return key

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.imagenet_weights is not None and not Path(self.imagenet_weights).is_file():
            raise ValueError(f"imagenet_weights {self.imagenet_weights} does not exist (Locus never downloads weights)")
        return self

    def crop_rule(self) -> CropRule:
        """The executable crop rule of this config.

        Returns
        -------
        CropRule
            Size ``input_size`` with this config's padding, masking and minimum side.
        """
        return CropRule(
            size=self.input_size,
            padding=self.crop.padding,
            mask_other_cells=self.crop.mask_other_cells,
            min_side=self.crop.min_side,
        )

    def resolved_cache_dir(self) -> Path:
        """The crop cache folder (``cache_dir`` or ``<out>/cache``)."""
        return Path(self.cache_dir) if self.cache_dir else Path(self.out) / "cache"

    def save(self, path: str | Path) -> None:
        """Write the config as JSON.

        Parameters
        ----------
        path : str or Path
            Output file.
        """
        Path(path).write_text(json.dumps(self.model_dump(), indent=2) + "\n", encoding="utf-8")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load a config from JSON and apply overrides.

    Parameters
    ----------
    path : str or Path, optional
        JSON file; None starts from the defaults.
    overrides : dict, optional
        Field values that replace the file's (None values are ignored); nested
        fields with dotted keys, e.g. ``{"crop.padding": 0.2}``.

    Returns
    -------
    TrainConfig
        The validated config.

    Raises
    ------
    ValueError
        The file is not valid JSON or a value is invalid (the message names it).
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a JSON object")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return TrainConfig.model_validate(data)
