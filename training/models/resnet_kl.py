"""ResNet-KL (seed 000): a ResNet18 of depthwise-separable residual blocks with T-ReLU, whose
stages close with a multi-scale residual block fused with an attention branch ("Mul Block").

Seed 000 gives the parts but not their wiring (its Fig. 3.1 is missing). The readings taken:

- SepConv (eq. 5): depthwise k×k, then pointwise 1×1, then BN. It replaces both 3×3
  convolutions of every residual block (the paper does not say which convolutions; these are
  the only spatial ones). The stem stays a plain 3×3 conv and the shortcuts 1×1 convs.
- T-ReLU (eq. 6) is the activation throughout (`--act relu` swaps it out for the ablation).
- Mul Block: the *last* block of every stage. "Different sizes of convolution kernels at each
  layer" is read as parallel depthwise kernels 3×3, 5×5 and 7×7 on the block's input, summed
  (one pointwise conv then mixes them), the rest being a SepConv residual block. "The residual
  module's output, after passing through an attention mechanism, is fused with itself" is read
  as out = r + r·σ(SE(r)) with a squeeze-and-excitation branch (reduction 4), before the
  shortcut is added: the attention re-weights the channels and the sum keeps the plain path.
- Depths (2, 2, 2, 2) and widths 64..512 of ResNet18: stage s = [SepConv block (stride), Mul
  Block]. The ST layer lives in the exit heads ("st", `training.models.exits.STExit`) and the
  logit + feature distillation in the "resnet_kl" loss.

Block-internal widths (`widths`, site → channels) are what structured pruning
(`training.prune`) shrinks; residual widths stay, so the adds and the exit heads keep fitting.
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import TReLU
from .backbone import StagedBackbone, init_weights, scaled
from .registry import register_model
from .resnet import _shortcut

MUL_KERNELS = (3, 5, 7)
SE_REDUCTION = 4


def depthwise(channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel, stride, kernel // 2, groups=channels, bias=False)


def pointwise(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, bias=False)


class SepBasicBlock(nn.Module):
    """ResNet basic block with each 3×3 conv a SepConv (eq. 5): dw3×3(stride) → pw → BN → act →
    dw3×3 → pw → BN, plus the shortcut, then act. `mid` = the width between the two SepConvs."""

    def __init__(self, in_ch: int, ch: int, stride: int, mid: int | None = None) -> None:
        super().__init__()
        mid = ch if mid is None else mid
        self.dw1 = depthwise(in_ch, 3, stride)
        self.pw1 = pointwise(in_ch, mid)
        self.bn1 = nn.BatchNorm2d(mid)
        self.dw2 = depthwise(mid, 3)
        self.pw2 = pointwise(mid, ch)
        self.bn2 = nn.BatchNorm2d(ch)
        self.act = TReLU()
        self.shortcut = _shortcut(in_ch, ch, stride)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.pw1(self.dw1(x))))
        return self.bn2(self.pw2(self.dw2(out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.residual(x) + self.shortcut(x))

    def prune_sites(self) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        """Channel sites structured pruning may shrink: name → (producers, consumers)."""
        # dw2 is depthwise: one filter per channel, so it shrinks with the channels it carries.
        return {"mid": (("pw1", "bn1", "dw2"), ("pw2",))}


class SqueezeExcite(nn.Module):
    """Channel attention: global pool → 1×1 conv (C/r) → act → 1×1 conv (C) → sigmoid."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.act = TReLU()
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = nn.functional.adaptive_avg_pool2d(x, 1)
        return torch.sigmoid(self.expand(self.act(self.reduce(w))))


class MulBlock(nn.Module):
    """Multi-scale SepConv residual block fused with an attention branch (seed 000 §II.A).

    r = BN(pw(dw3(act(BN(pw(Σ_k dw_k(x))))))) with k ∈ `kernels`; out = act(r + r·SE(r) +
    shortcut(x)). `mid` = the width between the two pointwise convs.
    """

    def __init__(
        self,
        in_ch: int,
        ch: int,
        stride: int,
        mid: int | None = None,
        kernels: tuple[int, ...] = MUL_KERNELS,
    ) -> None:
        super().__init__()
        mid = ch if mid is None else mid
        self.scales = nn.ModuleList(depthwise(in_ch, k, stride) for k in kernels)
        self.pw1 = pointwise(in_ch, mid)
        self.bn1 = nn.BatchNorm2d(mid)
        self.dw2 = depthwise(mid, 3)
        self.pw2 = pointwise(mid, ch)
        self.bn2 = nn.BatchNorm2d(ch)
        self.attention = SqueezeExcite(ch)
        self.act = TReLU()
        self.shortcut = _shortcut(in_ch, ch, stride)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        multi = self.scales[0](x)
        for conv in self.scales[1:]:
            multi = multi + conv(x)
        out = self.act(self.bn1(self.pw1(multi)))
        return self.bn2(self.pw2(self.dw2(out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.residual(x)
        return self.act(r + r * self.attention(r) + self.shortcut(x))

    def prune_sites(self) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        return {"mid": (("pw1", "bn1", "dw2"), ("pw2",))}


class ResNetKL(StagedBackbone):
    def __init__(
        self,
        depths: tuple[int, ...],
        num_classes: int,
        width: float = 1.0,
        stem: str = "cifar",
        in_chans: int = 3,
        widths: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        widths = dict(widths or {})
        base = scaled(64, width)
        if stem == "cifar":
            conv = nn.Conv2d(in_chans, base, 3, 1, 1, bias=False)
            self.stem = nn.Sequential(conv, nn.BatchNorm2d(base), TReLU())
        else:
            conv = nn.Conv2d(in_chans, base, 7, 2, 3, bias=False)
            self.stem = nn.Sequential(conv, nn.BatchNorm2d(base), TReLU(), nn.MaxPool2d(3, 2, 1))
        stages, channels, in_ch = [], [], base
        for i, depth in enumerate(depths):
            ch = scaled(64 * 2**i, width)
            blocks: list[nn.Module] = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                mid = widths.pop(f"stages.{i}.{j}.mid", None)
                kind = MulBlock if j == depth - 1 else SepBasicBlock
                blocks.append(kind(in_ch, ch, stride, mid=mid))
                in_ch = ch
            stages.append(nn.Sequential(*blocks))
            channels.append(ch)
        if widths:
            raise ValueError(f"widths name no site of this ResNet-KL: {sorted(widths)}")
        self.stages = nn.ModuleList(stages)
        self.stage_channels = channels
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)


@register_model(options=("widths",))
def resnet18_kl(num_classes: int, **kw) -> ResNetKL:
    """Seed 000's ResNet-KL on ResNet18's depths (see the module docstring for the readings)."""
    return ResNetKL((2, 2, 2, 2), num_classes, **kw)
