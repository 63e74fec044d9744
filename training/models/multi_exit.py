"""The multi-exit network: a staged backbone cut into K segments, each with an exit."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .backbone import StagedBackbone
from .exits import FinalExit, create_exit_head


class MultiExitOutput(NamedTuple):
    logits: list[torch.Tensor]  # K tensors N×C, shallowest first
    features: list[torch.Tensor]  # K tensors N×D (D = deepest feature width)


def stage_groups(num_stages: int, exits: int) -> list[list[int]]:
    """Which backbone stages each of the K segments holds.

    With K < S the first S−K+1 stages merge into segment 1, so the deep exits keep their
    positions after the last stages (seed 004 attaches after each stage when K = S).
    """
    if not 1 <= exits <= num_stages:
        raise ValueError(f"exits must be in 1..{num_stages} for this backbone, got {exits}")
    first = num_stages - exits + 1
    return [list(range(first))] + [[s] for s in range(first, num_stages)]


class MultiExitNetwork(nn.Module):
    """K exits over a `StagedBackbone`.

    Segment k = stem (k = 1) + its stages + exit head k. `forward` returns every exit's logits
    and feature vector; `forward_stage(k, x)` runs segment k alone on segment k−1's feature map
    and is what export uses; `forward_backbone` is the plain single-exit model.
    """

    def __init__(self, backbone: StagedBackbone, exits: int, head: str = "attention") -> None:
        super().__init__()
        self.backbone = backbone
        self.num_exits = exits
        self.head_kind = head
        self.groups = stage_groups(backbone.num_stages, exits)
        channels = [backbone.stage_channels[g[-1]] for g in self.groups]
        heads: list[nn.Module] = [
            create_exit_head(head, channels[k:], backbone.fc.out_features) for k in range(exits - 1)
        ]
        heads.append(FinalExit(backbone))
        self.heads = nn.ModuleList(heads)
        self.segment_channels = channels

    @property
    def num_classes(self) -> int:
        return self.backbone.fc.out_features

    @property
    def feature_dim(self) -> int:
        """Width D of every exit's feature vector (the deepest stage's pooled features)."""
        return self.backbone.fc.in_features

    def run_stage(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Backbone part of segment k (1-based): features only, no exit head."""
        if k == 1:
            x = self.backbone.stem(x)
        for s in self.groups[k - 1]:
            x = self.backbone.stages[s](x)
        return x

    def forward_stage(self, k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment k on the image (k = 1) or segment k−1's features → (features, exit-k logits)."""
        if not 1 <= k <= self.num_exits:
            raise IndexError(f"segment {k} out of range 1..{self.num_exits}")
        feats = self.run_stage(k, x)
        return feats, self.heads[k - 1](feats)[1]

    def forward(self, x: torch.Tensor) -> MultiExitOutput:
        logits, features = [], []
        for k in range(1, self.num_exits + 1):
            x = self.run_stage(k, x)
            feat, out = self.heads[k - 1](x)
            logits.append(out)
            features.append(feat)
        return MultiExitOutput(logits, features)

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        """The plain model without exit heads (logits of exit K only)."""
        return self.backbone(x)
