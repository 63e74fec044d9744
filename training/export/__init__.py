"""Checkpoint → bundle: each exit as a chained ONNX segment, parity- and MAC-checked.

By concern: `checkpoint` (load, validate, rebuild the network; the plain baseline run),
`graphs` (the torch modules each file is traced from), `onnx_writer` (exporter + checker),
`checks` (onnxruntime parity and MAC counts), `bundle` (assembly, manifest, first thresholds),
`options` (what an export takes and returns). The first thresholds' heuristic is
`thresholds.greedy`. `earlyexit-export` is `training.export_cli`.
"""

from .bundle import export_bundle, export_checkpoint
from .checkpoint import (
    build_model,
    load_for_export,
    load_plain_baseline,
    validate_checkpoint,
)
from .options import CheckpointError, ExportError, ExportOptions, ExportResult, FileCheck

__all__ = [
    "CheckpointError",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "FileCheck",
    "build_model",
    "export_bundle",
    "export_checkpoint",
    "load_for_export",
    "load_plain_baseline",
    "validate_checkpoint",
]
