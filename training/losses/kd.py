"""KD + SD (seed 004, Table 3): an external teacher's knowledge distillation added to
self-distillation.

For K exits with logits c_i, a frozen teacher with logits t (`--teacher`), target y:

    L = L_SD(c, F, y)                                  (`self_distillation`, every option)
      + w · R Σ_{i ∈ E} T² · KL( q_T(t) ‖ q_T(c_i) )    (Hinton et al.'s KD term)

q_T = softmax(·/T), KL with batch-mean reduction, the teacher side constant (no grad).

Readings where the paper is silent (SEED_METHODS.md, 004 extras): Table 3 does not say how the
teacher loss is combined. We add the Hinton term on top of eq. 5, unchanged:
- E = the deepest exit (`kd_exits: deepest`, default) or every exit (`all`);
- w = `kd_weight` (default 1: the term enters at full weight beside the deepest CE, as the SD
  terms do), T = `kd_temperature` (default 3, the temperature of the SD recipe and of seed
  001's teacher KL);
- R: with `loss_reduction: mean` the KD sum is divided by K like the other terms;
- the teacher term is not switched off in the last `distill_off_epochs` (that schedule is
  self-distillation's α and λ, seed 004 §4.1).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .inputs import ExitLoss, LossInputs
from .registry import register_loss
from .self_distillation import SD_FIELDS, LossTerms, SelfDistillationLoss

KD_EXITS = ("deepest", "all")
KD_FIELDS = ("teacher", "kd_weight", "kd_temperature", "kd_exits")


def teacher_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float
) -> torch.Tensor:
    """T² · KL(q_T(teacher) ‖ q_T(student)), mean over the batch; the teacher is constant."""
    teacher_probs = F.softmax(teacher_logits.detach() / t, dim=1)
    log_student = F.log_softmax(student_logits / t, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * t * t


def check_kd(kd_weight: float, kd_temperature: float, kd_exits: str | None = None) -> None:
    if kd_weight < 0:
        raise ValueError(f"kd_weight must be ≥ 0, got {kd_weight}")
    if kd_temperature <= 0:
        raise ValueError(f"kd_temperature must be > 0, got {kd_temperature}")
    if kd_exits is not None and kd_exits not in KD_EXITS:
        raise ValueError(f"unknown kd_exits {kd_exits!r}; valid: {', '.join(KD_EXITS)}")


class KDSelfDistillationLoss(ExitLoss):
    """Self-distillation plus the teacher's KD term (module docstring)."""

    needs = frozenset({"teacher"})

    def __init__(
        self,
        kd_weight: float = 1.0,
        kd_temperature: float = 3.0,
        kd_exits: str = "deepest",
        **self_distillation: Any,
    ) -> None:
        super().__init__()
        check_kd(kd_weight, kd_temperature, kd_exits)
        self.kd_weight, self.kd_temperature, self.kd_exits = kd_weight, kd_temperature, kd_exits
        self.sd = SelfDistillationLoss(**self_distillation)

    def forward(self, inputs: LossInputs) -> LossTerms:
        if inputs.teacher is None:
            raise ValueError("kd_self_distillation needs the teacher's outputs (--teacher)")
        terms = self.sd(inputs)
        logits = inputs.logits
        taught = logits if self.kd_exits == "all" else logits[-1:]
        kd = sum(teacher_kl(z, inputs.teacher.logits, self.kd_temperature) for z in taught)
        kd = self.kd_weight * kd
        if self.sd.reduction == "mean":
            kd = kd / len(logits)
        kl = terms.kl + kd
        return LossTerms(
            total=terms.ce + kl + terms.feature, ce=terms.ce, kl=kl, feature=terms.feature
        )


@register_loss("kd_self_distillation", fields=SD_FIELDS + KD_FIELDS, needs=("teacher",))
def kd_self_distillation(
    kd_weight: float = 1.0,
    kd_temperature: float = 3.0,
    kd_exits: str = "deepest",
    **kwargs: Any,
) -> nn.Module:
    """Seed 004 Table 3's KD + SD (module docstring)."""
    takes = inspect.signature(SelfDistillationLoss).parameters
    return KDSelfDistillationLoss(
        kd_weight=kd_weight,
        kd_temperature=kd_temperature,
        kd_exits=kd_exits,
        **{k: v for k, v in kwargs.items() if k in takes},
    )
