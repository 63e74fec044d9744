"""Helpers for the architecture tests: a checkpoint dict shaped like training.engine's, and a
one-call export of it with the library's own parity and MAC checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from training.costs import measure_costs
from training.models import MultiExitNetwork

SHAPE = (3, 32, 32)


def checkpoint_for(
    model: MultiExitNetwork, config: dict[str, Any], shape: tuple[int, int, int] = SHAPE
) -> dict[str, Any]:
    """A checkpoint of `model` as the engine writes it, with `config` (arch, exits, ...)."""
    num_classes = model.num_classes
    return {
        "model": model.state_dict(),
        "config": {"stem": "cifar", "dataset": "cifar10", "data_dir": None, **config},
        "num_classes": num_classes,
        "classes": [f"c{i}" for i in range(num_classes)],
        "input_shape": list(shape),
        "mean": [0.5] * shape[0],
        "std": [0.25] * shape[0],
        "costs": measure_costs(model, shape).to_dict(),
        "val_metrics": {},
        "epoch": 0,
        "git_commit": "0" * 40,
    }


def export_and_check(checkpoint: dict[str, Any], out: Path):
    """Export through `export_checkpoint` (rebuilds the model from the checkpoint's config);
    raises ExportError unless every file passes parity and the MAC count."""
    from training.export import ExportOptions, export_checkpoint

    result = export_checkpoint(
        checkpoint, out, ExportOptions(exporter="torchscript", progress=False, stage_files=False)
    )
    assert all(c.probs_max_abs_diff is None or c.probs_max_abs_diff < 1e-4 for c in result.checks)
    return result


def staged_equals_full(model: MultiExitNetwork, x: torch.Tensor) -> None:
    """Running segment by segment gives exactly the full forward's logits at every exit."""
    with torch.no_grad():
        out = model(x)
        feats = x
        for k in range(1, model.num_exits + 1):
            feats, logits = model.forward_stage(k, feats)
            assert torch.equal(logits, out.logits[k - 1])
        assert torch.equal(model.forward_backbone(x), out.logits[-1])


def tiny_arrays(n: int, seed: int, size: int = 16, classes: int = 4):
    """Random uint8 images with labels, as `core.datasets.load_split` returns them."""
    import numpy as np

    from core.datasets import ImageArrays

    rng = np.random.default_rng(seed)
    return ImageArrays(
        rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        rng.integers(0, classes, n).astype(np.int64),
        tuple("abcdefghij"[:classes]),
    )


def tiny_trainer(out: Path, **overrides: Any):
    """A Trainer on 32 random 16×16 images (batch 8, width 0.125, one thread)."""
    from training.config import TrainConfig
    from training.engine import Trainer

    cfg = {
        "arch": "resnet18", "width": 0.125, "exits": 3, "epochs": 3, "batch_size": 8,
        "lr": 0.05, "val_size": 0, "num_threads": 1, "head": "lite",
    }  # fmt: skip
    cfg.update(overrides)
    return Trainer(
        TrainConfig(**cfg), out, train_data=tiny_arrays(32, 0), val_data=tiny_arrays(16, 1)
    )
