"""DRG and DSR (seed 003, Wang, Han and Guo): distillation from a "poor teacher" auxiliary
classifier, and shape-wise regularisation of the ranked outputs.

For a network with final logits z (the deepest exit) and auxiliary classifiers z'_j (the
shallow exits; one, after the second stage, by default), target y, p = softmax(z/τ):

    L_HL = CE(z'_j, y) summed over the ACs + CE(z, y)                              (8)
    L_RG = τ_g² · Σ_j KL( q(z'_j) ‖ p(z) ),   q = softmax(z'/τ_g), detached        (9)
    L_DRG = L_HL + α · L_RG                                                        (10)

    z̃^t = sort(z^t) ascending (per row)
    L_SR = τ_s² · KL( softmax(z̃^{t−1}/τ_s) ‖ softmax(z̃^t/τ_s) ),   z̃^{−1} = 0     (11)
    L_DSR = CE(z, y) + β · L_SR                                                    (12)

    L = L_HL + α · L_RG + β · L_SR                                                 (13)

α = 0.2, β = 1, τ_g = 1 (DRG), τ_s = 4 (DSR) are the paper's (Fig. 6 gives each term's best τ;
we read eq. 13 as keeping a separate τ per term). KL is the batch-mean KL divergence.

Readings where the paper is silent or garbled (SEED_METHODS.md, 003):
- eq. 2 and 4 print a 1/K and a lost sign: we use the standard CE and batch-mean KL (a literal
  1/K would rescale α);
- the AC's logits are detached in (9) (the AC is the teacher; it learns from its own CE);
- z̃^{t−1} is the previous optimiser step's ranked final logits on its own batch (other
  samples, row i against row i), kept detached as loss state: it is saved with the checkpoint
  and resumes bit-exactly; the gradient flows through the sort of z̃^t. Rows can only align
  when every batch has the same size: the training loader drops the last partial batch, and a
  batch size leaving no full batch is refused (`aligned_rows`). Under DDP each process keeps
  its own previous batch; the checkpoint holds the first process's;
- the AC (architecture unstated) is this project's exit head (`--head`), after the last block
  of stage 2 unless `--exit-blocks` puts it (or several, Table IV's B1+2) elsewhere; every AC
  guides the final exit. It is CE-trained, so the 2-exit network exports and serves;
- R: `loss_reduction: mean` divides the total by the number of exits, as for every loss here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .inputs import ExitLoss, LossInputs
from .registry import register_loss
from .self_distillation import LossTerms, check_common

DRG_FIELDS = ("drg_alpha", "drg_temperature")
DSR_FIELDS = ("dsr_beta", "dsr_temperature")


def ranked(logits: torch.Tensor) -> torch.Tensor:
    """Each row's logits sorted ascending (differentiable: the gradient follows the values)."""
    return torch.sort(logits, dim=1).values


def tempered_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """τ² · KL(softmax(teacher/τ) ‖ softmax(student/τ)), batch mean; teacher constant."""
    log_student = F.log_softmax(student / t, dim=1)
    teacher_probs = F.softmax(teacher.detach() / t, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * t * t


class DRGDSRLoss(ExitLoss):
    """L_DRG (`drg`), L_DSR (`dsr`) or both (`drg_dsr`, eq. 13); module docstring."""

    def __init__(
        self,
        drg: bool = True,
        dsr: bool = True,
        drg_alpha: float = 0.2,
        drg_temperature: float = 1.0,
        dsr_beta: float = 1.0,
        dsr_temperature: float = 4.0,
        reduction: str = "sum",
        label_smoothing: float = 0.0,
        num_exits: int | None = None,
    ) -> None:
        super().__init__()
        check_common(reduction, label_smoothing)
        if not (drg or dsr):
            raise ValueError("choose DRG, DSR or both")
        if drg_alpha < 0 or dsr_beta < 0:
            raise ValueError(f"drg_alpha and dsr_beta must be ≥ 0, got {drg_alpha}, {dsr_beta}")
        if drg_temperature <= 0 or dsr_temperature <= 0:
            raise ValueError("drg_temperature and dsr_temperature must be > 0")
        if drg and num_exits is not None and num_exits < 2:
            raise ValueError("DRG needs an auxiliary classifier: at least 2 exits")
        self.drg, self.dsr = drg, dsr
        self.alpha, self.tau_g = drg_alpha, drg_temperature
        self.beta, self.tau_s = dsr_beta, dsr_temperature
        self.reduction, self.label_smoothing = reduction, label_smoothing
        self.aligned_rows = dsr
        self.prev_ranked: torch.Tensor | None = None  # z̃^{t−1}; None = z̃^{−1} = 0

    def forward(self, inputs: LossInputs) -> LossTerms:
        logits, target = inputs.logits, inputs.target
        final = logits[-1]
        ce = sum(F.cross_entropy(z, target, label_smoothing=self.label_smoothing) for z in logits)
        kl = final.new_zeros(())
        if self.drg:
            kl = kl + self.alpha * sum(tempered_kl(final, z, self.tau_g) for z in logits[:-1])
        if self.dsr:
            current = ranked(final)
            if self.prev_ranked is None:
                previous = torch.zeros_like(current)
            else:
                previous = self.prev_ranked.to(current.device)
                if previous.shape != current.shape:
                    raise ValueError(
                        f"DSR aligns rows with the previous batch: it had {tuple(previous.shape)}"
                        f" outputs, this one {tuple(current.shape)} (equal batches needed)"
                    )
            kl = kl + self.beta * tempered_kl(current, previous, self.tau_s)
            self.prev_ranked = current.detach().clone()
        total = ce + kl
        zero = final.new_zeros(())
        if self.reduction == "mean":
            ce, kl, total = ce / len(logits), kl / len(logits), total / len(logits)
        return LossTerms(total=total, ce=ce, kl=kl, feature=zero)

    def get_extra_state(self) -> dict[str, Any]:
        """The previous step's ranked outputs: part of the checkpoint (bit-exact resume)."""
        prev = self.prev_ranked
        return {"prev_ranked": None if prev is None else prev.detach().cpu().clone()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        prev = state.get("prev_ranked") if isinstance(state, dict) else None
        self.prev_ranked = None if prev is None else prev.clone()


def _loss(drg: bool, dsr: bool, kwargs: dict[str, Any]) -> nn.Module:
    keys = ("drg_alpha", "drg_temperature", "dsr_beta", "dsr_temperature", "reduction")
    keys += ("label_smoothing", "num_exits")
    return DRGDSRLoss(drg=drg, dsr=dsr, **{k: kwargs[k] for k in keys if k in kwargs})


@register_loss("drg", fields=DRG_FIELDS)
def drg(**kwargs: Any) -> nn.Module:
    """L_DRG (eq. 10): the auxiliary classifier after stage 2 guides the final exit."""
    return _loss(True, False, kwargs)


@register_loss("dsr", fields=DSR_FIELDS)
def dsr(**kwargs: Any) -> nn.Module:
    """L_DSR (eq. 12) on the single-exit backbone."""
    return _loss(False, True, kwargs)


@register_loss("drg_dsr", fields=DRG_FIELDS + DSR_FIELDS)
def drg_dsr(**kwargs: Any) -> nn.Module:
    """Eq. 13: L_HL + α·L_RG + β·L_SR."""
    return _loss(True, True, kwargs)
