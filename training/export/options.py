"""What an export takes (`ExportOptions`) and returns (`ExportResult`), and how it fails."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.bundle import (
    Manifest,
    Thresholds,
)

from ..models import MultiExitNetwork

EXPORTERS = ("auto", "dynamo", "torchscript")
FULL_MODEL_FILE = "full_model.onnx"
BASELINE_FILE = "baseline.onnx"


class CheckpointError(ValueError):
    """The checkpoint (or the output path) is unusable as given: bad user input, exit code 2."""


class ExportError(RuntimeError):
    """An exported file failed verification (checker, parity or MAC count): exit code 1."""


@dataclass(frozen=True)
class ExportOptions:
    name: str | None = None  # default: "<arch>-<dataset>"
    version: str | None = None  # default: export time, UTC, YYYYmmddHHMMSS
    opset: int = 18
    fallback: str = "ensemble"
    stage_files: bool = True
    force: bool = False
    exporter: str = "auto"  # dynamo, falling back to the TorchScript exporter if it fails
    data_dir: str | None = None  # real images for parity + calibration thresholds
    dataset: str | None = None  # default: the checkpoint's training dataset
    calibration_split: str = "val"
    calibration_limit: int | None = None  # first N rows of the split (None = all)
    parity_atol: float = 1e-4
    macs_rtol: float = 0.01
    progress: bool = True
    # The plain model early exit is compared with: a run directory of `earlyexit-train --loss
    # baseline` (its best.pt, test_metrics.json); recorded as the manifest's `baseline` block
    # and exported as baseline.onnx when it is not this bundle's own backbone.
    baseline_run: str | None = None
    baseline_recipe: str | None = None  # default: the run directory's name


@dataclass(frozen=True)
class PlainBaseline:
    """A loaded plain model for the manifest's `baseline` block."""

    model: MultiExitNetwork | None  # None: this bundle's full_model is the plain model
    recipe: str
    accuracy: dict[str, float]


@dataclass(frozen=True)
class FileCheck:
    """What verification saw for one exported file."""

    file: str
    probs_max_abs_diff: float | None  # None for stage files (features only)
    features_max_rel_diff: float | None
    onnx_macs: int
    torch_macs: int


@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    manifest: Manifest
    thresholds: Thresholds
    checks: list[FileCheck]
    exporter: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "name": self.manifest.name,
            "version": self.manifest.version,
            "num_exits": self.manifest.num_exits,
            "segment_macs": self.manifest.segment_macs(),
            "full_model_macs": self.manifest.full_model.macs,
            "thresholds": self.thresholds.to_dict(),
            "checks": [c.__dict__ for c in self.checks],
            "exporter": self.exporter,
            "seconds": round(self.seconds, 3),
        }
