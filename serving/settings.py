"""Server settings: one pydantic-settings class read from `EARLYEXIT_*` environment variables.

A bad value fails at start-up (pydantic ValidationError), never on the first request.
`earlyexit-serve` flags override the environment by passing keyword arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from serving.providers import normalize_providers

# The bundle shipped inside the package (if any), found from the package location so an
# installed wheel and a source checkout behave the same.
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "default_bundle"

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class Settings(BaseSettings):
    """Everything the server reads from its environment (prefix `EARLYEXIT_`)."""

    model_config = SettingsConfigDict(
        env_prefix="EARLYEXIT_",
        frozen=True,
        extra="ignore",
        validate_default=True,
        # `EARLYEXIT_X=` (set but empty, as compose writes unset variables) means the default.
        env_ignore_empty=True,
    )

    bundle: Path = Field(DEFAULT_BUNDLE_DIR, description="bundle directory to serve")
    # Serve the bundle's plain single graph (baseline.onnx when the manifest names one, else
    # full_model.onnx) instead of the early-exit chain: the peer HTTP comparisons are made
    # against, served the same way.
    full_model: bool = False
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=0, le=65535)
    # Tried in order; without strict_providers the runtime falls back to the next one.
    providers: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["cuda", "cpu"])
    strict_providers: bool = False
    intra_op_threads: int = Field(0, ge=0, le=1024, description="0 = onnxruntime default")
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_batch_wait_ms: float = Field(2.0, ge=0.0, le=10_000.0)
    # "adaptive": a batch waits only while other requests are being received or decoded (no
    # wait at concurrency 1); "fixed": always up to max_batch_wait_ms, like Triton's queue delay.
    batch_wait: Literal["adaptive", "fixed"] = "adaptive"
    # A lone image runs on the event loop, skipping two thread hops, when its batch-1 run time
    # is measured at or below this; 0 = always on the inference thread.
    inline_max_ms: float = Field(1.0, ge=0.0, le=100.0)
    # Run every batch size 1, 2, 4, … max_batch_size once before /readyz says ready, so the
    # first requests are not slow and memory is allocated before traffic, not during it.
    warmup: bool = True
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    # 4096² is far above what a 32×32 classifier needs; the cap is Pillow's own bomb limit
    # (PIL.Image.MAX_IMAGE_PIXELS), so our check always speaks first.
    max_image_pixels: int = Field(4096 * 4096, ge=1, le=89_478_485)
    max_batch_files: int = Field(64, ge=1, le=4096, description="images per /classify/batch")
    queue_size: int = Field(256, ge=1, le=1_000_000)
    # Images too big or too odd to decode on the event loop go to these threads, and at most
    # this much memory (estimated from each header before decoding) is spent on them at once.
    # The default takes one image at the pixel limit in any format.
    decode_workers: int = Field(2, ge=1, le=64)
    decode_memory_mb: int = Field(512, ge=16, le=1_048_576)
    # Connection guard (serving.connections): open connections (the oldest idle one is closed
    # to admit a new one), time to send a request's headers, longest pause inside a body, and
    # the size of the request line plus headers (431 above).
    max_connections: int = Field(2048, ge=8, le=1_000_000)
    header_timeout_s: float = Field(10.0, gt=0.0, le=3600.0)
    body_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    keep_alive_s: int = Field(75, ge=1, le=3600)
    # Where server state lives when the bundle itself must stay read-only: the packaged default
    # bundle is served from a copy here, so admin updates never rewrite installed files.
    state_dir: Path | None = None
    admin_token: SecretStr | None = None
    # Online retuning (serving.shadow): the fraction of answered rows re-run through every exit
    # off the request path (0 = off, the default: nothing changes for existing deployments),
    # the rows and bytes the persistent sample may hold, the background queue (rows beyond it
    # are dropped, never waited for), the rows the live signals look at, and the estimated
    # accuracy drop (points vs full depth) above which the alert fires, at confidence Z.
    shadow_rate: float = Field(0.0, ge=0.0, le=1.0)
    shadow_capacity: int = Field(20_000, ge=1, le=10_000_000)
    shadow_max_bytes: int = Field(64 * 1024 * 1024, ge=4096, le=1 << 40)
    shadow_queue_size: int = Field(256, ge=1, le=1_000_000)
    shadow_window: int = Field(5000, ge=1, le=10_000_000)
    shadow_drop_budget: float = Field(1.0, ge=0.0, le=100.0)
    shadow_confidence: float = Field(1.645, ge=0.0, le=10.0)
    # Seconds between automatic guarded retunes on the live sample (0 = only on request).
    retune_interval: float = Field(0.0, ge=0.0, le=7 * 24 * 3600.0)
    log_level: str = "info"
    access_log: bool = True
    shutdown_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)

    @field_validator("providers", mode="before")
    @classmethod
    def _providers(cls, value: Any) -> list[str]:
        providers = normalize_providers(value)
        if not providers:
            raise ValueError("name at least one execution provider, e.g. cpu")
        return providers

    @field_validator("admin_token", mode="before")
    @classmethod
    def _stripped_token(cls, value: Any) -> Any:
        # Clients send the token without the spaces or newline an env file or `$(cat file)`
        # leaves around it, and the header value is stripped: a padded token could never match.
        # EARLYEXIT_ADMIN_TOKEN="" must mean "no admin endpoints", not "empty password".
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str):
            value = value.strip()
            return value or None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: Any) -> str:
        level = str(value).strip().lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        return level

    @model_validator(mode="after")
    def _retune_needs_a_sample(self) -> Settings:
        if self.retune_interval > 0 and self.shadow_rate <= 0:
            raise ValueError(
                "EARLYEXIT_RETUNE_INTERVAL needs a live sample: set EARLYEXIT_SHADOW_RATE above 0"
            )
        if 0 < self.retune_interval < 1:
            raise ValueError("EARLYEXIT_RETUNE_INTERVAL must be 0 (off) or at least 1 second")
        return self

    @property
    def max_batch_wait_s(self) -> float:
        return self.max_batch_wait_ms / 1000.0

    @property
    def inline_max_s(self) -> float:
        return self.inline_max_ms / 1000.0


def settings_error_line(exc: Exception) -> str:
    """One human line for a pydantic ValidationError (CLI prints it and exits 2)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for err in errors():
            field = ".".join(str(p) for p in err.get("loc", ())) or "settings"
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            parts.append(f"EARLYEXIT_{field.upper()}: {msg}")
        if parts:
            return "invalid settings: " + "; ".join(parts)
    return f"invalid settings: {exc}"
