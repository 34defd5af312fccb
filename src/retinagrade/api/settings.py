"""Service settings, read once from ``RETINAGRADE_*`` environment variables (see docs/api.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything the service can be told. Defaults suit one small CPU machine."""

    model_config = SettingsConfigDict(env_prefix="RETINAGRADE_", extra="ignore", frozen=True)

    model: Path | None = Field(default=None, description="Model spec (.json) or ONNX file; default: the shipped model.")
    threads: int | None = Field(default=None, ge=1, description="ONNX Runtime intra-op threads; default min(4, CPUs).")
    prepare_workers: int = Field(
        default_factory=lambda: max(1, os.cpu_count() or 1),
        ge=1,
        description="Threads decoding and preprocessing uploads.",
    )
    # Off by default: on 2 CPU cores a batch of 8 costs as much per image as 8 single calls and the HTTP
    # benchmark measured no gain (benchmarks/bench_service.py); turn it on where batches are cheaper.
    batching: bool = Field(default=False, description="Coalesce concurrent requests into one model call.")
    max_batch_size: int = Field(default=8, ge=1, le=64, description="Most images in one model call.")
    max_batch_wait_ms: float = Field(
        default=5.0, ge=0.0, le=1000.0, description="Longest a request waits for others to join its batch."
    )
    max_queue: int = Field(
        default=32,
        ge=1,
        description="Most images admitted at once; beyond it requests get 503 with Retry-After.",
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After seconds sent with a 503.")
    max_image_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, description="Largest accepted image file.")
    max_pixels: int = Field(default=64_000_000, ge=10_000, description="Largest accepted image in pixels (header).")
    max_batch_images: int = Field(default=16, ge=1, le=256, description="Most images in one batch request.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated API keys; empty: no authentication."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated origins allowed by CORS; empty: CORS off."
    )
    audit_enabled: bool = Field(default=True, description="Write an audit record per graded image.")
    audit_path: Path = Field(default=Path("var/retinagrade-audit.sqlite3"), description="SQLite audit store.")
    heatmap_opacity: float = Field(default=0.45, ge=0.0, le=1.0, description="Opacity of the heatmap overlay.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @property
    def max_request_bytes(self) -> int:
        """Largest body of a single-image request: one image plus room for multipart headers."""
        return self.max_image_bytes + 64 * 1024

    @property
    def max_batch_request_bytes(self) -> int:
        """Largest body of a batch request."""
        return self.max_image_bytes * self.max_batch_images + 256 * 1024
