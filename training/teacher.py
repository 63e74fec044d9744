"""The teacher slot: a trained checkpoint of this project, frozen, that some losses learn from
(`--teacher CKPT`; seed 001's θ5, seed 004's KD + SD).

The teacher is rebuilt from its checkpoint's own config (any architecture, exits, heads or
pruned widths; its EMA weights when it has them), put in eval mode with every parameter's
`requires_grad` off, and kept out of the model, the optimiser and the checkpoint's trainable
state: a run's checkpoint names the teacher by path in its config, nothing more. A bundle is
not enough: attention transfer needs the teacher backbone's stage maps, which only the torch
model gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint_io import read_checkpoint
from .losses.inputs import TeacherOutputs, capture_stage_maps


class TeacherError(ValueError):
    """--teacher names a checkpoint that cannot teach this run (bad input, exit 2)."""


def load_teacher_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at `path`, checked to be one this project wrote."""
    source = Path(path)
    if source.is_dir():
        raise TeacherError(
            f"--teacher {source} is a directory (a bundle?): pass a training checkpoint such "
            "as a run's best.pt; the torch model is needed for its stage maps"
        )
    state = read_checkpoint(source, TeacherError, "--teacher")
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise TeacherError(f"--teacher {source}: not a checkpoint of earlyexit-train")
    return state


def build_teacher_model(state: dict[str, Any], where: str = "--teacher") -> nn.Module:
    """The teacher network, rebuilt from its checkpoint as export does, frozen, eval mode."""
    from . import export

    try:
        model = export.build_model(state)
    except Exception as exc:  # CheckpointError and friends: one line for the CLI
        raise TeacherError(f"{where}: {exc}") from exc
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


class Teacher:
    """A frozen teacher network with a one-batch cache of its outputs.

    `outputs(x)` runs the teacher once per batch (the same tensor asked twice, e.g. by two
    loss terms, is served from the cache) under `torch.no_grad`, in eval mode whatever mode
    the caller is in. Not an `nn.Module`: nothing of it reaches `model.parameters()`, the
    optimiser or the run's state dict."""

    def __init__(
        self,
        path: str | Path,
        num_classes: int,
        input_shape: tuple[int, int, int],
        device: torch.device | str = "cpu",
        with_stage_maps: bool = False,
    ) -> None:
        state = load_teacher_checkpoint(path)
        where = f"--teacher {Path(path).name}"
        theirs = state.get("num_classes")
        if theirs != num_classes:
            raise TeacherError(f"{where}: {theirs} classes, this run has {num_classes}")
        shape = tuple(int(v) for v in state.get("input_shape") or ())
        if shape != tuple(input_shape):
            raise TeacherError(
                f"{where}: input shape {list(shape)}, this run's is {list(input_shape)}"
            )
        self.path = Path(path)
        with torch.random.fork_rng(devices=[]):  # rebuilding draws fresh weights first
            self.model = build_teacher_model(state, where).to(device)
        self.with_stage_maps = with_stage_maps
        self._batch: torch.Tensor | None = None  # the batch cached (held, so never reused)
        self._version = -1
        self._cached: TeacherOutputs | None = None

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> TeacherOutputs:
        """Teacher logits (and stage maps when asked for) on batch `x`, cached per batch."""
        if self._cached is not None and x is self._batch and x._version == self._version:
            return self._cached
        self.model.eval()
        with capture_stage_maps(self.model, self.with_stage_maps) as maps:
            logits = self.model(x).logits[-1]
        self._batch, self._version = x, x._version
        self._cached = TeacherOutputs(
            logits=logits.float(),
            stage_maps=[m.float() for m in maps] if self.with_stage_maps else None,
        )
        return self._cached

    def parameters_snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the teacher's weights and buffers (tests: it never changes)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
