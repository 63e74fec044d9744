"""Structured L1 channel pruning that really removes channels (seed 000; seed 004 §4.6).

A pruning round scores every channel of every prunable site of the backbone
(`StagedBackbone.prune_sites`: the block-internal widths, between two convolutions of a
residual block, or between two layers of a VGG module), keeps the highest-scored
round(w·(1 − ratio)) of each site's w channels, builds a *new, smaller* network of those widths
through the model registry (`widths`) and copies the surviving weights into it. Nothing is
masked: the pruned convolutions and BNs have fewer channels, and parameters and MACs drop.

Readings where the papers are silent (SEED_METHODS.md, 000 and 004):
- score of channel c = its producing conv filter's L1 norm + |γ_c| of its BN, each divided by
  its mean over the site's channels so neither term's scale decides alone ("L1 norms of the
  convolutional layers and the BN layers");
- only block-internal channels are pruned, so residual additions and every stage's output
  width stay as they were: the exit heads keep their shapes and weights and are rebuilt with
  the network at the new widths;
- the same ratio on every site per round; 000's rounds are `prune_epochs` early in training,
  004's is one round of a trained model (`--init`) followed by fine-tuning.

Grouped convolutions (other than depthwise) are refused: keeping equal channels per group is
another pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .models.backbone import PruneSite

logger = logging.getLogger(__name__)


class PruneError(ValueError):
    """The network cannot be pruned by this pass (bad input: exit 2 at the CLI)."""


@dataclass(frozen=True)
class PrunePlan:
    """One round: the surviving channel indices (sorted) and the new width of every site."""

    kept: dict[str, torch.Tensor]
    widths: dict[str, int]

    def removed(self, before: Mapping[str, int]) -> dict[str, int]:
        return {site: before[site] - width for site, width in self.widths.items()}


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise PruneError(f"prune ratio must be in (0, 1), got {ratio}")


def prune_sites(model: nn.Module) -> dict[str, PruneSite]:
    """The backbone's prunable sites, with module paths under `model` (a MultiExitNetwork or
    a backbone). A site that is the output of a block an exit head reads (a VGG layer inside a
    module chosen by `exit_blocks`) is left out: the head's input width must stay."""
    backbone = getattr(model, "backbone", model)
    prefix = "backbone." if backbone is not model else ""
    sites_of = getattr(backbone, "prune_sites", None)
    sites = sites_of() if sites_of is not None else {}
    if not sites:
        raise PruneError(f"{type(backbone).__name__} has no channel sites this pass can prune")
    exit_fed = {
        f"stages.{units[-1][0]}.{units[-1][1]}." for units in getattr(model, "segment_units", [])
    }

    def feeds_an_exit(producers: tuple[str, ...], consumers: tuple[str, ...]) -> bool:
        block = next((b for b in exit_fed if producers[0].startswith(b)), None)
        return block is not None and any(not c.startswith(block) for c in consumers)

    return {
        name: (tuple(prefix + m for m in producers), tuple(prefix + m for m in consumers))
        for name, (producers, consumers) in sites.items()
        if not feeds_an_exit(producers, consumers)
    }


def site_widths(model: nn.Module) -> dict[str, int]:
    """Current width of every prunable site (what the registry's `widths` rebuilds)."""
    modules = dict(model.named_modules())
    return {
        name: _width(modules[producers[0]]) for name, (producers, _) in prune_sites(model).items()
    }


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    raise PruneError(f"cannot prune the channels of a {type(module).__name__}")


