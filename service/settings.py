"""Service settings: the pipeline's settings plus the HTTP server's own, environment variables ``LOCUS_*``.

Every setting is documented in the README's "Configuration" table; a list
setting is given as JSON (``LOCUS_PROVIDERS='["CPUExecutionProvider"]'``) or,
for strings, comma-separated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from locus.service.config import DEFAULT_MODEL_DIR, REPO_MODELS, PipelineSettings, split_list

__all__ = ["Settings", "DEFAULT_MODEL_DIR", "REPO_MODELS"]


class Settings(PipelineSettings):
    """All service settings; each field reads ``LOCUS_<FIELD NAME>`` from the environment."""

    # Limits
    max_upload_bytes: int = Field(128 * 1024 * 1024, ge=1, description="Largest upload per channel, in bytes")
    max_request_bytes: int = Field(400 * 1024 * 1024, ge=1, description="Largest request body, in bytes")
    max_concurrent: int = Field(0, ge=0, description="Requests classified at once; 0 = number of cores")
    max_queue: int = Field(8, ge=0, description="Requests waiting beyond max_concurrent before 503")
    request_timeout_s: float = Field(300.0, gt=0, description="Per-request time limit for classification")
    body_timeout_s: float = Field(
        120.0, gt=0, description="Longest time to receive a request body (slow uploads get 408)"
    )

    max_header_bytes: int = Field(
        64 * 1024, ge=4096, description="Largest request line + headers; more is cut off by the server with 400"
    )
    max_connections: int = Field(
        256, ge=1, description="Most open connections; beyond it the server answers 503 at once"
    )

    # Security and operations
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Accepted API keys (bearer)")
    api_key_file: Path | None = Field(None, description="File with one API key per line")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Allowed CORS origins")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = Field(True, description="Structured JSON log lines (false: human-readable)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return split_list(value)

    def resolved_concurrency(self) -> int:
        """Requests classified at once."""
        return self.max_concurrent or self.cores()

    def all_api_keys(self) -> list[str]:
        """API keys from ``api_keys`` and ``api_key_file`` (blank lines and ``#`` comments ignored)."""
        keys = [k for k in self.api_keys if k]
        if self.api_key_file is not None:
            for line in Path(self.api_key_file).read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return keys
