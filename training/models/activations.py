"""Selectable activations: ReLU and T-ReLU (seed 000, eq. 6), swapped into any network.

`set_activation(module, name)` replaces every activation module (ReLU, ReLU6, T-ReLU) of a
backbone or exit head by the named one. Activations hold no parameters, so the state dict, the
exit points and the exported graph's interfaces stay the same; only the non-linearity changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class TReLU(nn.Module):
    """T-ReLU (seed 000, eq. 6): f(x) = x for x > 0, tanh(x) for x ≤ 0.

    Continuous with slope 1 on both sides of 0 (tanh'(0) = 1), so unlike ReLU a negative input
    still passes a gradient 1 − tanh²(x) and a bounded value in (−1, 0].
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.where exports to ONNX as Greater/Tanh/Where, all of which onnxruntime runs.
        return torch.where(x > 0, x, torch.tanh(x))


def _relu() -> nn.Module:
    return nn.ReLU(inplace=False)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": _relu,
    "trelu": TReLU,
}

# Modules `set_activation` treats as "the activation" of a block or head.
ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6, TReLU)


def check_activation(name: str) -> None:
    """ValueError naming the valid activations when `name` is not one of them."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}")


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name ("relu" or "trelu")."""
    check_activation(name)
    return ACTIVATIONS[name]()


def set_activation(module: nn.Module, name: str) -> nn.Module:
    """Replace every ReLU / ReLU6 / T-ReLU inside `module` by activation `name`, in place.

    Returns `module`. A module shared by two parents (a block's one `relu` called twice) is
    replaced once and stays shared.
    """
    check_activation(name)
    replaced: dict[int, nn.Module] = {}
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, ACTIVATION_TYPES):
                if id(child) not in replaced:
                    replaced[id(child)] = make_activation(name)
                setattr(parent, child_name, replaced[id(child)])
    return module
