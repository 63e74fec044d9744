"""Self-distillation (Zhang et al., "Be Your Own Teacher", ICCV 2019, eq. 3–6) with the options
that reproduce each public implementation of it.

For K exits with logits c_i and feature vectors F_i (i = 1..K, K = deepest), target y:

    L = R_i [ (1 − α)·CE(c_i, y) + α·D(c_ref,i, c_i) + λ·H(F_i, F_ref,i) ]   (i < K)
      + CE(c_K, y)                                                          (the deepest exit)

The deepest exit learns from labels only. Teacher sides are detached.

Options (which setting = which implementation):

- `reduction` R: ``sum`` (default) adds the K exits' terms, so the deepest CE has weight 1 as in
  a plain model: the authors' code (pytorch-self-distillation-final, train.py), BYOT's
  re-implementation and Self-KD-Lib's `byot.py` all sum. ``mean`` divides the total by K, as
  eq. (3) is printed; it trains the last stage and the final FC (reached only by CE_K) at 1/K
  of the learning rate with K× the relative weight decay.
- `distill` D: ``soft_ce`` = −Σ softmax(c_ref/T)·log_softmax(c_i/T), no T² (the authors' code,
  α = 0.3, T = 3); ``kl_t2`` = T²·KL(q_T(c_ref) ‖ q_T(c_i)) (Hinton et al.'s scaling; the paper
  as printed with α = 0.6 is this one). Both have the same gradient up to the factor T².
- `feature` H: ``none`` (the authors' released train.py has no feature term); ``l2`` = squared
  ℓ2 distance summed over feature dims, mean over the batch (the paper's eq. 3 as printed,
  λ = 0.04 on every shallow exit); ``adapter`` = non-squared ℓ2 distance ‖A_i F_i − F_ref‖ of
  a learned linear adapter A_i (per exit, D×D), mean over the batch, on the exits listed in
  `feature_exits` (the authors' journal code: λ = 0.03 on exits 1–2; it sums over the whole
  batch tensor with `torch.dist`, which is √N times larger than our per-row mean at equal
  per-row distances — state λ accordingly).
- `feature_exits`: 1-based shallow exits that get the hint (default: every shallow exit).
- `label_smoothing` ε on every CE term (0 = off).
- α and λ go to 0 for the last `distill_off_epochs` epochs (the engine passes them per step).

The reference ("distillation path", §3.1 / Table 7):
  deepest     c_ref,i = c_K
  ensemble    c_ref,i = mean_k q_T(c_k);  F_ref,i = mean_k F_k
  transitive  c_ref,i = c_{i+1}
  dense       Σ_{k>i} D(c_k, c_i) and Σ_{k>i} H(F_i, F_k)   (eq. 6)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .inputs import ExitLoss, LossInputs
from .registry import register_loss

PATHS = ("deepest", "ensemble", "transitive", "dense")
REDUCTIONS = ("sum", "mean")
DISTILL_TERMS = ("soft_ce", "kl_t2")
FEATURE_HINTS = ("none", "l2", "adapter")


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


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, t: float
) -> torch.Tensor:
    """−Σ p_teacher · log q_T(student), mean over the batch (KL plus the teacher's entropy)."""
    log_student = F.log_softmax(student_logits / t, dim=1)
    return -(teacher_probs * log_student).sum(dim=1).mean()


def distill_term(kind: str, student_logits: torch.Tensor, teacher_probs: torch.Tensor, t: float):
    if kind == "soft_ce":
        return soft_cross_entropy(student_logits, teacher_probs, t)
    return soft_kl(student_logits, teacher_probs, t) * t * t


def feature_l2(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared ℓ2 distance summed over feature dims, mean over the batch."""
    return (student - teacher).pow(2).sum(dim=1).mean()


def feature_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Non-squared ℓ2 distance per row, mean over the batch."""
    return (student - teacher).pow(2).sum(dim=1).clamp_min(1e-12).sqrt().mean()


def check_common(reduction: str, label_smoothing: float) -> None:
    """The options every loss takes: its reduction over exits and the CE label smoothing."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown loss reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def check_options(
    *,
    path: str,
    alpha: float,
    lam: float,
    temperature: float,
    reduction: str,
    distill: str,
    feature: str,
    feature_exits: Sequence[int] | None,
    label_smoothing: float,
    num_exits: int | None,
) -> None:
    """Every rule on the options, raised as ValueError with one clear sentence."""
    if path not in PATHS:
        raise ValueError(f"unknown distillation path {path!r}; valid: {', '.join(PATHS)}")
    check_common(reduction, label_smoothing)
    if distill not in DISTILL_TERMS:
        raise ValueError(
            f"unknown distillation term {distill!r}; valid: {', '.join(DISTILL_TERMS)}"
        )
    if feature not in FEATURE_HINTS:
        raise ValueError(f"unknown feature hint {feature!r}; valid: {', '.join(FEATURE_HINTS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if lam < 0:
        raise ValueError(f"lambda (feature weight) must be ≥ 0, got {lam}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if feature_exits is not None:
        if feature == "none":
            raise ValueError("feature_exits needs a feature hint (feature: l2 or adapter)")
        bad = [k for k in feature_exits if num_exits is not None and not 1 <= k < num_exits]
        if bad or len(set(feature_exits)) != len(feature_exits):
            top = "" if num_exits is None else f" (shallow exits are 1..{num_exits - 1})"
            raise ValueError(
                f"feature_exits {list(feature_exits)} name no distinct shallow exits{top}"
            )


class SelfDistillationLoss(ExitLoss):
    def __init__(
        self,
        path: str = "deepest",
        alpha: float = 0.3,
        lam: float = 0.0,
        temperature: float = 3.0,
        reduction: str = "sum",
        distill: str = "soft_ce",
        feature: str = "none",
        feature_exits: Sequence[int] | None = None,
        label_smoothing: float = 0.0,
        num_exits: int | None = None,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        check_options(
            path=path,
            alpha=alpha,
            lam=lam,
            temperature=temperature,
            reduction=reduction,
            distill=distill,
            feature=feature,
            feature_exits=feature_exits,
            label_smoothing=label_smoothing,
            num_exits=num_exits,
        )
        self.path, self.alpha, self.lam, self.temperature = path, alpha, lam, temperature
        self.reduction, self.distill, self.feature = reduction, distill, feature
        self.label_smoothing = label_smoothing
        self.feature_exits = tuple(feature_exits) if feature_exits is not None else None
        self.adapters: nn.ModuleDict | None = None
        if feature == "adapter":
            if num_exits is None or feature_dim is None:
                raise ValueError("the adapter hint needs num_exits and feature_dim")
            hinted = self.feature_exits or tuple(range(1, num_exits))
            # Learned parameters: the engine puts them in the optimizer and the checkpoint.
            self.adapters = nn.ModuleDict(
                {str(k): nn.Linear(feature_dim, feature_dim, bias=False) for k in hinted}
            )

    def _hinted(self, exit_index: int) -> bool:
        """exit_index is 1-based."""
        return self.feature_exits is None or exit_index in self.feature_exits

    def _hint(self, i: int, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.feature == "l2":
            return feature_l2(student, teacher)
        assert self.adapters is not None  # built in __init__ for feature == "adapter"
        return feature_distance(self.adapters[str(i + 1)](student), teacher)

    def forward(self, inputs: LossInputs) -> LossTerms:
        """`inputs.alpha`/`lam` override the configured weights (the engine zeroes them at
        the end)."""
        logits, features, target = inputs.logits, inputs.features, inputs.target
        alpha = self.alpha if inputs.alpha is None else inputs.alpha
        lam = self.lam if inputs.lam is None else inputs.lam
        t = self.temperature
        k_exits = len(logits)
        ce_terms = [
            F.cross_entropy(z, target, label_smoothing=self.label_smoothing) for z in logits
        ]
        soft = [F.softmax(z.detach() / t, dim=1) for z in logits]
        feats = [f.detach() for f in features]
        if self.path == "ensemble":
            ens_probs = torch.stack(soft).mean(0)
            ens_feat = torch.stack(feats).mean(0)
        ce = logits[0].new_zeros(())
        kl = logits[0].new_zeros(())
        feat = logits[0].new_zeros(())
        use_hint = self.feature != "none" and lam > 0
        for i in range(k_exits):
            if i == k_exits - 1:  # the deepest exit: labels only
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
            ce = ce + (1 - alpha) * ce_terms[i]
            if alpha > 0:
                kl = kl + alpha * sum(distill_term(self.distill, logits[i], p, t) for p, _ in pairs)
            if use_hint and self._hinted(i + 1):
                feat = feat + sum(self._hint(i, features[i], f) for _, f in pairs)
        feat = lam * feat
        if self.reduction == "mean":
            ce, kl, feat = ce / k_exits, kl / k_exits, feat / k_exits
        return LossTerms(total=ce + kl + feat, ce=ce, kl=kl, feature=feat)


class CrossEntropyExits(ExitLoss):
    """Plain CE over the exits it is given, summed (``mean``: divided by the exit count); one
    exit = the baseline backbone, where both reductions agree."""

    def __init__(self, reduction: str = "sum", label_smoothing: float = 0.0) -> None:
        super().__init__()
        check_common(reduction, label_smoothing)
        self.reduction, self.label_smoothing = reduction, label_smoothing

    def forward(self, inputs: LossInputs) -> LossTerms:
        logits, target = inputs.logits, inputs.target
        ce = sum(F.cross_entropy(z, target, label_smoothing=self.label_smoothing) for z in logits)
        if self.reduction == "mean":
            ce = ce / len(logits)
        zero = ce.new_zeros(())
        return LossTerms(total=ce, ce=ce, kl=zero, feature=zero)


# Which TrainConfig fields each loss reads; a field set for a loss that ignores it is an error
# (see training.cli). `label_smoothing` and `loss_reduction` apply to every loss.
SD_FIELDS = (
    "distill_path",
    "alpha",
    "lam",
    "temperature",
    "distill",
    "feature_hint",
    "feature_exits",
    "distill_off_epochs",
)


@register_loss("self_distillation", fields=SD_FIELDS)
def self_distillation(**kwargs: Any) -> nn.Module:
    """SelfDistillationLoss from the engine's keyword set (keys it does not take are ignored)."""
    takes = inspect.signature(SelfDistillationLoss).parameters
    return SelfDistillationLoss(**{k: v for k, v in kwargs.items() if k in takes})


@register_loss("baseline")
def baseline(reduction: str = "sum", label_smoothing: float = 0.0, **_: object) -> nn.Module:
    """Backbone only, CE: the model is built with one exit for this loss."""
    return CrossEntropyExits(reduction=reduction, label_smoothing=label_smoothing)


@register_loss("deep_supervision")
def deep_supervision(
    reduction: str = "sum", label_smoothing: float = 0.0, **_: object
) -> nn.Module:
    """CE on every exit, summed, no distillation (ablation: what the distillation terms add)."""
    return CrossEntropyExits(reduction=reduction, label_smoothing=label_smoothing)
