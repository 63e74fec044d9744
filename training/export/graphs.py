"""The torch modules each exported file is traced from: segment k (stage + exit head), stage k
alone (features only), and the plain single graph."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import MultiExitNetwork


class SegmentGraph(nn.Module):
    def __init__(self, net: MultiExitNetwork, k: int, with_features: bool) -> None:
        super().__init__()
        self.net, self.k, self.with_features = net, k, with_features

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        feats, logits = self.net.forward_stage(self.k, x)
        probs = torch.softmax(logits.float(), dim=-1)
        return (feats, probs) if self.with_features else probs


class StageGraph(nn.Module):
    def __init__(self, net: MultiExitNetwork, k: int) -> None:
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.run_stage(self.k, x)


class FullGraph(nn.Module):
    def __init__(self, net: MultiExitNetwork) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net.forward_backbone(x).float(), dim=-1)


@dataclass(frozen=True)
class GraphJob:
    """One ONNX file to write and verify."""

    file: str
    module: nn.Module
    input_name: str
    output_names: tuple[str, ...]
    torch_macs: int
    example: torch.Tensor  # a batch of 2 for tracing
