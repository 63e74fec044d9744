"""Reading a checkpoint file a user named (export, `--init`, `--teacher`): one place for the
"not found" and "not a torch checkpoint" answers, each raised as the caller's own error type."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def read_checkpoint(path: str | os.PathLike[str], error: type[Exception], flag: str = "") -> Any:
    """`torch.load` of `path` on CPU. A missing file or one torch cannot read raises `error`
    with one line naming `flag` (e.g. "--init") when given."""
    source = Path(path)
    label = f"{flag} " if flag else ""
    if not source.is_file():
        raise error(f"{label}checkpoint not found: {source}")
    try:
        return torch.load(source, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load raises many types on a corrupt or foreign file
        raise error(f"{label}{source}: not a readable torch checkpoint ({exc})") from exc


# What only resuming a training needs; a checkpoint of derived weights leaves it out.
TRAINING_STATE = ("optimizer", "scheduler", "rng", "epoch_partial", "loss", "ema_state")


def derived_checkpoint(template: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """A finished checkpoint holding `state` (weights derived from `template`'s run, e.g. a
    soup or a subset of its exits): the template's metadata without its training state."""
    out = {k: v for k, v in template.items() if k not in TRAINING_STATE}
    out["model"] = state
    out["ema_model"] = None
    return out
