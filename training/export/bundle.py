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

import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
from thresholds.greedy import greedy_thresholds, summarise_thresholds

from ..costs import ModelCosts, measure_costs
from ..models import MultiExitNetwork
from .checkpoint import build_model, exit_accuracies, load_for_export, load_plain_baseline
from .checks import verify_macs, verify_parity, verify_single_graph
from .graphs import FullGraph, GraphJob, SegmentGraph, StageGraph
from .onnx_writer import export_with_fallback
from .options import (
    BASELINE_FILE,
    EXPORTERS,
    FULL_MODEL_FILE,
    CheckpointError,
    ExportError,
    ExportOptions,
    ExportResult,
    FileCheck,
    PlainBaseline,
)

logger = logging.getLogger(__name__)


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

    jobs: list[GraphJob] = []
    for k in range(1, k_total + 1):
        last = k == k_total
        in_name = "input" if k == 1 else f"features_{k - 1}"
        outs = (f"probs_{k}",) if last else (f"features_{k}", f"probs_{k}")
        jobs.append(
            GraphJob(
                f"segment_{k}.onnx",
                SegmentGraph(model, k, not last).eval(),
                in_name,
                outs,
                costs.segment_macs[k - 1],
                examples[k - 1],
            )
        )
        if options.stage_files and not last:
            jobs.append(
                GraphJob(
                    f"stage_{k}.onnx",
                    StageGraph(model, k).eval(),
                    in_name,
                    (f"features_{k}",),
                    costs.stage_macs[k - 1],
                    examples[k - 1],
                )
            )
    jobs.append(
        GraphJob(
            FULL_MODEL_FILE,
            FullGraph(model).eval(),
            "input",
            ("probs",),
            costs.backbone_macs,
            examples[0],
        )
    )
    if baseline is not None and baseline.model is not None:
        baseline_model = baseline.model.eval()
        jobs.append(
            GraphJob(
                BASELINE_FILE,
                FullGraph(baseline_model).eval(),
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
            used.add(export_with_fallback(job, path, options.opset, options.exporter))
            onnx_macs[job.file] = verify_macs(path, job, options.macs_rtol)
            logger.info("exported %s (%d MACs)", job.file, onnx_macs[job.file])
        extra = sorted(set(os.listdir(tmp)) - {job.file for job in jobs})
        if extra:
            raise ExportError(f"exporter wrote unexpected extra files: {extra}")
        real = None
        if calibration is not None and len(calibration):
            real = normalize_images(calibration.images[:8], mean, std)
        parity = verify_parity(
            tmp, model, _sample_inputs(shape, real), options.stage_files, options.parity_atol
        )
        if baseline is not None and baseline.model is not None:
            parity[BASELINE_FILE] = (
                verify_single_graph(
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


def _calibrate(
    bundle: Path, manifest: Manifest, data: Any, options: ExportOptions, dataset: str
) -> Thresholds:
    """Run the split through the exported bundle (full mode) and pick export-greedy thresholds."""
    from core.calibration import collect_calibration
    from core.drift import confidence_reference
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
        # What the server's drift statistic compares live traffic with (core.drift).
        "reference": confidence_reference(
            exit_probs,
            options.calibration_split,
            thresholds=values,
            fallback=manifest.fallback,
            plain_probs=_plain_probs(runtime, data.images)
            if manifest.fallback == "plain"
            else None,
        ),
    }
    return Thresholds(values=values, tuned=tuned)


def _plain_probs(runtime: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Fallback "plain": the plain graph's probabilities on the calibration images (full depth,
    which the recorded agreement compares with)."""
    return np.concatenate(
        [
            runtime.run_plain(runtime.preprocess(images[i : i + batch_size]))[0]
            for i in range(0, len(images), batch_size)
        ]
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
        "exit_val_accuracy": exit_accuracies(checkpoint.get("val_metrics")),
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
