"""Seed 004 eq. (3)–(5): CE on every exit, KL to a reference exit, L2 hint on features.

For K exits with logits c_i and feature vectors F_i (i = 1..K, K = deepest):

    L = 1/K Σ_i [(1 − α_i)·CE(c_i, y) + α_i·T²·KL(q_T(c_ref,i) ‖ q_T(c_i))]
        + λ · 1/K Σ_i ‖F_i − F_ref,i‖²

with α_i = α, λ_i = 1 for shallow exits and α_K = λ_K = 0 (the final exit learns from labels
only). Teacher sides are detached. T² keeps the KL gradient scale independent of T (Hinton et
al.). The squared ℓ2 norm is summed over feature dimensions and averaged over the batch.
The reference ("distillation path", §3.1 / Table 7):
  deepest     c_ref,i = c_K
  ensemble    c_ref,i = mean_k q_T(c_k);  F_ref,i = mean_k F_k
  transitive  c_ref,i = c_{i+1}
  dense       Σ_{k>i} KL(q_T(c_k) ‖ q_T(c_i)) and Σ_{k>i} ‖F_i − F_k‖²   (eq. 6)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .registry import register_loss

PATHS = ("deepest", "ensemble", "transitive", "dense")


@dataclass(frozen=True)
class LossTerms:
    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    feature: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in self.__dict__.items()}


def soft_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher ‖ student) on temperature-softened outputs, mean over the batch."""
    log_student = F.log_softmax(student_logits / t, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean")


def feature_l2(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared ℓ2 distance summed over feature dims, mean over the batch."""
    return (student - teacher).pow(2).sum(dim=1).mean()


class SelfDistillationLoss(nn.Module):
    def __init__(
        self, path: str = "deepest", alpha: float = 0.6, lam: float = 0.04, temperature: float = 3.0
    ) -> None:
        super().__init__()
        if path not in PATHS:
            raise ValueError(f"unknown distillation path {path!r}; valid: {', '.join(PATHS)}")
        if not 0.0 <= alpha <= 1.0 or lam < 0 or temperature <= 0:
            raise ValueError("need 0 ≤ alpha ≤ 1, lambda ≥ 0, temperature > 0")
        self.path, self.alpha, self.lam, self.temperature = path, alpha, lam, temperature

    def forward(
        self,
        logits: list[torch.Tensor],
        features: list[torch.Tensor],
        target: torch.Tensor,
        alpha: float | None = None,
        lam: float | None = None,
    ) -> LossTerms:
        """`alpha`/`lam` override the configured weights (the engine zeroes them at the end)."""
        alpha = self.alpha if alpha is None else alpha
        lam = self.lam if lam is None else lam
        t = self.temperature
        k_exits = len(logits)
        ce_terms = [F.cross_entropy(z, target) for z in logits]
        soft = [F.softmax(z.detach() / t, dim=1) for z in logits]
        feats = [f.detach() for f in features]
        if self.path == "ensemble":
            ens_probs = torch.stack(soft).mean(0)
            ens_feat = torch.stack(feats).mean(0)
        ce = logits[0].new_zeros(())
        kl = logits[0].new_zeros(())
        feat = logits[0].new_zeros(())
        for i in range(k_exits):
            if i == k_exits - 1:  # α_K = λ_K = 0
                ce = ce + ce_terms[i]
                continue
            if self.path == "deepest":
                pairs = [(soft[-1], feats[-1])]
            elif self.path == "transitive":
                pairs = [(soft[i + 1], feats[i + 1])]
            elif self.path == "ensemble":
                pairs = [(ens_probs, ens_feat)]
            else:  # dense
                pairs = [(soft[k], feats[k]) for k in range(i + 1, k_exits)]
            kl_i = sum(soft_kl(logits[i], p, t) for p, _ in pairs) * t * t
            feat_i = sum(feature_l2(features[i], f) for _, f in pairs)
            ce = ce + (1 - alpha) * ce_terms[i]
            kl = kl + alpha * kl_i
            feat = feat + feat_i
        ce, kl, feat = ce / k_exits, kl / k_exits, lam * feat / k_exits
        return LossTerms(total=ce + kl + feat, ce=ce, kl=kl, feature=feat)


class CrossEntropyExits(nn.Module):
    """Plain CE averaged over the exits it is given (one exit = the baseline backbone)."""

    def forward(
        self,
        logits: list[torch.Tensor],
        features: list[torch.Tensor],
        target: torch.Tensor,
        alpha: float | None = None,
        lam: float | None = None,
    ) -> LossTerms:
        ce = sum(F.cross_entropy(z, target) for z in logits) / len(logits)
        zero = ce.new_zeros(())
        return LossTerms(total=ce, ce=ce, kl=zero, feature=zero)


@register_loss("self_distillation")
def self_distillation(
    path: str = "deepest",
    alpha: float = 0.6,
    lam: float = 0.04,
    temperature: float = 3.0,
    **_: object,
) -> nn.Module:
    return SelfDistillationLoss(path=path, alpha=alpha, lam=lam, temperature=temperature)


@register_loss("baseline")
def baseline(**_: object) -> nn.Module:
    """Backbone only, CE: the model is built with one exit for this loss."""
    return CrossEntropyExits()


@register_loss("deep_supervision")
def deep_supervision(**_: object) -> nn.Module:
    """CE on every exit, no distillation (ablation: what the KL/L2 terms add)."""
    return CrossEntropyExits()
