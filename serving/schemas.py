"""Request and response bodies of the HTTP API (see CONTRACT.md, section "HTTP")."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelRef(BaseModel):
    name: str
    version: str


class ExitAnswer(BaseModel):
    """What one exit says about the image (full mode)."""

    exit: int = Field(description="exit number, 1..K")
    label: str
    class_index: int
    confidence: float = Field(description="max probability at this exit")
    threshold: float = Field(description="the exit accepts when confidence > threshold")
    accepted: bool


class ClassScore(BaseModel):
    label: str
    class_index: int
    confidence: float


class ClassifyResponse(BaseModel):
    label: str
    class_index: int
    confidence: float
    exit: int | Literal["fallback", "full"] = Field(
        description="exit that answered, 'fallback', or 'full' when the server serves the "
        "plain model (--full-model)"
    )
    num_exits: int
    latency_ms: float
    model: ModelRef
    exits: list[ExitAnswer] | None = Field(
        None, description="every exit, with ?full=true (empty for the plain model)"
    )
    top_k: list[ClassScore] | None = Field(None, description="best classes, with ?top_k=N")


class BatchClassifyResponse(BaseModel):
    results: list[ClassifyResponse]


class InputSummary(BaseModel):
    shape: list[int]
    mean: list[float]
    std: list[float]
    color_mode: str


class SegmentSummary(BaseModel):
    index: int
    file: str
    macs: int
    params: int


class ServedGraph(BaseModel):
    """The plain single graph a `--full-model` server answers with."""

    file: str
    sha256: str
    source: Literal["baseline", "full_model"] = Field(
        description="the manifest's baseline block, or its full_model"
    )
    macs: int | None


class ModelResponse(BaseModel):
    name: str
    version: str
    format: str
    labels: list[str]
    num_classes: int
    num_exits: int
    input: InputSummary
    fallback: str
    segments: list[SegmentSummary]
    full_model_macs: int
    mode: Literal["early_exit", "full_model"] = Field(
        description="early_exit: the chain of segments; full_model: the plain single graph"
    )
    served_graph: ServedGraph | None = Field(
        None, description="the graph served in full_model mode (null in early_exit mode)"
    )
    thresholds: list[float] = Field(description="in force now; empty in full_model mode")
    tuned: dict[str, Any]
    providers: list[str]
    provenance: dict[str, Any]


class ThresholdsUpdate(BaseModel):
    """Body of `PUT /v1/thresholds`; values are checked against the bundle's exit count."""

    model_config = ConfigDict(extra="forbid")

    thresholds: list[Any] = Field(description="one value in [0, 1] per exit; 1.0 disables it")
    tuned: dict[str, Any] | None = Field(None, description="provenance stored in thresholds.json")


class ThresholdsResponse(BaseModel):
    thresholds: list[float]
    previous: list[float]
    tuned: dict[str, Any]
    persisted: bool
    path: str | None = None


class ErrorResponse(BaseModel):
    detail: Any


class HealthResponse(BaseModel):
    status: str
    detail: str | None = None
