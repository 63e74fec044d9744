"""Training checkpoint → rebuilt `MultiExitNetwork`: loading, validation, the plain baseline run."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint_io import read_checkpoint
from ..models import MultiExitNetwork, create_model, model_kwargs
from .options import CheckpointError, ExportOptions, PlainBaseline

logger = logging.getLogger(__name__)


REQUIRED_KEYS = ("model", "config", "num_classes", "classes", "input_shape", "mean", "std")
REQUIRED_CONFIG = ("arch", "exits")


def load_for_export(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a training checkpoint on CPU and check it holds what export needs."""
    checkpoint = read_checkpoint(path, CheckpointError)
    validate_checkpoint(checkpoint, str(Path(path)))
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
    kwargs = model_kwargs(config, checkpoint["input_shape"][0])
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


def exit_accuracies(val_metrics: Any) -> list[float] | None:
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
