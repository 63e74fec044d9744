"""Losses looked up by name, so variants plug in without copy-paste.

Each loss also declares the loss-specific config fields it reads (`loss_fields`), so a recipe
that sets, say, `alpha` for the plain baseline is refused instead of silently ignored, and
what it needs beyond logits and pooled features (`loss_needs`, see `training.losses.inputs`),
so the engine computes only that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

_LOSSES: dict[str, Callable[..., nn.Module]] = {}
_FIELDS: dict[str, tuple[str, ...]] = {}
_NEEDS: dict[str, frozenset[str]] = {}


def register_loss(
    name: str,
    fields: Sequence[str] = (),
    uses_maps: bool = False,
    needs: Sequence[str] = (),
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a loss factory. `needs` (a subset of `inputs.NEEDS`): what the loss reads
    beyond logits, pooled features and target; ``teacher`` makes `--teacher` required.
    `uses_maps` is short for ``needs=("maps",)`` (the exits' aligned feature maps)."""
    from .inputs import NEEDS

    wanted = frozenset(needs) | ({"maps"} if uses_maps else set())
    unknown = sorted(wanted - set(NEEDS))
    if unknown:
        raise ValueError(f"loss {name!r} needs unknown input(s) {unknown}; valid: {NEEDS}")

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        _LOSSES[name] = factory
        _FIELDS[name] = tuple(fields)
        _NEEDS[name] = wanted
        return factory

    return wrap


def list_losses() -> list[str]:
    _ensure_registered()
    return sorted(_LOSSES)


def loss_fields(name: str) -> tuple[str, ...]:
    """Loss-specific TrainConfig fields `name` reads (empty for unknown names)."""
    _ensure_registered()
    return _FIELDS.get(name, ())


def loss_uses_maps(name: str) -> bool:
    """Whether loss `name` compares feature maps (needs exit heads that provide them)."""
    return "maps" in loss_needs(name)


def loss_needs(name: str) -> frozenset[str]:
    """What loss `name` reads beyond logits, features and target (empty for unknown names)."""
    _ensure_registered()
    return _NEEDS.get(name, frozenset())


def all_loss_fields() -> set[str]:
    _ensure_registered()
    return {f for fields in _FIELDS.values() for f in fields}


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    _ensure_registered()
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(_LOSSES))}")
    return _LOSSES[name](**kwargs)


def _ensure_registered() -> None:
    from . import ckdf, drg, kd, resnet_kl, self_distillation, sfr  # noqa: F401
