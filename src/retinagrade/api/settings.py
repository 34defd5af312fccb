"""Service settings, read once from ``RETINAGRADE_*`` environment variables (see docs/api.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from retinagrade.cpus import available_cpus
from retinagrade.preprocessing.decode import DEFAULT_MAX_DECODED_BYTES


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything the service can be told. Defaults suit one small CPU machine."""

    model_config = SettingsConfigDict(env_prefix="RETINAGRADE_", extra="ignore", frozen=True)

    model: Path | None = Field(default=None, description="Model spec (.json) or ONNX file; default: the shipped model.")
    threads: int | None = Field(
        default=None, ge=1, description="ONNX Runtime intra-op threads; default min(4, usable CPUs)."
    )
    prepare_workers: int = Field(
        # The CPUs this process may use (affinity, cgroup quota), not the host's: see retinagrade.cpus.
        default_factory=available_cpus,
        ge=1,
        description="Threads decoding and preprocessing uploads; default the usable CPUs.",
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
        description="Most images (read, ready to grade) admitted at once; beyond it requests get 503.",
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0.0, description="Longest a request body may take to arrive; slower ones get 408."
    )
    body_min_bytes_per_s: int = Field(
        default=16 * 1024,
        ge=1,
        description="Slowest average rate a body may arrive at, after body_grace_s; slower ones get 408.",
    )
    body_grace_s: float = Field(
        default=5.0, ge=0.0, description="Head start before body_min_bytes_per_s applies (connection set-up)."
    )
    max_buffered_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Most request-body bytes held at once across all requests; beyond it 503. "
        "Default: one largest batch request.",
    )
    max_decoded_bytes: int = Field(
        default=DEFAULT_MAX_DECODED_BYTES,
        ge=1024 * 1024,
        description="Most memory decoding one image may take (its pixels, decoded); larger images get 413.",
    )
    max_decoding_bytes: int | None = Field(
        default=None,
        ge=1024 * 1024,
        description="Most memory all decodes in progress may take together; others wait. Default: twice "
        "max_decoded_bytes.",
    )
    shutdown_timeout_s: int = Field(
        default=20, ge=1, description="Longest a shutdown waits for requests in flight before closing them."
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
    audit_min_free_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        description="Free disk space below which the audit store counts as failing (not ready, grading 503).",
    )
    audit_check_interval_s: float = Field(
        default=5.0, ge=0.0, description="How long a readiness check of the audit store is reused."
    )
    docs_enabled: bool = Field(
        default=True, description="Serve /docs, /redoc and /openapi.json (assets served locally, no CDN)."
    )
    metrics_port: int = Field(
        default=9464,
        ge=1,
        le=65535,
        description="Port of the separate /metrics listener (`retinagrade serve`); /metrics is never on the API port.",
    )
    metrics_host: str | None = Field(
        default=None, description="Address of the /metrics listener; default: the API's address."
    )
    site_profiles: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated site profiles (retinagrade calibrate); empty: the model's global operating point.",
    )
    operating_point: str | None = Field(
        default=None,
        description="Named operating point for requests that name none (X-Retinagrade-Operating-Point); "
        "default: the model's default (`/v1/model` lists the points). A site profile's own point wins over it.",
    )
    default_site: str | None = Field(
        default=None, description="Site for requests that name none (X-Retinagrade-Site); needed with several profiles."
    )
    drift_window: int = Field(default=500, ge=10, description="Answers per site in the drift watch's rolling window.")
    drift_min_images: int = Field(
        default=100, ge=1, description="Images a signal needs in the window before its drift PSI is published."
    )
    heatmap_opacity: float = Field(default=0.45, ge=0.0, le=1.0, description="Opacity of the heatmap overlay.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")

    @field_validator("api_keys", "cors_origins", "site_profiles", mode="before")
    @classmethod
    def _comma_separated(cls, value: object, info: ValidationInfo) -> object:
        items = _split_commas(value)
        # Empty API keys mean no authentication, on purpose. Only commas and spaces is a mistake (a template left
        # unfilled, a secret that expanded to nothing) that would turn authentication off without a word.
        if info.field_name == "api_keys" and isinstance(value, str) and value and not items:
            raise ValueError("holds only commas or spaces, no key: give the keys, or leave it empty to turn keys off")
        return items

    @model_validator(mode="after")
    def _budgets_fit_one_request(self) -> Settings:
        # A budget smaller than one allowed request would refuse that request forever with 503.
        if self.max_buffered_bytes is not None and self.max_buffered_bytes < self.max_batch_request_bytes:
            raise ValueError(
                f"max_buffered_bytes ({self.max_buffered_bytes:,}) is smaller than one batch request "
                f"({self.max_batch_request_bytes:,} = max_image_bytes x max_batch_images + 256 KiB)"
            )
        if self.max_decoding_bytes is not None and self.max_decoding_bytes < self.max_decoded_bytes:
            raise ValueError("max_decoding_bytes is smaller than max_decoded_bytes")
        return self

    @property
    def buffer_budget_bytes(self) -> int:
        """Most request-body bytes held at once, across requests."""
        return self.max_buffered_bytes or self.max_batch_request_bytes

    @property
    def decode_budget_bytes(self) -> int:
        """Most memory all decodes in progress may take together."""
        return self.max_decoding_bytes or 2 * self.max_decoded_bytes

    @property
    def max_request_bytes(self) -> int:
        """Largest body of a single-image request: one image plus room for multipart headers."""
        return self.max_image_bytes + 64 * 1024

    @property
    def max_batch_request_bytes(self) -> int:
        """Largest body of a batch request."""
        return self.max_image_bytes * self.max_batch_images + 256 * 1024
