"""One graph → one `.onnx` file: the dynamo exporter (falling back to TorchScript), quiet, then
`onnx.checker`."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .graphs import GraphJob
from .options import ExportError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters print progress and warn about optional torchvision ops; keep logs clean."""
    noisy = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [log.level for log in noisy]
    for log in noisy:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(noisy, levels, strict=True):
            log.setLevel(level)


def _export_one(job: GraphJob, path: Path, opset: int, exporter: str) -> None:
    kwargs: dict[str, Any] = {
        "input_names": [job.input_name],
        "output_names": list(job.output_names),
        "opset_version": opset,
    }
    with _quiet_exporter():
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(
                job.module,
                (job.example,),
                str(path),
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: batch},),
                verbose=False,
                **kwargs,
            )
        else:
            axes = {name: {0: "batch"} for name in (job.input_name, *job.output_names)}
            torch.onnx.export(
                job.module, (job.example,), str(path), dynamo=False, dynamic_axes=axes, **kwargs
            )


def _check_graph(path: Path, job: GraphJob) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{job.file}: onnx.checker rejected the graph: {exc}") from exc
    model = onnx.load(str(path), load_external_data=False)
    inputs = [v.name for v in model.graph.input]
    outputs = [v.name for v in model.graph.output]
    if inputs != [job.input_name] or outputs != list(job.output_names):
        raise ExportError(
            f"{job.file}: graph has inputs {inputs} and outputs {outputs}, expected "
            f"[{job.input_name}] and {list(job.output_names)}"
        )
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            raise ExportError(f"{job.file}: '{value.name}' has no dynamic batch axis")
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportError(f"{job.file}: weights were written as external data")


def export_with_fallback(job: GraphJob, path: Path, opset: int, exporter: str) -> str:
    """Export and check one graph; returns the exporter that produced it."""
    if exporter in ("auto", "dynamo"):
        try:
            _export_one(job, path, opset, "dynamo")
            _check_graph(path, job)
            return "dynamo"
        except Exception as exc:  # any exporter failure: fall back or report
            if exporter == "dynamo":
                raise ExportError(f"{job.file}: dynamo export failed: {exc}") from exc
            logger.warning(
                "%s: dynamo export failed (%s); using the TorchScript exporter", job.file, exc
            )
            path.unlink(missing_ok=True)
    try:
        _export_one(job, path, opset, "torchscript")
    except Exception as exc:
        raise ExportError(f"{job.file}: ONNX export failed: {exc}") from exc
    _check_graph(path, job)
    return "torchscript"
