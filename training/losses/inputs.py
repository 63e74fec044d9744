"""What a loss is given: one `LossInputs` object per step, filled with only what the loss asks
for (`ExitLoss.needs`), and the base class every loss here derives from.

The engine always provides the exits' logits and pooled features, the target (class indices N,
or N×C class-probability rows under CutMix), the epoch and the global step. On request
(`needs`):

- ``maps``: each exit head's aligned map (`MultiExitOutput.maps`, deepest-shaped);
- ``stage_maps``: the backbone's output map at the end of every stage (S maps, shallowest
  first), captured with forward hooks, so nothing is kept when no loss asks;
- ``teacher``: the frozen teacher's outputs on the same batch (`training.teacher`), with its
  stage maps when the loss also needs ``stage_maps``;
- ``rows``: the batch's training-set row indices (per-sample state across epochs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

NEEDS = ("maps", "stage_maps", "teacher", "rows")


@dataclass(frozen=True)
class TeacherOutputs:
    """A frozen teacher's outputs on one batch (no grad)."""

    logits: torch.Tensor  # N×C, the teacher's deepest exit
    stage_maps: list[torch.Tensor] | None = None  # the teacher backbone's stage maps


@dataclass(frozen=True)
class LossInputs:
    logits: list[torch.Tensor]  # K tensors N×C, shallowest exit first
    features: list[torch.Tensor]  # K tensors N×D (pooled, deepest width)
    target: torch.Tensor  # N class indices, or N×C class-probability rows
    maps: list[torch.Tensor] | None = None
    stage_maps: list[torch.Tensor] | None = None
    teacher: TeacherOutputs | None = None
    rows: torch.Tensor | None = None  # N training-set row indices
    epoch: int = 0
    step: int = 0  # global optimiser step (0 for the first)
    # Scheduled weights the engine passes (0 for the last `distill_off_epochs`); None = the
    # loss's configured value.
    alpha: float | None = None
    lam: float | None = None


class ExitLoss(nn.Module):
    """Base of the losses: `forward(inputs: LossInputs) -> LossTerms`.

    `needs` lists what beyond logits/features/target the loss reads (`NEEDS`). A loss that
    needs nothing else may also be called the short way, `loss(logits, features, target)`
    (a loss that needs ``maps`` then takes the maps as the second argument)."""

    needs: frozenset[str] = frozenset()

    def __call__(  # type: ignore[override]
        self,
        inputs: LossInputs | list[torch.Tensor],
        features: list[torch.Tensor] | None = None,
        target: torch.Tensor | None = None,
        alpha: float | None = None,
        lam: float | None = None,
    ) -> Any:
        if not isinstance(inputs, LossInputs):
            if features is None or target is None:
                raise TypeError("a loss takes LossInputs, or (logits, features, target)")
            inputs = LossInputs(
                logits=list(inputs),
                features=list(features),
                target=target,
                maps=list(features) if "maps" in self.needs else None,
                alpha=alpha,
                lam=lam,
            )
        return super().__call__(inputs)

    @property
    def uses_maps(self) -> bool:
        return "maps" in self.needs


def stage_ends(model: nn.Module) -> list[nn.Module]:
    """The module that closes each backbone stage of a `MultiExitNetwork` (its last block, or
    the stage itself when it is one module): its output is the stage map."""
    ends = []
    for stage in model.backbone.stages:
        children = list(stage.children()) if isinstance(stage, nn.Sequential) else []
        ends.append(children[-1] if children else stage)
    return ends


@contextmanager
def capture_stage_maps(model: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of `model` appends its S stage maps to the yielded list
    (forward hooks on `stage_ends`; nothing is captured when not `enabled`)."""
    maps: list[torch.Tensor] = []
    if not enabled:
        yield maps
        return
    handles = [
        end.register_forward_hook(lambda _m, _i, out: maps.append(out)) for end in stage_ends(model)
    ]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def hard_labels(target: torch.Tensor) -> torch.Tensor:
    """Class indices from a target (a probability row's largest share)."""
    return target.argmax(1) if target.ndim == 2 else target


def one_hot_target(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Target as N×C probability rows (class indices become one-hot rows)."""
    if target.ndim == 2:
        return target.float()
    return torch.nn.functional.one_hot(target, num_classes).float()
