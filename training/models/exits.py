"""Exit heads, behind a small registry (`create_exit_head`, `EXIT_HEADS`).

- "attention" (default): seed 004 §3.2, attention module (Fig. 3a) + shallow classifier
  (Fig. 3b, two depthwise-pointwise pairs per halving).
- "lite": one depthwise-pointwise pair per halving and no attention. The seed's head is 4.7 %
  of a ResNet18×0.25's MACs but about a third of its onnxruntime CPU time at batch 1: per-node
  dispatch, not arithmetic, dominates such small tensors, and the attention's bilinear Resize
  alone costs as much as a stage convolution. "lite" keeps the same feature width (the L2 hint
  still compares like with like) with a third of the nodes.
- "pool": global pool, FC to the deepest width + ReLU (the hint's feature), FC: no
  convolution at all, ≈ 0.05 % of the MACs, for when rows that reach the last exit must cost
  about what the plain model does (docs/export-and-runtime.md measures the trade).
- "ckdf": seed 001's (CKDF) classifier: two-pair attention, SepConv bottleneck, an FC_layer
  on heads two or more halvings deep, FC.
- "st": seed 000's ST layer (ResNet-KL): the SepConv steps that resize a stage's map to the
  deepest map's width and resolution (004's align net without the attention, the reading
  SEED_METHODS suggests for the paper's "SepConv and average pooling layers"), then global
  pool and FC.

Heads with an aligned map (attention, lite, st) and the final exit return it as a third value
when called with `with_map=True` (`provides_map`): the deepest-shaped map a feature loss
compares (the "resnet_kl" loss); exported graphs never ask for it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def depthwise_pointwise(in_ch: int, out_ch: int, stride: int) -> list[nn.Module]:
    """Depthwise 3×3 (with `stride`), pointwise 1×1 to `out_ch`, BN, ReLU: the building block of
    every exit head here (a list, so heads keep flat, stable state-dict keys)."""
    return [
        nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False),
        nn.Conv2d(in_ch, out_ch, 1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


class SepConv(nn.Module):
    """Two depthwise-pointwise pairs; the first depthwise conv halves the resolution."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *depthwise_pointwise(in_ch, in_ch, stride), *depthwise_pointwise(in_ch, out_ch, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class AttentionModule(nn.Module):
    """Depthwise+pointwise downsample, bilinear upsample, sigmoid mask multiplied into x.
    `pairs` = 2: a second depthwise-pointwise pair (stride 1) after the first (seed 001)."""

    def __init__(self, channels: int, pairs: int = 1) -> None:
        super().__init__()
        layers = depthwise_pointwise(channels, channels, 2)
        for _ in range(pairs - 1):
            layers += depthwise_pointwise(channels, channels, 1)
        self.down = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = F.interpolate(self.down(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * torch.sigmoid(mask)


class ShallowExit(nn.Module):
    """Exit head for a shallow stage: attention, N = len(channel_path) - 1 SepConv blocks that
    walk the channel width up to the deepest stage's, global pool, FC.

    Returns (feature vector of the deepest width, logits) — the feature is what the L2 hint
    loss compares with the reference exit's feature (eq. 4).
    """

    def __init__(self, channel_path: list[int], num_classes: int) -> None:
        super().__init__()
        self.attention = AttentionModule(channel_path[0])
        self.align = nn.Sequential(
            *(SepConv(a, b) for a, b in zip(channel_path, channel_path[1:], strict=False))
        )
        self.fc = nn.Linear(channel_path[-1], num_classes)

    provides_map = True

    def forward(self, x: torch.Tensor, with_map: bool = False) -> tuple[torch.Tensor, ...]:
        x = self.align(self.attention(x))
        feat = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return (feat, self.fc(feat), x) if with_map else (feat, self.fc(feat))


class CKDFExit(nn.Module):
    """Seed 001's (CKDF) shallow classifier: attention of two depthwise-separable pairs (the
    first strided; upsample, sigmoid, multiply), a bottleneck of N = len(channel_path) − 1
    `SepConv` subgroups walking to the deepest width, global pool, then, for a head two or more
    halvings from the deepest stage (ResNet18's classifiers 1–2), an FC_layer to the deepest
    width (Linear + ReLU, the feature eq. 5 compares; [R] the activation is unstated), then FC.
    Returns (feature vector, logits[, aligned map])."""

    provides_map = True

    def __init__(self, channel_path: list[int], num_classes: int) -> None:
        super().__init__()
        self.attention = AttentionModule(channel_path[0], pairs=2)
        self.align = nn.Sequential(
            *(SepConv(a, b) for a, b in zip(channel_path, channel_path[1:], strict=False))
        )
        width = channel_path[-1]
        self.fc_layer: nn.Module = (
            nn.Sequential(nn.Linear(width, width), nn.ReLU())
            if len(channel_path) > 2
            else nn.Identity()
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, with_map: bool = False) -> tuple[torch.Tensor, ...]:
        aligned = self.align(self.attention(x))
        feat = self.fc_layer(torch.flatten(F.adaptive_avg_pool2d(aligned, 1), 1))
        return (feat, self.fc(feat), aligned) if with_map else (feat, self.fc(feat))


class DepthwisePointwise(nn.Module):
    """One strided depthwise-pointwise pair (MobileNet's block): a `lite` head's step."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(*depthwise_pointwise(in_ch, out_ch, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class LiteExit(nn.Module):
    """Exit head for a shallow stage with few graph nodes: one `DepthwisePointwise` per step
    of `channel_path`, global pool, FC. Returns (feature vector, logits) like `ShallowExit`."""

    def __init__(self, channel_path: list[int], num_classes: int) -> None:
        super().__init__()
        self.align = nn.Sequential(
            *(
                DepthwisePointwise(a, b)
                for a, b in zip(channel_path, channel_path[1:], strict=False)
            )
        )
        self.fc = nn.Linear(channel_path[-1], num_classes)

    provides_map = True

    def forward(self, x: torch.Tensor, with_map: bool = False) -> tuple[torch.Tensor, ...]:
        aligned = self.align(x)
        feat = torch.flatten(F.adaptive_avg_pool2d(aligned, 1), 1)
        return (feat, self.fc(feat), aligned) if with_map else (feat, self.fc(feat))


class STExit(nn.Module):
    """Seed 000's ST layer as an exit head: N = len(channel_path) - 1 `SepConv` steps (each
    halves the resolution and moves one stage width deeper) bring the map to the deepest map's
    shape, then global pool and FC. Returns (feature vector, logits[, aligned map])."""

    provides_map = True

    def __init__(self, channel_path: list[int], num_classes: int) -> None:
        super().__init__()
        self.align = nn.Sequential(
            *(SepConv(a, b) for a, b in zip(channel_path, channel_path[1:], strict=False))
        )
        self.fc = nn.Linear(channel_path[-1], num_classes)

    def forward(self, x: torch.Tensor, with_map: bool = False) -> tuple[torch.Tensor, ...]:
        aligned = self.align(x)
        feat = torch.flatten(F.adaptive_avg_pool2d(aligned, 1), 1)
        return (feat, self.fc(feat), aligned) if with_map else (feat, self.fc(feat))


class PoolExit(nn.Module):
    """Exit head with almost no graph: global pool, a fully connected layer to the deepest
    stage's width with ReLU (the L2 hint's feature), FC. Returns (feature vector, logits)."""

    def __init__(self, channel_path: list[int], num_classes: int) -> None:
        super().__init__()
        self.align = nn.Sequential(nn.Linear(channel_path[0], channel_path[-1]), nn.ReLU())
        self.fc = nn.Linear(channel_path[-1], num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.align(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return feat, self.fc(feat)


EXIT_HEADS: dict[str, type[nn.Module]] = {
    "attention": ShallowExit,
    "lite": LiteExit,
    "pool": PoolExit,
    "st": STExit,
    "ckdf": CKDFExit,
}


def head_provides_map(kind: str) -> bool:
    """Whether exit head `kind` returns its aligned map with `with_map=True`."""
    return bool(getattr(EXIT_HEADS.get(kind), "provides_map", False))


def create_exit_head(kind: str, channel_path: list[int], num_classes: int) -> nn.Module:
    """The exit head `kind` for a stage of width channel_path[0] (see the module docstring)."""
    if kind not in EXIT_HEADS:
        raise ValueError(f"unknown exit head {kind!r}; valid: {', '.join(sorted(EXIT_HEADS))}")
    return EXIT_HEADS[kind](channel_path, num_classes)


class FinalExit(nn.Module):
    """Exit K: the backbone's own head (global pool + its FC), shared, not copied."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.fc = backbone.fc

    provides_map = True

    def forward(self, x: torch.Tensor, with_map: bool = False) -> tuple[torch.Tensor, ...]:
        feat = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        # The deepest map itself is what the shallow heads' aligned maps are compared with.
        return (feat, self.fc(feat), x) if with_map else (feat, self.fc(feat))
