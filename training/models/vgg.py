"""VGG11/13/16/19 with batch norm as staged backbones (seed 001 §3.4), and their group-conv
variants.

The five modules the paper splits each VGG into are the five stages (exits after any of them):
convolutions per module 1,1,2,2,2 (VGG11), 2,2,2,2,2 (13), 2,2,3,3,3 (16), 2,2,4,4,4 (19), widths
64, 128, 256, 512, 512, each module ending in a 2×2 max-pool. `groups` (`*_bn_g2`: groups = 2)
makes every convolution of the last two modules a group convolution, as §3.4 does.

Readings where the paper is silent:
- the classifier: CIFAR VGGs as in the self-distillation code bases, global average pool + one
  FC on the 512 features (on 32×32 inputs the last map is already 1×1), not torchvision's
  4096-wide ImageNet classifier, which would hold ~90 % of the parameters;
- each module's max-pool closes the module, so an exit after module i sees the pooled map; the
  pool rounds up (`ceil_mode`), so inputs smaller than 32×32 still reach a 1×1 map;
- VGG has no stem: `stem` is accepted for the common interface and must be "cifar" or
  "imagenet"; both build the same network (an ImageNet-size input only ends on a larger map).
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import (
    PruneSite,
    StagedBackbone,
    check_groups,
    check_widths_used,
    init_weights,
    scaled,
    take_widths,
)
from .registry import register_model

# Convolutions per module (stage) of each depth; every module ends in a max-pool.
VGG_MODULES: dict[int, tuple[int, int, int, int, int]] = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
VGG_WIDTHS = (64, 128, 256, 512, 512)
GROUPED_MODULES = (3, 4)  # 0-based: the last two modules take the group convolutions


class ConvBNAct(nn.Module):
    """3×3 conv (groups), BN, ReLU and, closing a module, a 2×2 max-pool: one VGG layer, one
    block an exit may follow."""

    def __init__(self, in_ch: int, out_ch: int, groups: int = 1, pool: bool = False) -> None:
        super().__init__()
        check_groups(groups, in_ch, out_ch)
        self.conv = nn.Conv2d(in_ch, out_ch, 3, 1, 1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.conv(x))))


class VGG(StagedBackbone):
    def __init__(
        self,
        depth: int,
        num_classes: int,
        width: float = 1.0,
        stem: str = "cifar",
        in_chans: int = 3,
        groups: int = 1,
        widths: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        widths = take_widths(widths)
        if depth not in VGG_MODULES:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_MODULES)}, got {depth}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.stem = nn.Identity()
        stages, channels, in_ch = [], [], in_chans
        for i, (convs, base) in enumerate(zip(VGG_MODULES[depth], VGG_WIDTHS, strict=True)):
            ch = scaled(base, width)
            g = groups if i in GROUPED_MODULES else 1
            layers = []
            for j in range(convs):
                last = j == convs - 1
                # A module's inner layers may be pruned; its last keeps the stage width.
                out = ch if last else widths.pop(f"stages.{i}.{j}.out", ch)
                layers.append(ConvBNAct(in_ch, out, g, pool=last))
                in_ch = out
            stages.append(nn.Sequential(*layers))
            channels.append(ch)
        check_widths_used(widths, f"VGG{depth}")
        self.stages = nn.ModuleList(stages)
        self.stage_channels = channels
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def prune_sites(self) -> dict[str, PruneSite]:
        """The outputs of every layer but a module's last (the next layer of the module reads
        them); module outputs keep their width, so exit heads keep theirs."""
        sites: dict[str, PruneSite] = {}
        for i, stage in enumerate(self.stages):
            for j in range(len(stage) - 1):
                at = f"stages.{i}"
                sites[f"{at}.{j}.out"] = (
                    (f"{at}.{j}.conv", f"{at}.{j}.bn"),
                    (f"{at}.{j + 1}.conv",),
                )
        return sites


@register_model(options=("groups", "widths"))
def vgg11_bn(num_classes: int, **kw) -> VGG:
    return VGG(11, num_classes, **kw)


@register_model(options=("groups", "widths"))
def vgg13_bn(num_classes: int, **kw) -> VGG:
    return VGG(13, num_classes, **kw)


@register_model(options=("groups", "widths"))
def vgg16_bn(num_classes: int, **kw) -> VGG:
    return VGG(16, num_classes, **kw)


@register_model(options=("groups", "widths"))
def vgg19_bn(num_classes: int, **kw) -> VGG:
    return VGG(19, num_classes, **kw)


@register_model
def vgg11_bn_g2(num_classes: int, **kw) -> VGG:
    """VGG11-BN with groups = 2 in the last two modules (seed 001 §3.4)."""
    return VGG(11, num_classes, groups=2, **kw)


@register_model
def vgg13_bn_g2(num_classes: int, **kw) -> VGG:
    """VGG13-BN with groups = 2 in the last two modules (seed 001 §3.4)."""
    return VGG(13, num_classes, groups=2, **kw)


@register_model
def vgg16_bn_g2(num_classes: int, **kw) -> VGG:
    """VGG16-BN with groups = 2 in the last two modules (seed 001 §3.4)."""
    return VGG(16, num_classes, groups=2, **kw)


@register_model
def vgg19_bn_g2(num_classes: int, **kw) -> VGG:
    """VGG19-BN with groups = 2 in the last two modules (seed 001 §3.4)."""
    return VGG(19, num_classes, groups=2, **kw)
