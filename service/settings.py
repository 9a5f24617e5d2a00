"""Service settings: one pydantic-settings class, environment variables ``LOCUS_*``.

Every setting is documented in the README's "Configuration" table; a list
setting is given as JSON (``LOCUS_PROVIDERS='["CPUExecutionProvider"]'``) or,
for strings, comma-separated.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "DEFAULT_MODEL_DIR", "REPO_MODELS"]

REPO_MODELS = Path(__file__).resolve().parents[1] / "models"
DEFAULT_MODEL_DIR = REPO_MODELS / "locus-sim-b0"


def _split(value: object) -> object:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """All service settings; each field reads ``LOCUS_<FIELD NAME>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix="LOCUS_", env_file=None, extra="ignore", protected_namespaces=())

    # Model and segmentation
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Model folder (model.onnx, manifest.json, ...)")
    segmenter: str = Field("classical", description="Segmentation backend: classical, hpa or hpacellseg")
    segmenter_fallback: bool = Field(
        False, description="When the chosen segmenter cannot start (e.g. missing HPA weights), fall back to classical"
    )
    hpa_nuclei_model: Path | None = Field(None, description="ONNX file of the HPA nuclei network (hpa backend)")
    hpa_cell_model: Path | None = Field(None, description="ONNX file of the HPA cell network (hpa backend)")

    # ONNX Runtime
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="ONNX Runtime execution providers in order of preference",
    )
    require_gpu: bool = Field(False, description="Refuse to start when CUDA was asked for but is not obtained")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = number of cores (max 8)")
    max_batch: int = Field(64, ge=1, le=4096, description="Largest batch of cells sent to the model at once")
    max_wait_ms: float = Field(
        2.0, ge=0.0, le=1000.0, description="How long the batcher waits for cells of other requests to join a batch"
    )
    workers: int = Field(0, ge=0, description="Threads running CPU-heavy stages; 0 = number of cores")

    # Attributions (integrated gradients)
    ig_steps: int = Field(64, ge=2, description="Default number of integrated-gradient steps")
    ig_max_steps: int = Field(512, ge=2, description="Largest step count a request may ask for")
    ig_max_cells: int = Field(64, ge=1, description="Largest number of cells with attributions in one request")

    # Limits
    max_image_pixels: int = Field(
        6144 * 6144, ge=1, description="Largest height x width of a channel, checked from the header before decoding"
    )
    max_upload_bytes: int = Field(128 * 1024 * 1024, ge=1, description="Largest upload per channel, in bytes")
    max_request_bytes: int = Field(400 * 1024 * 1024, ge=1, description="Largest request body, in bytes")
    max_concurrent: int = Field(0, ge=0, description="Requests classified at once; 0 = number of cores")
    max_queue: int = Field(8, ge=0, description="Requests waiting beyond max_concurrent before 503")
    request_timeout_s: float = Field(300.0, gt=0, description="Per-request time limit for classification")
    body_timeout_s: float = Field(
        120.0, gt=0, description="Longest time to receive a request body (slow uploads get 408)"
    )

    # Security and operations
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Accepted API keys (bearer)")
    api_key_file: Path | None = Field(None, description="File with one API key per line")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Allowed CORS origins")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = Field(True, description="Structured JSON log lines (false: human-readable)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    @field_validator("providers", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split(value)

    def cores(self) -> int:
        """Number of usable CPU cores."""
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)

    def resolved_threads(self) -> int:
        """ONNX Runtime intra-op threads actually used."""
        return self.intra_op_threads or min(self.cores(), 8)

    def resolved_workers(self) -> int:
        """Threads for CPU-heavy stages actually used."""
        return self.workers or self.cores()

    def resolved_concurrency(self) -> int:
        """Requests classified at once."""
        return self.max_concurrent or self.cores()

    def segmenter_options(self, name: str | None = None) -> dict:
        """Constructor options of a segmentation backend, from these settings.

        Parameters
        ----------
        name : str, optional
            Backend name; default :attr:`segmenter`.

        Returns
        -------
        dict
            Keyword options for :func:`service.segmentation.make_segmenter` (empty for ``classical``).
        """
        if (name or self.segmenter) != "hpa":
            return {}
        return {
            "nuclei_model": self.hpa_nuclei_model,
            "cell_model": self.hpa_cell_model,
            "providers": self.providers,
            "intra_op_threads": self.resolved_threads(),
            "require_gpu": self.require_gpu,
        }

    def all_api_keys(self) -> list[str]:
        """API keys from ``api_keys`` and ``api_key_file`` (blank lines and ``#`` comments ignored)."""
        keys = [k for k in self.api_keys if k]
        if self.api_key_file is not None:
            for line in Path(self.api_key_file).read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return keys
