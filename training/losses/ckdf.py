"""CKDF (seed 001): knowledge distillation from a frozen teacher combined with
self-distillation, loss1–loss4 (eq. 3–7).

For K exits with logits z_i (i = K the deepest) and features F_i, the teacher's logits t
(`--teacher`, θ5), the student's and the teacher's backbone stage maps X_s, TX_s (s = 1..S),
target y, q_T = softmax(·/T):

    loss1 = (1 − α)·CE(z_K, y) + (1 − β)·Σ_{i<K} CE(z_i, y)                      (3)
    loss2 = α · Σ_{i=2}^{K} T² · KL( q_T(t) ‖ q_T(z_i) )                          (4)
    loss3 = β · Σ_{i ≤ K−2} ‖F_i − F_K‖²₂                                          (5)
    loss4 = β · Σ_{s=1}^{S} MSE( at(X_s), at(TX_s) ),
            at(X) = vec(mean_c X²) / ‖vec(mean_c X²)‖₂                            (6)
    L = loss1 + loss2 + loss3 + loss4                                             (7)

T = `kd_temperature` (3, §4.1). Exit heads: `--head ckdf` (`training.models.exits.CKDFExit`:
two-pair attention, SepConv bottleneck, FC_layer, FC) is the paper's classifier; any head works.

Readings where the paper is silent (SEED_METHODS.md, 001):
- α and β are never given: we take α = β = 0.5 (`ckdf_alpha`, `ckdf_beta`; each in [0, 1]),
  an even split between labels and teacher (α) and between the shallow exits' labels and the
  feature terms (β);
- loss2's sum starts at i = 2 as printed (the shallowest classifier gets no teacher KL);
- loss3 compares the exits with an FC_layer (classifiers 1–2 of ResNet18's four: exits 1..K−2)
  with the deepest exit's pooled feature, detached; ‖·‖²₂ is summed over the feature and
  averaged over the batch;
- loss4 is attention transfer (cited [30]): the channel mean of X², flattened, ℓ2-normalised
  per sample, MSE averaged over positions and batch, summed over stages. The teacher's stages
  must pair with the student's at equal resolution (checked before training);
- R: `loss_reduction: mean` divides the total by K, as for every loss here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .inputs import ExitLoss, LossInputs
from .kd import check_kd, teacher_kl
from .registry import register_loss
from .self_distillation import LossTerms, check_common, feature_l2

CKDF_FIELDS = ("teacher", "kd_temperature", "ckdf_alpha", "ckdf_beta")


def attention_map(x: torch.Tensor) -> torch.Tensor:
    """at(X): N×C×H×W → N×(H·W), the channel mean of X², ℓ2-normalised per row."""
    return F.normalize(x.pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the two maps' attention vectors (eq. 6's summand); teacher constant."""
    return F.mse_loss(attention_map(student), attention_map(teacher.detach()))


class CKDFLoss(ExitLoss):
    """loss1 + loss2 + loss3 + loss4 (module docstring)."""

    needs = frozenset({"teacher", "stage_maps"})

    def __init__(
        self,
        ckdf_alpha: float = 0.5,
        ckdf_beta: float = 0.5,
        kd_temperature: float = 3.0,
        reduction: str = "sum",
        label_smoothing: float = 0.0,
        num_exits: int | None = None,
    ) -> None:
        super().__init__()
        check_common(reduction, label_smoothing)
        check_kd(1.0, kd_temperature)
        for name, value in (("ckdf_alpha", ckdf_alpha), ("ckdf_beta", ckdf_beta)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if num_exits is not None and num_exits < 2:
            raise ValueError("ckdf trains shallow classifiers: it needs at least 2 exits")
        self.alpha, self.beta, self.temperature = ckdf_alpha, ckdf_beta, kd_temperature
        self.reduction, self.label_smoothing = reduction, label_smoothing

    def forward(self, inputs: LossInputs) -> LossTerms:
        teacher = inputs.teacher
        if teacher is None or teacher.stage_maps is None or inputs.stage_maps is None:
            raise ValueError("ckdf needs the teacher's outputs and both networks' stage maps")
        logits, features, target = inputs.logits, inputs.features, inputs.target
        k_exits = len(logits)
        a, b, t = self.alpha, self.beta, self.temperature

        def ce(z: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(z, target, label_smoothing=self.label_smoothing)

        loss1 = (1 - a) * ce(logits[-1]) + (1 - b) * sum(ce(z) for z in logits[:-1])
        loss2 = a * sum(teacher_kl(z, teacher.logits, t) for z in logits[1:])
        deepest = features[-1].detach()
        loss3 = b * sum(
            (feature_l2(f, deepest) for f in features[: max(k_exits - 2, 0)]),
            start=logits[0].new_zeros(()),
        )
        if len(inputs.stage_maps) != len(teacher.stage_maps):
            raise ValueError(
                f"attention transfer pairs stages: the student has {len(inputs.stage_maps)}, "
                f"the teacher {len(teacher.stage_maps)}"
            )
        loss4 = b * sum(
            attention_transfer(x, tx)
            for x, tx in zip(inputs.stage_maps, teacher.stage_maps, strict=True)
        )
        ce_term, kl, feat = loss1, loss2, loss3 + loss4
        if self.reduction == "mean":
            ce_term, kl, feat = ce_term / k_exits, kl / k_exits, feat / k_exits
        return LossTerms(total=ce_term + kl + feat, ce=ce_term, kl=kl, feature=feat)


@register_loss("ckdf", fields=CKDF_FIELDS, needs=("teacher", "stage_maps"))
def ckdf(**kwargs: Any) -> nn.Module:
    """Seed 001's loss (module docstring)."""
    keys = ("ckdf_alpha", "ckdf_beta", "kd_temperature", "reduction", "label_smoothing")
    return CKDFLoss(**{k: kwargs[k] for k in (*keys, "num_exits") if k in kwargs})
