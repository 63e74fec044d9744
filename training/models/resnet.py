"""ResNet18/34/50/101/152: CIFAR stem (3×3, no max-pool, seed 004 §4.1) or ImageNet stem.

`groups` (seed 001 §3.4, the lightweight ResNet18) makes every 3×3 convolution inside the
residual blocks a group convolution; the 1×1 convolutions (shortcuts, bottleneck ends) and the
stem keep groups = 1, as the paper replaces "the 3×3 convolutions within the residual
structures" only. `resnet18_g2` is ResNet18 with groups = 2.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import StagedBackbone, check_groups, init_weights, scaled
from .registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        check_groups(groups, in_ch, ch)
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_ch, ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        check_groups(groups, ch)
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


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
    ) -> None:
        super().__init__()
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
                blocks.append(block(in_ch, ch, 2 if (i > 0 and j == 0) else 1, groups))
                in_ch = ch * block.expansion
            stages.append(nn.Sequential(*blocks))
            channels.append(in_ch)
        self.stages = nn.ModuleList(stages)
        self.stage_channels = channels
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)


@register_model(options=("groups",))
def resnet18(num_classes: int, **kw) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, **kw)


@register_model(options=("groups",))
def resnet34(num_classes: int, **kw) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, **kw)


@register_model(options=("groups",))
def resnet50(num_classes: int, **kw) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, **kw)


@register_model(options=("groups",))
def resnet101(num_classes: int, **kw) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes, **kw)


@register_model(options=("groups",))
def resnet152(num_classes: int, **kw) -> ResNet:
    return ResNet(Bottleneck, (3, 8, 36, 3), num_classes, **kw)


@register_model
def resnet18_g2(num_classes: int, **kw) -> ResNet:
    """Seed 001 §3.4's lightweight ResNet18: groups = 2 in every residual 3×3 convolution."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, groups=2, **kw)
