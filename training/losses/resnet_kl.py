"""ResNet-KL's loss (seed 000): logit distillation (eq. 2) + the network's CE + feature
distillation through the ST layer.

For K exits with logits out_i (i = K the deepest, "last"), the deepest-shaped maps M_i that the
exit heads' ST layers produce from each stage (M_K = the deepest stage's own map), target y:

    L = R [ Σ_{i<K} ( x·Cross(out_i, last) + (1 − x)·Cross(out_i, y) )       (eq. 2)
            + Cross(out_K, y)                                               (network loss)
            + λ·Σ_{i<K} MSE(M_i, M_K) ]                                      (feature loss)

Readings where the paper is silent (SEED_METHODS.md, 000):
- Cross(out_i, last) is the cross-entropy to the detached softmax of the deepest logits at
  temperature 1 (eq. 2 names no temperature), x = `alpha`;
- the feature loss is the mean squared error over every element of the maps, the deepest map
  detached, weighted by λ = `lam` (no weight is printed; λ = 0 turns it off);
- an ST map of another resolution than M_K (an exit inside a stage, whose head walks one
  halving short) is average-pooled to M_K's size: the ST layer's "average pooling";
- R is the run's `loss_reduction` (sum over exits, or their mean), as for every loss here.

y may be class indices or a row of class probabilities (CutMix's mixed targets, `label_smoothing`
applies to both): every term is linear in y, so a mixed row trains as the mix of its two labels.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from .inputs import ExitLoss, LossInputs
from .registry import register_loss
from .self_distillation import LossTerms, check_common, soft_cross_entropy


class ResNetKLLoss(ExitLoss):
    """Eq. 2 plus the feature loss over the exits' maps (`needs` maps: the engine runs the
    network with `with_maps=True` and passes `MultiExitOutput.maps`)."""

    needs = frozenset({"maps"})

    def __init__(
        self,
        alpha: float = 0.3,
        lam: float = 0.0,
        reduction: str = "sum",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (eq. 2's x) must be in [0, 1], got {alpha}")
        if lam < 0:
            raise ValueError(f"lambda (feature weight) must be ≥ 0, got {lam}")
        check_common(reduction, label_smoothing)
        self.alpha, self.lam = alpha, lam
        self.reduction, self.label_smoothing = reduction, label_smoothing

    def forward(self, inputs: LossInputs) -> LossTerms:
        """`inputs.maps`: K maps N×C×h×w (the last the deepest); `inputs.alpha`/`lam` override
        the configured weights (the engine zeroes them for the last `distill_off_epochs`)."""
        logits, target = inputs.logits, inputs.target
        assert inputs.maps is not None  # needs maps
        features = inputs.maps
        x = self.alpha if inputs.alpha is None else inputs.alpha
        lam = self.lam if inputs.lam is None else inputs.lam
        k_exits = len(logits)
        last = F.softmax(logits[-1].detach(), dim=1)
        deepest = features[-1].detach()
        ce = F.cross_entropy(logits[-1], target, label_smoothing=self.label_smoothing)
        kl = logits[0].new_zeros(())
        feat = logits[0].new_zeros(())
        for i in range(k_exits - 1):
            ce = ce + (1 - x) * F.cross_entropy(
                logits[i], target, label_smoothing=self.label_smoothing
            )
            if x > 0:
                kl = kl + x * soft_cross_entropy(logits[i], last, 1.0)
            if lam > 0:
                fmap = features[i]
                if fmap.shape[-2:] != deepest.shape[-2:]:
                    fmap = F.adaptive_avg_pool2d(fmap, deepest.shape[-2:])
                feat = feat + F.mse_loss(fmap, deepest)
        feat = lam * feat
        if self.reduction == "mean":
            ce, kl, feat = ce / k_exits, kl / k_exits, feat / k_exits
        return LossTerms(total=ce + kl + feat, ce=ce, kl=kl, feature=feat)


@register_loss("resnet_kl", fields=("alpha", "lam", "distill_off_epochs"), uses_maps=True)
def resnet_kl(
    alpha: float = 0.3,
    lam: float = 0.0,
    reduction: str = "sum",
    label_smoothing: float = 0.0,
    **_: object,
) -> nn.Module:
    """Seed 000's loss (module docstring); needs exit heads with an aligned map (st, lite,
    attention)."""
    return ResNetKLLoss(alpha=alpha, lam=lam, reduction=reduction, label_smoothing=label_smoothing)
