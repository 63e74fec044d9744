"""What every backbone exposes so the multi-exit wrapper can cut it into stages."""

from __future__ import annotations

import torch
from torch import nn


class StagedBackbone(nn.Module):
    """stem → stages[0..S-1] → head (global pool + fc).

    Subclasses fill `stem`, `stages`, `stage_channels` (output channels of each stage) and `fc`.
    `forward` is the plain single-graph model.
    """

    stem: nn.Module
    stages: nn.ModuleList
    stage_channels: list[int]
    fc: nn.Linear

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def feature_dim(self) -> int:
        return self.stage_channels[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature map → (pooled feature vector, logits)."""
        feat = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return feat, self.fc(feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))[1]

    def prune_sites(self) -> dict[str, PruneSite]:
        """Channel sets structured pruning may shrink (`training.prune`): site name →
        (producers, consumers), module paths under the backbone. Producers make the channels
        (a conv's output rows, a BN, a depthwise conv carrying them); consumers read them (a
        conv's input columns). Collected from every block that has `prune_sites()`, named
        "stages.{s}.{j}.{local}"; the backbone's constructor takes `widths` keyed the same way.
        """
        sites: dict[str, PruneSite] = {}
        for s, stage in enumerate(self.stages):
            for j, block in enumerate(stage):
                local_sites = getattr(block, "prune_sites", None)
                if local_sites is None:
                    continue
                at = f"stages.{s}.{j}"
                for local, (producers, consumers) in local_sites().items():
                    sites[f"{at}.{local}"] = (
                        tuple(f"{at}.{m}" for m in producers),
                        tuple(f"{at}.{m}" for m in consumers),
                    )
        return sites


# A prunable channel set: (producer module paths, consumer module paths).
PruneSite = tuple[tuple[str, ...], tuple[str, ...]]


def take_widths(widths: dict[str, int] | None) -> dict[str, int]:
    """A mutable copy of a `widths` argument (constructors pop the sites they build)."""
    return dict(widths or {})


def check_widths_used(widths: dict[str, int], arch: str) -> None:
    """ValueError when `widths` names sites the constructor did not build."""
    if widths:
        raise ValueError(f"widths name no prunable site of {arch}: {sorted(widths)[:3]}")


def scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier (at least 4)."""
    return max(4, int(round(channels * width)))


def check_groups(groups: int, *channels: int) -> None:
    """ValueError unless `groups` divides every one of `channels` (a grouped conv's in/out)."""
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(
            f"groups {groups} do not divide {bad[0]} channels; choose groups dividing every "
            "width (a power of two at the usual widths)"
        )


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
