"""MobileNetV2 with a CIFAR stem (stride 1) grouped into four resolution stages."""

from __future__ import annotations

import torch
from torch import nn

from .backbone import StagedBackbone, init_weights, scaled
from .registry import register_model


def _conv_bn(in_ch: int, out_ch: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn(in_ch, hidden, 1, 1)]
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


# (expansion, channels, repeats, stride) grouped by the stage each ends in.
_SETTINGS = (
    ((1, 16, 1, 1), (6, 24, 2, 1)),
    ((6, 32, 3, 2),),
    ((6, 64, 4, 2), (6, 96, 3, 1)),
    ((6, 160, 3, 2), (6, 320, 1, 1)),
)


class MobileNetV2(StagedBackbone):
    def __init__(
        self, num_classes: int, width: float = 1.0, stem: str = "cifar", in_chans: int = 3
    ) -> None:
        super().__init__()
        first = scaled(32, width)
        self.stem = _conv_bn(in_chans, first, 3, 1 if stem == "cifar" else 2)
        stages, channels, in_ch = [], [], first
        for i, group in enumerate(_SETTINGS):
            blocks: list[nn.Module] = []
            for expand, ch, repeats, stride in group:
                out_ch = scaled(ch, width)
                if stem == "imagenet" and i == 0 and ch == 24:
                    stride = 2
                for j in range(repeats):
                    blocks.append(InvertedResidual(in_ch, out_ch, stride if j == 0 else 1, expand))
                    in_ch = out_ch
            if i == len(_SETTINGS) - 1:
                last = max(1280, scaled(1280, width)) if width > 1.0 else scaled(1280, width)
                blocks.append(_conv_bn(in_ch, last, 1, 1))
                in_ch = last
            stages.append(nn.Sequential(*blocks))
            channels.append(in_ch)
        self.stages = nn.ModuleList(stages)
        self.stage_channels = channels
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)


@register_model
def mobilenetv2(num_classes: int, **kw) -> MobileNetV2:
    return MobileNetV2(num_classes, **kw)