def channel_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per site, one score per channel (see the module docstring); higher = kept first."""
    modules = dict(model.named_modules())
    scores: dict[str, torch.Tensor] = {}
    for name, (producers, consumers) in prune_sites(model).items():
        terms = []
        for path in producers:
            module = modules[path]
            if isinstance(module, nn.Conv2d):
                _check_conv(module, path)
                # A depthwise conv carries the channel but does not create it from the input.
                if module.groups == 1:
                    terms.append(module.weight.detach().abs().flatten(1).sum(1))
            elif isinstance(module, nn.BatchNorm2d):
                if module.weight is not None:
                    terms.append(module.weight.detach().abs())
            else:
                raise PruneError(f"{path}: cannot prune the channels of a {type(module).__name__}")
        for path in consumers:
            _check_conv(modules[path], path)
        if not terms:
            raise PruneError(f"site {name}: nothing to score its channels by")
        score = sum(t.float() / t.float().mean().clamp_min(1e-12) for t in terms)
        scores[name] = score.cpu()
    return scores


def _check_conv(module: nn.Module, path: str) -> None:
    if not isinstance(module, nn.Conv2d):
        raise PruneError(f"{path}: cannot prune through a {type(module).__name__}")
    depthwise = module.groups == module.in_channels == module.out_channels
    if module.groups != 1 and not depthwise:
        raise PruneError(
            f"{path} is a grouped convolution (groups = {module.groups}): pruning it would "
            "leave unequal groups; prune the model without --groups"
        )


def plan_pruning(model: nn.Module, ratio: float, round_to: int = 1) -> PrunePlan:
    """Keep round(w·(1 − ratio)) channels (at least 1) of each site, the highest-scored ones;
    ties go to the lower index. With `round_to` > 1 the kept count is rounded to the nearest
    multiple of it (at least one multiple, at most w: a site narrower than `round_to` stays)."""
    check_ratio(ratio)
    if round_to < 1:
        raise PruneError(f"prune_round_to must be ≥ 1, got {round_to}")
    kept: dict[str, torch.Tensor] = {}
    widths: dict[str, int] = {}
    for name, score in channel_scores(model).items():
        width = len(score)
        keep = max(1, int(round(width * (1.0 - ratio))))
        if round_to > 1:
            keep = min(width, round_to * max(1, int(round(keep / round_to))))
        order = torch.sort(score, descending=True, stable=True).indices
        kept[name] = torch.sort(order[:keep]).values
        widths[name] = keep
    return PrunePlan(kept, widths)


def slice_state(
    state: Mapping[str, torch.Tensor],
    kept: Mapping[str, torch.Tensor],
    sites: Mapping[str, PruneSite],
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """`state` (a state dict, or named tensors shaped like parameters) with the pruned
    channels removed: producers lose rows (dim 0), consumers input columns (dim 1). `prefix`
    is prepended to the sites' module paths (e.g. "module." for an EMA copy)."""
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    for site, (producers, consumers) in sites.items():
        if site not in kept:
            continue
        for path in producers:
            rows[prefix + path] = kept[site]
        for path in consumers:
            cols[prefix + path] = kept[site]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module = key.rpartition(".")[0]
        if module in rows and tensor.ndim >= 1:
            tensor = tensor.index_select(0, rows[module].to(tensor.device))
        if module in cols and tensor.ndim >= 2:
            tensor = tensor.index_select(1, cols[module].to(tensor.device))
        out[key] = tensor
    return out


def prune_network(
    model: nn.Module, plan: PrunePlan, rebuild: Callable[[dict[str, int]], nn.Module]
) -> nn.Module:
    """The network at `plan.widths` (built by `rebuild(widths)`, e.g. the registry's
    `create_model(..., widths=widths)`) holding `model`'s surviving weights, in `model`'s
    train/eval mode. The global RNG is left as it was (the fresh build's init draws from a
    forked stream), so a pruned run stays reproducible."""
    with torch.random.fork_rng(devices=[]):
        pruned = rebuild(dict(plan.widths))
    state = slice_state(model.state_dict(), plan.kept, prune_sites(model))
    target = pruned.state_dict()
    wrong = [k for k in target if k not in state or state[k].shape != target[k].shape]
    if wrong:
        raise PruneError(f"the rebuilt network does not match the plan at {wrong[:3]}")
    pruned.load_state_dict(state)
    pruned.train(model.training)
    before = site_widths(model)
    logger.info(
        "pruned %d of %d channels over %d sites",
        sum(plan.removed(before).values()),
        sum(before.values()),
        len(before),
    )
    return pruned
