"""Checkpoint → bundle: each exit as a chained ONNX segment, parity- and MAC-checked.

Segment k = backbone stage k (the stem joins stage 1) + exit head k. Its input is the image
(`input`, k = 1) or segment k−1's feature map (`features_{k-1}`); its outputs are `features_k`
(not for the last segment) and `probs_k` (softmax, float32); the batch axis is dynamic. Beside
each segment but the last, `stage_k.onnx` holds the stage without its head (features only), so
a runtime can skip a disabled exit's head. `full_model.onnx` is the plain single-graph backbone
(`input` → `probs`), the model users would deploy otherwise.

Every file must pass `onnx.checker`, match torch within `parity_atol` in onnxruntime (random
and, with data, real images), and count the same MACs on the ONNX graph as torch counts for it
(within `macs_rtol`), or the export fails. The bundle is assembled in a temporary sibling
directory and renamed into place, so a crash never leaves a half-written bundle.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.atomic import atomic_write_json
from core.bundle import (
    BUNDLE_FORMAT,
    MANIFEST_FILE,
    BaselineSpec,
    FullModelSpec,
    InputSpec,
    Manifest,
    SegmentSpec,
    Thresholds,
    parse_manifest,
    sha256_file,
    write_thresholds,
)
from core.decision import FALLBACKS
from core.normalize import normalize_images
from core.paths import portable_path

from .costs import ModelCosts, measure_costs
from .models import MultiExitNetwork, create_model
from .onnx_macs import count_onnx_macs, macs_by_op, relative_difference

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("model", "config", "num_classes", "classes", "input_shape", "mean", "std")
REQUIRED_CONFIG = ("arch", "exits")
EXPORTERS = ("auto", "dynamo", "torchscript")
FULL_MODEL_FILE = "full_model.onnx"
BASELINE_FILE = "baseline.onnx"
THRESHOLD_GRID = tuple(round(0.01 * i, 2) for i in range(100))  # candidates for export-greedy


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


# ----------------------------------------------------------------------------- checkpoint


def load_for_export(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a training checkpoint on CPU and check it holds what export needs."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"checkpoint not found: {source}")
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load raises many types on a corrupt or foreign file
        raise CheckpointError(f"{source}: not a readable torch checkpoint ({exc})") from exc
    validate_checkpoint(checkpoint, str(source))
    return checkpoint


def validate_checkpoint(checkpoint: Any, where: str = "checkpoint") -> None:
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{where}: expected a dict checkpoint, got {type(checkpoint).__name__}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{where}: missing key(s) {', '.join(missing)}")
    config = checkpoint["config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: 'config' must be a dict")
    missing = [key for key in REQUIRED_CONFIG if key not in config]
    if missing:
        raise CheckpointError(f"{where}: 'config' lacks {', '.join(missing)}")
    shape = checkpoint["input_shape"]
    if (
        not isinstance(shape, list | tuple)
        or len(shape) != 3
        or not all(isinstance(v, int) and v > 0 for v in shape)
    ):
        raise CheckpointError(f"{where}: 'input_shape' must be [C, H, W], got {shape!r}")
    classes = checkpoint["classes"]
    if not isinstance(classes, list | tuple) or len(classes) != checkpoint["num_classes"]:
        raise CheckpointError(f"{where}: 'classes' must list num_classes names")
    for key in ("mean", "std"):
        if len(checkpoint[key]) != shape[0]:
            raise CheckpointError(f"{where}: '{key}' must have {shape[0]} entries")


def build_model(checkpoint: dict[str, Any]) -> MultiExitNetwork:
    """Rebuild the network from the checkpoint's config and load its weights (eval mode)."""
    validate_checkpoint(checkpoint)
    config = checkpoint["config"]
    kwargs: dict[str, Any] = {"in_chans": int(checkpoint["input_shape"][0])}
    for key in ("width", "stem", "head", "act"):
        if config.get(key) is not None:
            kwargs[key] = config[key]
    if config.get("exit_blocks"):
        kwargs["exit_blocks"] = tuple(int(b) for b in config["exit_blocks"])
    if config.get("groups", 1) != 1:
        kwargs["groups"] = int(config["groups"])
    if checkpoint.get("widths"):  # a pruned network (training.prune): its site widths
        kwargs["widths"] = {str(k): int(v) for k, v in checkpoint["widths"].items()}
    try:
        model = create_model(
            config["arch"], int(checkpoint["num_classes"]), exits=int(config["exits"]), **kwargs
        )
    except ValueError as exc:
        raise CheckpointError(f"cannot rebuild model from checkpoint config: {exc}") from exc
    try:
        # A run trained with an EMA of weights is evaluated, selected and exported by it.
        weights = checkpoint.get("ema_model")
        model.load_state_dict(weights if weights is not None else checkpoint["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        # torch lists every mismatched tensor on its own line; the CLI promises one line.
        detail = " ".join(str(exc).split())
        if len(detail) > 300:
            detail = detail[:297] + "..."
        variant = f"{config['arch']} with {config.get('head', 'attention')} exit heads"
        raise CheckpointError(f"checkpoint weights do not fit {variant}: {detail}") from exc
    return model.eval()


# ----------------------------------------------------------------------------- torch modules


class _SegmentGraph(nn.Module):
    def __init__(self, net: MultiExitNetwork, k: int, with_features: bool) -> None:
        super().__init__()
        self.net, self.k, self.with_features = net, k, with_features

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        feats, logits = self.net.forward_stage(self.k, x)
        probs = torch.softmax(logits.float(), dim=-1)
        return (feats, probs) if self.with_features else probs


class _StageGraph(nn.Module):
    def __init__(self, net: MultiExitNetwork, k: int) -> None:
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.run_stage(self.k, x)


class _FullGraph(nn.Module):
    def __init__(self, net: MultiExitNetwork) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net.forward_backbone(x).float(), dim=-1)


@dataclass(frozen=True)
class _GraphJob:
    """One ONNX file to write and verify."""

    file: str
    module: nn.Module
    input_name: str
    output_names: tuple[str, ...]
    torch_macs: int
    example: torch.Tensor  # a batch of 2 for tracing


# ----------------------------------------------------------------------------- onnx export


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


def _export_one(job: _GraphJob, path: Path, opset: int, exporter: str) -> None:
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


def _check_graph(path: Path, job: _GraphJob) -> None:
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


def _export_with_fallback(job: _GraphJob, path: Path, opset: int, exporter: str) -> str:
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


# ----------------------------------------------------------------------------- verification


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


@torch.no_grad()
def _verify_parity(
    bundle: Path,
    model: MultiExitNetwork,
    inputs: list[np.ndarray],
    stage_files: bool,
    atol: float,
) -> dict[str, tuple[float | None, float | None]]:
    """Per file (probs max abs diff, features max relative diff), worst over `inputs`.

    Each graph is run on torch's own inputs (isolated parity), and the segment chain is also run
    end to end in onnxruntime (ORT features feed the next ORT segment), so error that compounds
    along the chain is caught too.
    """
    k_total = model.num_exits
    sessions = {k: _ort_session(bundle / f"segment_{k}.onnx") for k in range(1, k_total + 1)}
    stages = (
        {k: _ort_session(bundle / f"stage_{k}.onnx") for k in range(1, k_total)}
        if stage_files
        else {}
    )
    full = _ort_session(bundle / FULL_MODEL_FILE)
    worst: dict[str, list[float]] = {}

    def note(file: str, probs_diff: float | None, feat_diff: float | None) -> None:
        old = worst.setdefault(file, [-1.0, -1.0])
        if probs_diff is not None:
            old[0] = max(old[0], probs_diff)
        if feat_diff is not None:
            old[1] = max(old[1], feat_diff)

    for batch in inputs:
        x = torch.from_numpy(batch)
        chain = batch
        for k in range(1, k_total + 1):
            name = f"segment_{k}.onnx"
            last = k == k_total
            feats, logits = model.forward_stage(k, x)
            probs = torch.softmax(logits.float(), dim=-1).numpy()
            in_name = sessions[k].get_inputs()[0].name
            ort_out = sessions[k].run(None, {in_name: x.numpy()})
            chain_out = sessions[k].run(None, {in_name: chain})
            ort_probs, chain_probs = ort_out[-1], chain_out[-1]
            diff = max(
                float(np.abs(ort_probs - probs).max()), float(np.abs(chain_probs - probs).max())
            )
            feat_diff = None
            if not last:
                feat_diff = max(
                    _max_rel(ort_out[0], feats.numpy()), _max_rel(chain_out[0], feats.numpy())
                )
                chain = chain_out[0]
            note(name, diff, feat_diff)
            if diff > atol:
                raise ExportError(
                    f"{name}: onnxruntime probabilities differ from torch by {diff:.2e} "
                    f"(> {atol:.0e})"
                )
            if k in stages:
                stage_out = stages[k].run(None, {in_name: x.numpy()})[0]
                stage_diff = _max_rel(stage_out, feats.numpy())
                note(f"stage_{k}.onnx", None, stage_diff)
                if stage_diff > 1e-3:
                    raise ExportError(
                        f"stage_{k}.onnx: features differ from torch by {stage_diff:.2e} (relative)"
                    )
            x = feats
        probs = torch.softmax(model.forward_backbone(torch.from_numpy(batch)), dim=-1).numpy()
        ort_probs = full.run(None, {full.get_inputs()[0].name: batch})[0]
        diff = float(np.abs(ort_probs - probs).max())
        note(FULL_MODEL_FILE, diff, None)
        if diff > atol:
            raise ExportError(
                f"{FULL_MODEL_FILE}: onnxruntime probabilities differ from torch by {diff:.2e} "
                f"(> {atol:.0e})"
            )
    return {f: (None if p < 0 else p, None if r < 0 else r) for f, (p, r) in worst.items()}


def _verify_single_graph(
    path: Path, model: MultiExitNetwork, inputs: list[np.ndarray], atol: float
) -> float:
    """Worst |onnxruntime − torch| probability of a plain single graph over `inputs`."""
    session = _ort_session(path)
    worst = 0.0
    for batch in inputs:
        with torch.no_grad():
            probs = torch.softmax(model.forward_backbone(torch.from_numpy(batch)), dim=-1).numpy()
        ort_probs = session.run(None, {session.get_inputs()[0].name: batch})[0]
        worst = max(worst, float(np.abs(ort_probs - probs).max()))
    if worst > atol:
        raise ExportError(
            f"{path.name}: onnxruntime probabilities differ from torch by {worst:.2e} (> {atol:.0e})"
        )
    return worst


def _verify_macs(path: Path, job: _GraphJob, rtol: float) -> int:
    onnx_macs = count_onnx_macs(path)
    if relative_difference(onnx_macs, job.torch_macs) > rtol:
        raise ExportError(
            f"{job.file}: ONNX graph counts {onnx_macs} MACs per image but torch counts "
            f"{job.torch_macs} for this part (> {rtol:.0%} apart; by op: {macs_by_op(path)}) — "
            "the graph does not compute exactly this segment"
        )
    return onnx_macs


# ----------------------------------------------------------------------------- thresholds


def greedy_thresholds(
    exit_probs: np.ndarray,
    labels: np.ndarray,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> tuple[float, ...]:
    """Per exit, in order, the lowest grid threshold whose accepted rows (among those earlier
    exits left) are at least as accurate at this exit as at the final exit; 1.0 (disabled) if
    none is. The final exit takes every remaining row (t_K = 0), so the chosen rule is never less
    accurate than the final exit on these rows.
    """
    probs = np.asarray(exit_probs, dtype=np.float32)
    num_exits = probs.shape[1]
    predictions = probs.argmax(axis=2)
    right = predictions == np.asarray(labels)[:, None]
    max_probs = probs.max(axis=2).astype(np.float64)
    remaining = np.ones(probs.shape[0], dtype=bool)
    chosen: list[float] = []
    for j in range(num_exits - 1):
        pick = 1.0
        for t in sorted(grid):
            accepted = remaining & (max_probs[:, j] > t)
            if accepted.any() and right[accepted, j].sum() >= right[accepted, -1].sum():
                pick = float(t)
                break
        chosen.append(pick)
        remaining &= ~(max_probs[:, j] > pick)
    chosen.append(0.0)
    return tuple(chosen)


def summarise_thresholds(
    exit_probs: np.ndarray,
    labels: np.ndarray,
    thresholds: Sequence[float],
    fallback: str,
    segment_macs: Sequence[int],
    full_macs: int,
) -> dict[str, Any]:
    """Accuracy (percent), final-exit baseline, MAC acceleration and exit fractions."""
    from core.costs import acceleration, exit_fractions
    from core.decision import decide

    answers, exits = decide(exit_probs, thresholds, fallback)
    labels = np.asarray(labels)
    return {
        "accuracy": 100.0 * float(np.mean(answers.argmax(axis=1) == labels)),
        "baseline_accuracy": 100.0 * float(np.mean(exit_probs[:, -1].argmax(axis=1) == labels)),
        "acceleration": acceleration(exits, segment_macs, full_macs),
        "exit_fractions": exit_fractions(exits, len(segment_macs)),
    }


def _calibrate(
    bundle: Path, manifest: Manifest, data: Any, options: ExportOptions, dataset: str
) -> Thresholds:
    """Run the split through the exported bundle (full mode) and pick export-greedy thresholds."""
    from core.calibration import collect_calibration
    from serving.runtime import EarlyExitRuntime

    runtime = EarlyExitRuntime(bundle, providers=("cpu",), verify=False)
    exit_probs, labels = collect_calibration(
        runtime, data.images, data.labels, batch_size=256, progress=options.progress
    )
    values = greedy_thresholds(exit_probs, labels)
    metrics = summarise_thresholds(
        exit_probs,
        labels,
        values,
        manifest.fallback,
        manifest.segment_macs(),
        manifest.full_model.macs,
    )
    logger.info(
        "export-greedy thresholds %s: accuracy %.2f%% (final exit %.2f%%), acceleration %.2fx",
        list(values),
        metrics["accuracy"],
        metrics["baseline_accuracy"],
        metrics["acceleration"],
    )
    tuned = {
        "method": "export-greedy",
        "data": {"dataset": dataset, "split": options.calibration_split, "rows": len(labels)},
        "metrics": metrics,
    }
    return Thresholds(values=values, tuned=tuned)


# ----------------------------------------------------------------------------- bundle


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _prepare_target(out: Path, force: bool) -> None:
    if not out.exists():
        # Missing parents are created once the export has succeeded this far (export_bundle);
        # here only refuse a path whose nearest existing ancestor is not a directory.
        ancestor = out.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise CheckpointError(f"cannot create {out}: {ancestor} is not a directory")
        return
    if not force:
        raise CheckpointError(f"{out} already exists (use --force to replace it)")
    if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file()):
        raise CheckpointError(f"{out} exists and is not a bundle; refusing to replace it")


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished bundle into place; an old one is renamed away first, then deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        old.rmdir()
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sample_inputs(
    input_shape: tuple[int, int, int], real: np.ndarray | None, seed: int = 0
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((3, *input_shape)).astype(np.float32)]
    if real is not None and len(real):
        batches.append(np.ascontiguousarray(real, dtype=np.float32))
    return batches


def export_bundle(
    model: MultiExitNetwork,
    out: str | os.PathLike[str],
    *,
    classes: Sequence[str],
    input_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    provenance: dict[str, Any] | None = None,
    options: ExportOptions = ExportOptions(),
    calibration: Any = None,
    costs: ModelCosts | None = None,
    baseline: PlainBaseline | None = None,
) -> ExportResult:
    """Export `model` as a verified bundle at `out`.

    `baseline` (optional) is the plain model early exit is compared with: recorded in the
    manifest, and exported as baseline.onnx (parity-checked) when it is another network.

    `calibration` is an `ImageArrays` (uint8 images + labels) from which export-greedy thresholds
    are chosen and a few real images are drawn for parity; without it thresholds are all 1.0.
    Raises CheckpointError for unusable arguments and ExportError when verification fails.
    """
    started = time.perf_counter()
    if options.fallback not in FALLBACKS:
        raise CheckpointError(f"fallback must be one of {FALLBACKS}, got {options.fallback!r}")
    if options.exporter not in EXPORTERS:
        raise CheckpointError(f"exporter must be one of {EXPORTERS}, got {options.exporter!r}")
    out = Path(out).absolute()
    _prepare_target(out, options.force)
    model = model.eval()
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3:
        raise CheckpointError(f"input_shape must be [C, H, W], got {list(shape)}")
    if len(classes) != model.num_classes:
        raise CheckpointError(f"{len(classes)} class names for a {model.num_classes}-class model")
    costs = costs or measure_costs(model, shape)
    k_total = model.num_exits

    # Feature shapes and trace examples, segment by segment.
    examples, feature_shapes = [], []
    with torch.no_grad():
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
        for k in range(1, k_total + 1):
            examples.append(x)
            x = model.run_stage(k, x)
            feature_shapes.append(tuple(int(v) for v in x.shape[1:]))

    jobs: list[_GraphJob] = []
    for k in range(1, k_total + 1):
        last = k == k_total
        in_name = "input" if k == 1 else f"features_{k - 1}"
        outs = (f"probs_{k}",) if last else (f"features_{k}", f"probs_{k}")
        jobs.append(
            _GraphJob(
                f"segment_{k}.onnx",
                _SegmentGraph(model, k, not last).eval(),
                in_name,
                outs,
                costs.segment_macs[k - 1],
                examples[k - 1],
            )
        )
        if options.stage_files and not last:
            jobs.append(
                _GraphJob(
                    f"stage_{k}.onnx",
                    _StageGraph(model, k).eval(),
                    in_name,
                    (f"features_{k}",),
                    costs.stage_macs[k - 1],
                    examples[k - 1],
                )
            )
    jobs.append(
        _GraphJob(
            FULL_MODEL_FILE,
            _FullGraph(model).eval(),
            "input",
            ("probs",),
            costs.backbone_macs,
            examples[0],
        )
    )
    if baseline is not None and baseline.model is not None:
        baseline_model = baseline.model.eval()
        jobs.append(
            _GraphJob(
                BASELINE_FILE,
                _FullGraph(baseline_model).eval(),
                "input",
                ("probs",),
                measure_costs(baseline_model, shape).backbone_macs,
                examples[0],
            )
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        used: set[str] = set()
        onnx_macs: dict[str, int] = {}
        for job in jobs:
            path = tmp / job.file
            used.add(_export_with_fallback(job, path, options.opset, options.exporter))
            onnx_macs[job.file] = _verify_macs(path, job, options.macs_rtol)
            logger.info("exported %s (%d MACs)", job.file, onnx_macs[job.file])
        extra = sorted(set(os.listdir(tmp)) - {job.file for job in jobs})
        if extra:
            raise ExportError(f"exporter wrote unexpected extra files: {extra}")
        real = None
        if calibration is not None and len(calibration):
            real = normalize_images(calibration.images[:8], mean, std)
        parity = _verify_parity(
            tmp, model, _sample_inputs(shape, real), options.stage_files, options.parity_atol
        )
        if baseline is not None and baseline.model is not None:
            parity[BASELINE_FILE] = (
                _verify_single_graph(
                    tmp / BASELINE_FILE,
                    baseline.model,
                    _sample_inputs(shape, real),
                    options.parity_atol,
                ),
                None,
            )
        exporter = "+".join(sorted(used))

        segments = []
        for k in range(1, k_total + 1):
            last = k == k_total
            stage = f"stage_{k}.onnx" if options.stage_files and not last else None
            segments.append(
                SegmentSpec(
                    index=k,
                    file=f"segment_{k}.onnx",
                    sha256=sha256_file(tmp / f"segment_{k}.onnx"),
                    input_name="input" if k == 1 else f"features_{k - 1}",
                    input_shape=shape if k == 1 else feature_shapes[k - 2],
                    probs_output=f"probs_{k}",
                    feature_output=None if last else f"features_{k}",
                    feature_shape=None if last else feature_shapes[k - 1],
                    macs=int(costs.segment_macs[k - 1]),
                    params=int(costs.segment_params[k - 1]),
                    stage_file=stage,
                    stage_sha256=sha256_file(tmp / stage) if stage else None,
                    stage_macs=int(costs.stage_macs[k - 1]) if stage else None,
                )
            )
        prov = dict(provenance or {})
        prov.update(
            {
                "export_time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "exporter": exporter,
                "opset": options.opset,
                "torch_version": torch.__version__,
                "onnx_version": _version("onnx"),
                "onnxruntime_version": _version("onnxruntime"),
                "costs": costs.to_dict(),
                "onnx_macs": onnx_macs,
                "parity_max_abs_diff": {f: p for f, (p, _) in parity.items() if p is not None},
            }
        )
        manifest = Manifest(
            name=options.name or "model",
            version=options.version or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d%H%M%S"),
            labels=tuple(str(c) for c in classes),
            input=InputSpec(
                shape=shape,  # type: ignore[arg-type]
                mean=tuple(float(v) for v in mean),
                std=tuple(float(v) for v in std),
                color_mode="RGB" if shape[0] == 3 else "L",
            ),
            segments=tuple(segments),
            fallback=options.fallback,
            full_model=FullModelSpec(
                file=FULL_MODEL_FILE,
                sha256=sha256_file(tmp / FULL_MODEL_FILE),
                macs=int(costs.backbone_macs),
                params=int(costs.backbone_params),
            ),
            provenance=_jsonable(prov),
            format=BUNDLE_FORMAT,
            exit_points=tuple(model.exit_points),
            baseline=None
            if baseline is None
            else BaselineSpec(
                recipe=baseline.recipe,
                accuracy=dict(baseline.accuracy),
                file=BASELINE_FILE if baseline.model is not None else None,
                sha256=sha256_file(tmp / BASELINE_FILE) if baseline.model is not None else None,
            ),
        )
        data = _jsonable(manifest.to_dict())
        if parse_manifest(data) != manifest:
            raise ExportError("manifest does not survive a round trip through parse_manifest")
        atomic_write_json(tmp / MANIFEST_FILE, data)

        thresholds = Thresholds(values=(1.0,) * k_total, tuned={"method": "default"})
        write_thresholds(tmp, thresholds)
        if calibration is not None and len(calibration):
            thresholds = _calibrate(
                tmp, manifest, calibration, options, str(prov.get("dataset", "unknown"))
            )
            write_thresholds(tmp, thresholds)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    checks = [
        FileCheck(
            file=job.file,
            probs_max_abs_diff=parity.get(job.file, (None, None))[0],
            features_max_rel_diff=parity.get(job.file, (None, None))[1],
            onnx_macs=onnx_macs[job.file],
            torch_macs=job.torch_macs,
        )
        for job in jobs
    ]
    return ExportResult(
        bundle=out,
        manifest=manifest,
        thresholds=thresholds,
        checks=checks,
        exporter=exporter,
        seconds=time.perf_counter() - started,
    )


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module if module != "onnxruntime" else "onnxruntime-gpu")
    except Exception:  # metadata lookup is best-effort provenance
        try:
            return __import__(module).__version__
        except Exception:
            return None


def export_checkpoint(
    checkpoint: str | os.PathLike[str] | dict[str, Any],
    out: str | os.PathLike[str],
    options: ExportOptions = ExportOptions(),
) -> ExportResult:
    """Load (or take) a training checkpoint and export it as a bundle at `out`."""
    source = None
    if not isinstance(checkpoint, dict):
        source = Path(checkpoint)
        # Refuse an existing bundle before the (slow) load and export.
        _prepare_target(Path(out).absolute(), options.force)
        checkpoint = load_for_export(source)
    model = build_model(checkpoint)
    config = dict(checkpoint["config"])
    dataset = options.dataset or config.get("dataset")
    calibration = None
    if options.data_dir:
        if not dataset:
            raise CheckpointError("the checkpoint names no dataset; pass --dataset")
        from core.datasets import DEFAULT_SPLIT_SEED, DEFAULT_VAL_SIZE, DatasetError, load_split

        try:
            calibration = load_split(
                dataset,
                options.data_dir,
                options.calibration_split,
                val_size=int(config.get("val_size") or DEFAULT_VAL_SIZE),
                split_seed=int(config.get("split_seed") or DEFAULT_SPLIT_SEED),
            )
        except DatasetError as exc:
            raise CheckpointError(str(exc)) from exc
        if options.calibration_limit:
            calibration = calibration.subset(
                np.arange(min(options.calibration_limit, len(calibration)))
            )
    costs = None
    if isinstance(checkpoint.get("costs"), dict):
        try:
            costs = ModelCosts(**checkpoint["costs"])
        except TypeError:
            logger.warning("checkpoint 'costs' has an unexpected layout; recounting")
    # Costs are always re-measured on the rebuilt model: the MAC check compares ONNX to these.
    measured = measure_costs(model, tuple(checkpoint["input_shape"]))
    if costs is not None and costs.segment_macs != measured.segment_macs:
        logger.warning("checkpoint costs differ from the rebuilt model's; using the recount")
    provenance = {
        "training_config": config,
        "git_commit": checkpoint.get("git_commit"),
        "dataset": dataset,
        "epoch": checkpoint.get("epoch"),
        "val_metrics": checkpoint.get("val_metrics"),
        "exit_val_accuracy": _exit_accuracies(checkpoint.get("val_metrics")),
        # Names and hashes only: no artifact carries a path of the machine that made it.
        "checkpoint": source.name if source else None,
        "checkpoint_sha256": sha256_file(source) if source else None,
    }
    config["data_dir"] = portable_path(config.get("data_dir"))
    config["init"] = portable_path(config.get("init"))
    baseline = load_plain_baseline(options, checkpoint) if options.baseline_run else None
    if options.name is None:
        options = replace(options, name=f"{config['arch']}-{dataset or 'model'}")
    return export_bundle(
        model,
        out,
        classes=[str(c) for c in checkpoint["classes"]],
        input_shape=checkpoint["input_shape"],
        mean=checkpoint["mean"],
        std=checkpoint["std"],
        provenance=provenance,
        options=options,
        calibration=calibration,
        costs=measured,
        baseline=baseline,
    )


def load_plain_baseline(options: ExportOptions, checkpoint: dict[str, Any]) -> PlainBaseline:
    """The plain model of `options.baseline_run` (best.pt) with its validation and test accuracy,
    checked against the bundle's classes and input shape."""
    run = Path(str(options.baseline_run))
    ckpt_path = run / "best.pt"
    if not ckpt_path.is_file():
        raise CheckpointError(f"--baseline-run {run}: no best.pt there")
    state = load_for_export(ckpt_path)
    for key in ("num_classes", "input_shape", "mean", "std"):
        if list(np.atleast_1d(state[key])) != list(np.atleast_1d(checkpoint[key])):
            raise CheckpointError(
                f"--baseline-run {run}: its {key} {state[key]} differs from the checkpoint's "
                f"{checkpoint[key]}"
            )
    accuracy: dict[str, float] = {}
    val = state.get("val_metrics") or {}
    if isinstance(val.get("acc_last"), int | float):
        accuracy["val"] = float(val["acc_last"])
    test_file = run / "test_metrics.json"
    if test_file.is_file():
        try:
            test = json.loads(test_file.read_text(encoding="utf-8"))
            best = test.get("best") or test.get("final") or {}
            if isinstance(best.get("acc_last"), int | float):
                accuracy["test"] = float(best["acc_last"])
        except (ValueError, AttributeError) as exc:
            raise CheckpointError(f"{test_file}: not a test report ({exc})") from exc
    missing = [split for split in ("val", "test") if split not in accuracy]
    if missing:
        raise CheckpointError(
            f"--baseline-run {run}: records no {' or '.join(missing)} accuracy "
            "(best.pt val_metrics, test_metrics.json): let its training finish first"
        )
    plain = build_model(state)
    if plain.num_exits != 1:
        logger.warning(
            "--baseline-run %s has %d exits; its backbone is the plain model", run, plain.num_exits
        )
    same = _same_backbone(plain, checkpoint)
    return PlainBaseline(
        model=None if same else plain,
        recipe=options.baseline_recipe or run.name,
        accuracy=accuracy,
    )


def _same_backbone(plain: MultiExitNetwork, checkpoint: dict[str, Any]) -> bool:
    """True when the checkpoint's backbone weights are the plain model's, bit for bit (exits
    trained on a frozen backbone): then full_model.onnx already is the plain model."""
    weights = checkpoint.get("ema_model") or checkpoint["model"]
    mine = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    theirs = {
        k.removeprefix("backbone."): v
        for k, v in plain.state_dict().items()
        if k.startswith("backbone.")
    }
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _exit_accuracies(val_metrics: Any) -> list[float] | None:
    """Per-exit validation accuracies from the checkpoint's metrics, if it has them."""
    if isinstance(val_metrics, dict):
        numbered = []
        while f"acc_exit{len(numbered) + 1}" in val_metrics:  # training.engine's layout
            numbered.append(float(val_metrics[f"acc_exit{len(numbered) + 1}"]))
        if numbered:
            return numbered
        for key in ("exit_accuracy", "exit_accuracies", "accuracy", "acc"):
            value = val_metrics.get(key)
            if isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value):
                return [float(v) for v in value]
    if isinstance(val_metrics, list | tuple) and all(
        isinstance(v, int | float) for v in val_metrics
    ):
        return [float(v) for v in val_metrics]
    return None


__all__ = [
    "CheckpointError",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "FileCheck",
    "build_model",
    "export_bundle",
    "export_checkpoint",
    "greedy_thresholds",
    "load_for_export",
    "summarise_thresholds",
    "validate_checkpoint",
]
