"""MACs and parameters of each exit path, each segment and the plain backbone.

Counted with `torch.utils.flop_counter.FlopCounterMode` (convolutions, matmuls, linear layers;
FLOPs = 2 × MACs). Element-wise ops (BN, ReLU, the attention mask product) are not counted,
the same convention the paper's MAC numbers and ONNX-side counts use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models.multi_exit import MultiExitNetwork


def count_macs(fn, *inputs: torch.Tensor) -> int:
    """MACs of one call `fn(*inputs)` (no grad)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return int(counter.get_total_flops()) // 2


def count_params(*modules: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


@dataclass(frozen=True)
class ModelCosts:
    """Per-image costs. Lists are indexed by exit/segment (0 = exit 1)."""

    segment_macs: list[int]  # stage k + head k
    stage_macs: list[int]  # stage k alone
    head_macs: list[int]  # head k alone
    exit_path_macs: list[int]  # stages 1..k + head k (what a row leaving at k pays)
    segment_params: list[int]
    exit_path_params: list[int]
    backbone_macs: int  # plain model, no exit heads
    backbone_params: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def measure_costs(model: MultiExitNetwork, input_shape: tuple[int, int, int]) -> ModelCosts:
    """Count costs for one image of shape (C, H, W)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_shape)
    stage_macs, head_macs, seg_params = [], [], []
    feats = x
    for k in range(1, model.num_exits + 1):
        stage_macs.append(count_macs(lambda t, k=k: model.run_stage(k, t), feats))
        nxt = model.run_stage(k, feats)
        head_macs.append(count_macs(model.heads[k - 1], nxt))
        seg_params.append(count_params(*model.segment_modules(k), model.heads[k - 1]))
        feats = nxt
    segment_macs = [s + h for s, h in zip(stage_macs, head_macs, strict=True)]
    path_macs = [sum(stage_macs[: k + 1]) + head_macs[k] for k in range(model.num_exits)]
    path_params = []
    for k in range(model.num_exits):
        mods = [m for j in range(1, k + 2) for m in model.segment_modules(j)]
        path_params.append(count_params(*mods, model.heads[k]))
    costs = ModelCosts(
        segment_macs=segment_macs,
        stage_macs=stage_macs,
        head_macs=head_macs,
        exit_path_macs=path_macs,
        segment_params=seg_params,
        exit_path_params=path_params,
        backbone_macs=count_macs(model.forward_backbone, x),
        backbone_params=count_params(model.backbone),
    )
    model.train(was_training)
    return costs
