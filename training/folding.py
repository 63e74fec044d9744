"""BatchNorm folding: the eval-mode network as one affine map per convolution.

In eval mode a BatchNorm after a convolution is a per-channel affine map, so the pair is one
convolution with weight `W·γ/σ` and bias `β − μ·γ/σ` (σ = sqrt(running_var + eps)). The ONNX
exporter writes exactly that, so folded weights are what a bundle keeps; they are also the
common ground on which two networks with different BatchNorm parametrisations (one trained,
one recovered from a bundle) can be compared or averaged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from core.datasets import ImageArrays

from .data.loader import AugmentConfig, BatchLoader


def conv_before(bn_name: str) -> str:
    """The convolution a BatchNorm follows, by this project's module naming: `x.bnN` follows
    `x.convN`; in a Sequential, `x.N` follows `x.N-1`."""
    parent, _, last = bn_name.rpartition(".")
    if last.startswith("bn"):
        return f"{parent}.conv{last[2:]}"
    if last.isdigit() and int(last) > 0:
        return f"{parent}.{int(last) - 1}"
    raise ValueError(f"{bn_name}: cannot tell which convolution this BatchNorm follows")


def batchnorms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Every BatchNorm2d of `model` by module name, checked to follow a convolution."""
    modules = dict(model.named_modules())
    found: dict[str, nn.BatchNorm2d] = {}
    for name, module in modules.items():
        if isinstance(module, nn.BatchNorm2d):
            conv = modules.get(conv_before(name))
            if not isinstance(conv, nn.Conv2d):
                raise ValueError(f"{name}: the module before it is not a convolution")
            found[name] = module
    return found


def fold_state(
    state: dict[str, torch.Tensor], norms: dict[str, nn.BatchNorm2d]
) -> dict[str, torch.Tensor]:
    """`state` with every BatchNorm folded into its convolution (float64): `CONV.weight` is the
    folded weight and `BN.folded_bias` the folded bias; the BatchNorm's own entries stay but
    no longer describe the network (`unfold_identity` or a re-normalisation sets them)."""
    out = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    for name, bn in norms.items():
        conv = conv_before(name)
        gamma, beta = out[f"{name}.weight"], out[f"{name}.bias"]
        mean, var = out[f"{name}.running_mean"], out[f"{name}.running_var"]
        scale = gamma / torch.sqrt(var + bn.eps)
        weight = out[f"{conv}.weight"]
        out[f"{conv}.weight"] = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        bias = out.get(f"{conv}.bias")
        shift = beta - mean * scale
        out[f"{name}.folded_bias"] = shift if bias is None else shift + bias * scale
    return out


def unfold_identity(
    folded: dict[str, torch.Tensor],
    norms: dict[str, nn.BatchNorm2d],
    reference: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """A state_dict shaped like `reference` that computes the folded network exactly in eval
    mode: each BatchNorm becomes the identity plus the folded bias. Train mode would
    normalise by batch statistics and erase each layer's scale: re-normalise before training."""
    state: dict[str, torch.Tensor] = {}
    for key, ref in reference.items():
        value = folded[key]
        state[key] = value.to(ref.dtype) if ref.is_floating_point() else ref.clone()
    for name, bn in norms.items():
        conv = conv_before(name)
        if f"{conv}.bias" in state:
            state[f"{conv}.bias"] = torch.zeros_like(state[f"{conv}.bias"])
        state[f"{name}.weight"] = torch.ones_like(bn.weight)
        state[f"{name}.bias"] = folded[f"{name}.folded_bias"].to(bn.bias.dtype)
        state[f"{name}.running_mean"] = torch.zeros_like(bn.running_mean)
        state[f"{name}.running_var"] = torch.full_like(bn.running_var, 1.0 - bn.eps)
    return state


def augmented_batches(
    data: ImageArrays,
    config: dict[str, Any],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batches: int,
    seed: int,
    batch_size: int = 256,
) -> Iterator[torch.Tensor]:
    """`batches` normalised training batches with the recipe's crop and flip (no Cutout or
    CutMix: these batches measure activation statistics, which erased patches would bias)."""
    augment = AugmentConfig(int(config.get("crop_padding", 4)), bool(config.get("flip", True)))
    loader = BatchLoader(
        data, min(batch_size, len(data)), mean, std, train=True, augment=augment, seed=seed
    )
    done, epoch = 0, 0
    while done < batches:
        for x, _y in loader.epoch(epoch):
            yield x
            done += 1
            if done == batches:
                return
        epoch += 1


@torch.no_grad()
def channel_statistics(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[torch.Tensor],
    of: str = "output",
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per channel, the mean and (population) variance in float64 of each module's input or
    output over `batches` (N×C×H×W), with `model` run as it is (eval or train mode)."""
    if of not in ("input", "output"):
        raise ValueError(f"of={of!r}: choose input or output")
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x = (inputs[0] if of == "input" else out).double()
            sums[name] = sums.get(name, 0) + x.sum(dim=(0, 2, 3))
            squares[name] = squares.get(name, 0) + (x * x).sum(dim=(0, 2, 3))
            counts[name] = counts.get(name, 0) + x.shape[0] * x.shape[2] * x.shape[3]

        return record

    handles = [module.register_forward_hook(hook(n)) for n, module in modules.items()]
    try:
        for x in batches:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    stats = {}
    for name in modules:
        mean = sums[name] / counts[name]
        stats[name] = (mean, (squares[name] / counts[name] - mean * mean).clamp_min(0.0))
    return stats
