"""Wide ResNet (Zagoruyko & Komodakis): pre-activation blocks, three stages."""

from __future__ import annotations

import torch
from torch import nn

from .backbone import StagedBackbone, check_widths_used, init_weights, scaled, take_widths
from .registry import register_model


class WideBlock(nn.Module):
    def __init__(
        self, in_ch: int, ch: int, stride: int, dropout: float, mid: int | None = None
    ) -> None:
        super().__init__()
        mid = ch if mid is None else mid
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, ch, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_ch == ch
            else nn.Conv2d(in_ch, ch, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        shortcut = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(pre)
        return out + shortcut

    def prune_sites(self) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        """The width between the two 3×3 convs (conv1's rows and bn2 make it, conv2 reads it)."""
        return {"mid": (("conv1", "bn2"), ("conv2",))}


class WideResNet(StagedBackbone):
    def __init__(
        self,
        depth: int,
        widen: int,
        num_classes: int,
        width: float = 1.0,
        stem: str = "cifar",
        in_chans: int = 3,
        dropout: float = 0.0,
        widths: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        widths = take_widths(widths)
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n + 4")
        n = (depth - 4) // 6
        base = scaled(16, width)
        stride = 1 if stem == "cifar" else 2
        self.stem = nn.Conv2d(in_chans, base, 3, stride, 1, bias=False)
        stages, channels, in_ch = [], [], base
        for i in range(3):
            ch = scaled(16 * widen * 2**i, width)
            blocks: list[nn.Module] = [
                WideBlock(
                    in_ch if j == 0 else ch,
                    ch,
                    2 if (i > 0 and j == 0) else 1,
                    dropout,
                    mid=widths.pop(f"stages.{i}.{j}.mid", None),
                )
                for j in range(n)
            ]
            if i == 2:  # pre-activation nets end with BN-ReLU before pooling
                blocks += [nn.BatchNorm2d(ch), nn.ReLU(inplace=False)]
            stages.append(nn.Sequential(*blocks))
            channels.append(ch)
            in_ch = ch
        check_widths_used(widths, "this WideResNet")
        self.stages = nn.ModuleList(stages)
        self.stage_channels = channels
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)


@register_model(options=("widths",))
def wide_resnet16_4(num_classes: int, **kw) -> WideResNet:
    return WideResNet(16, 4, num_classes, **kw)


@register_model(options=("widths",))
def wide_resnet28_10(num_classes: int, **kw) -> WideResNet:
    return WideResNet(28, 10, num_classes, **kw)


@register_model(options=("widths",))
def wide_resnet40_2(num_classes: int, **kw) -> WideResNet:
    """WRN-40-2: seed 004 §4.6's pruning experiment (2.2 M parameters on CIFAR)."""
    return WideResNet(40, 2, num_classes, **kw)
