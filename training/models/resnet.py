"""ResNet18/34/50/101/152: CIFAR stem (3×3, no max-pool, seed 004 §4.1) or ImageNet stem.

`groups` (seed 001 §3.4, the lightweight ResNet18) makes every 3×3 convolution inside the
residual blocks a group convolution; the 1×1 convolutions (shortcuts, bottleneck ends) and the
stem keep groups = 1, as the paper replaces "the 3×3 convolutions within the residual
structures" only. `resnet18_g2` is ResNet18 with groups = 2.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import (
    StagedBackbone,
    check_groups,
    check_widths_used,
    init_weights,
    scaled,
    take_widths,
)
from .registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        in_ch: int,
        ch: int,
        stride: int,
        groups: int = 1,
        widths: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        mid = (widths or {}).get("mid", ch)
        check_groups(groups, in_ch, ch, mid)
        self.conv1 = nn.Conv2d(in_ch, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, ch, 3, 1, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_ch, ch, stride)

    def prune_sites(self) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        """The width between the two 3×3 convs (the residual width stays: the add needs it)."""
        return {"mid": (("conv1", "bn1"), ("conv2",))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        in_ch: int,
        ch: int,
        stride: int,
        groups: int = 1,
        widths: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        mid1, mid2 = (widths or {}).get("mid1", ch), (widths or {}).get("mid2", ch)
        check_groups(groups, mid1, mid2)
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, mid1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid1)
        self.conv2 = nn.Conv2d(mid1, mid2, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid2)
        self.conv3 = nn.Conv2d(mid2, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))

    def prune_sites(self) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        """The two inner widths (after the 1×1 and after the 3×3 conv)."""
        return {"mid1": (("conv1", "bn1"), ("conv2",)), "mid2": (("conv2", "bn2"), ("conv3",))}


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ResNet(StagedBackbone):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: tuple[int, int, int, int],
        num_classes: int,
        width: float = 1.0,
        stem: str = "cifar",
        in_chans: int = 3,
        groups: int = 1,
        widths: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        widths = take_widths(widths)
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        base = scaled(64, width)
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU(True)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, base, 7, 2, 3, bias=False),
                nn.BatchNorm2d(base),
                nn.ReLU(True),
                nn.MaxPool2d(3, 2, 1),
            )
        stages, channels, in_ch = [], [], base
        for i, depth in enumerate(depths):
            ch = scaled(64 * 2**i, width)
            blocks = []
            for j in range(depth):
                local = {
                    site.rsplit(".", 1)[1]: widths.pop(site)
                    for site in [k for k in widths if k.startswith(f"stages.{i}.{j}.")]
                }
                unit = block(in_ch, ch, 2 if (i > 0 and j == 0) else 1, groups, local)
                check_widths_used({k: v for k, v in local.items() if k not in unit.prune_sites()},
                                  f"block stages.{i}.{j}")  # fmt: skip
                blocks.append(unit)
                in_ch = ch * block.expansion
            stages.append(nn.Sequential(*blocks))
            channels.append(in_ch)
        check_widths_used(widths, "this ResNet")
        self.stages = nn.ModuleList(stages)
        self.stage_channels = channels
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)


@register_model(options=("groups", "widths"))
def resnet18(num_classes: int, **kw) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, **kw)


@register_model(options=("groups", "widths"))
def resnet34(num_classes: int, **kw) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, **kw)


@register_model(options=("groups", "widths"))
def resnet50(num_classes: int, **kw) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, **kw)


@register_model(options=("groups", "widths"))
def resnet101(num_classes: int, **kw) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes, **kw)


@register_model(options=("groups", "widths"))
def resnet152(num_classes: int, **kw) -> ResNet:
    return ResNet(Bottleneck, (3, 8, 36, 3), num_classes, **kw)


@register_model
def resnet18_g2(num_classes: int, **kw) -> ResNet:
    """Seed 001 §3.4's lightweight ResNet18: groups = 2 in every residual 3×3 convolution."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, groups=2, **kw)
