"""The multi-exit network: a staged backbone cut into K segments, each with an exit."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .activations import TReLU
from .backbone import StagedBackbone
from .exits import FinalExit, create_exit_head


class MultiExitOutput(NamedTuple):
    logits: list[torch.Tensor]  # K tensors N×C, shallowest first
    features: list[torch.Tensor]  # K tensors N×D (D = deepest feature width)
    # With `forward(x, with_maps=True)`: K maps of the deepest stage's width, the shallow
    # heads' aligned maps and the deepest stage's own map (for feature-map losses); else None.
    maps: list[torch.Tensor] | None = None


# Units that finish the block before them (a pre-activation net's closing BN-ReLU): never an
# exit point of their own, they travel with the preceding block.
_TRAILING = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, TReLU, nn.Identity)


def backbone_blocks(backbone: StagedBackbone) -> list[tuple[str, list[tuple[int, int]]]]:
    """The blocks an exit may follow, in order: (name, units) with name "layer{s}.{j}" (stage s
    1-based, block j 0-based, as torchvision names ResNet blocks) and units the (stage, child)
    positions the block runs."""
    blocks: list[tuple[str, list[tuple[int, int]]]] = []
    for s, stage in enumerate(backbone.stages):
        children = list(stage.children()) if isinstance(stage, nn.Sequential) else [stage]
        j = 0
        for c, child in enumerate(children):
            if isinstance(child, _TRAILING) and blocks and blocks[-1][1][-1][0] == s:
                blocks[-1][1].append((s, c))
                continue
            blocks.append((f"layer{s + 1}.{j}", [(s, c)]))
            j += 1
    return blocks


def block_names(arch: str) -> list[str]:
    """Names of the blocks `--exit-blocks` may list for a registry backbone (1-based order)."""
    from .registry import create_backbone

    return [name for name, _ in backbone_blocks(create_backbone(arch, 10, width=0.125))]


def parse_exit_blocks(
    spec: str | list[int | str] | tuple[int | str, ...], arch: str
) -> tuple[int, ...]:
    """`--exit-blocks` as 1-based block indices: "1,2,3,5,7" or names ("layer2.1"), strictly
    increasing, inside the backbone; the last block (the final exit) may be listed or not.
    ValueError names the valid range and names."""
    names = block_names(arch)
    items = [x.strip() for x in spec.split(",")] if isinstance(spec, str) else list(spec)
    indices = []
    for item in items:
        if isinstance(item, int) or str(item).lstrip("-").isdigit():
            indices.append(int(item))
        elif str(item) in names:
            indices.append(names.index(str(item)) + 1)
        else:
            raise ValueError(
                f"--exit-blocks: {item!r} is no block of {arch}; use 1..{len(names)} or "
                f"{', '.join(names)}"
            )
    if not indices:
        raise ValueError("--exit-blocks lists no block")
    bad = [i for i in indices if not 1 <= i <= len(names)]
    if bad:
        raise ValueError(f"--exit-blocks {bad} outside {arch}'s blocks 1..{len(names)}")
    if any(b <= a for a, b in zip(indices, indices[1:], strict=False)):
        raise ValueError(f"--exit-blocks must be strictly increasing, got {indices}")
    if indices[-1] == len(names):  # the final exit follows the last block anyway
        indices = indices[:-1]
    return tuple(indices)


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

    def __init__(
        self,
        backbone: StagedBackbone,
        exits: int,
        head: str = "attention",
        exit_blocks: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head_kind = head
        blocks = backbone_blocks(backbone)
        if exit_blocks is None:
            # Exits at stage ends; with K < S the first S−K+1 stages merge into segment 1.
            self.groups = stage_groups(backbone.num_stages, exits)
            ends = [
                max(i for i, (_, units) in enumerate(blocks) if units[0][0] == g[-1])
                for g in self.groups
            ]
        else:
            if any(not 1 <= b < len(blocks) for b in exit_blocks) or list(exit_blocks) != sorted(
                set(exit_blocks)
            ):
                raise ValueError(
                    f"exit_blocks must increase strictly inside 1..{len(blocks) - 1}, got "
                    f"{list(exit_blocks)}"
                )
            if exits != len(exit_blocks) + 1:
                raise ValueError(
                    f"{len(exit_blocks)} exit blocks make {len(exit_blocks) + 1} exits"
                )
            ends = [b - 1 for b in exit_blocks] + [len(blocks) - 1]
            self.groups = []
        self.num_exits = exits
        self.exit_blocks = None if exit_blocks is None else tuple(exit_blocks)
        starts = [0] + [e + 1 for e in ends[:-1]]
        self.segment_units = [
            [u for b in range(a, e + 1) for u in blocks[b][1]]
            for a, e in zip(starts, ends, strict=True)
        ]
        self.exit_points = tuple(blocks[e][0] for e in ends)
        exit_stages = [blocks[e][1][0][0] for e in ends]
        channels = [self._unit_channels(blocks[e][1]) for e in ends]
        heads: list[nn.Module] = [
            create_exit_head(
                head,
                # The head walks the remaining resolution halvings up to the deepest width.
                [channels[k]] + list(backbone.stage_channels[exit_stages[k] + 1 :]),
                backbone.fc.out_features,
            )
            for k in range(exits - 1)
        ]
        heads.append(FinalExit(backbone))
        self.heads = nn.ModuleList(heads)
        self.segment_channels = channels

    def _unit_channels(self, units: list[tuple[int, int]]) -> int:
        """Output channels after `units`: the stage's width at its end, else the last conv's."""
        stage, child = units[-1]
        stage_mod = self.backbone.stages[stage]
        if not isinstance(stage_mod, nn.Sequential) or child == len(stage_mod) - 1:
            return self.backbone.stage_channels[stage]
        last = None
        for m in stage_mod[child].modules():
            if isinstance(m, nn.BatchNorm2d):
                last = m.num_features
            elif isinstance(m, nn.Conv2d):
                last = m.out_channels
        if last is None:
            raise ValueError(f"cannot tell the width after block {stage}.{child}")
        return last

    def segment_modules(self, k: int) -> list[nn.Module]:
        """The backbone modules segment k (1-based) runs, in order (the stem first for k = 1)."""
        mods: list[nn.Module] = [self.backbone.stem] if k == 1 else []
        for s, c in self.segment_units[k - 1]:
            stage = self.backbone.stages[s]
            mods.append(stage[c] if isinstance(stage, nn.Sequential) else stage)
        return mods

    @property
    def num_classes(self) -> int:
        return self.backbone.fc.out_features

    @property
    def feature_dim(self) -> int:
        """Width D of every exit's feature vector (the deepest stage's pooled features)."""
        return self.backbone.fc.in_features

    def run_stage(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Backbone part of segment k (1-based): features only, no exit head."""
        for module in self.segment_modules(k):
            x = module(x)
        return x

    def forward_stage(self, k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment k on the image (k = 1) or segment k−1's features → (features, exit-k logits)."""
        if not 1 <= k <= self.num_exits:
            raise IndexError(f"segment {k} out of range 1..{self.num_exits}")
        feats = self.run_stage(k, x)
        return feats, self.heads[k - 1](feats)[1]

    def forward(self, x: torch.Tensor, with_maps: bool = False) -> MultiExitOutput:
        """Every exit's logits and feature vector; `with_maps` adds each head's aligned map
        (heads whose `provides_map` is set; ValueError otherwise)."""
        if with_maps and not all(getattr(h, "provides_map", False) for h in self.heads):
            raise ValueError(f"exit head {self.head_kind!r} has no aligned map to return")
        logits, features, maps = [], [], []
        for k in range(1, self.num_exits + 1):
            x = self.run_stage(k, x)
            if with_maps:
                feat, out, fmap = self.heads[k - 1](x, with_map=True)
                maps.append(fmap)
            else:
                feat, out = self.heads[k - 1](x)
            logits.append(out)
            features.append(feat)
        return MultiExitOutput(logits, features, maps if with_maps else None)

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        """The plain model without exit heads (logits of exit K only)."""
        return self.backbone(x)
