"""Losses looked up by name, so variants plug in without copy-paste.

Each loss also declares the loss-specific config fields it reads (`loss_fields`), so a recipe
that sets, say, `alpha` for the plain baseline is refused instead of silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

_LOSSES: dict[str, Callable[..., nn.Module]] = {}
_FIELDS: dict[str, tuple[str, ...]] = {}
_USES_MAPS: set[str] = set()


def register_loss(
    name: str, fields: Sequence[str] = (), uses_maps: bool = False
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a loss factory. `uses_maps`: the loss takes the exits' aligned feature maps
    (`MultiExitOutput.maps`) as its `features` argument instead of the pooled vectors."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        _LOSSES[name] = factory
        _FIELDS[name] = tuple(fields)
        if uses_maps:
            _USES_MAPS.add(name)
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
    _ensure_registered()
    return name in _USES_MAPS


def all_loss_fields() -> set[str]:
    _ensure_registered()
    return {f for fields in _FIELDS.values() for f in fields}


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    _ensure_registered()
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(_LOSSES))}")
    return _LOSSES[name](**kwargs)


def _ensure_registered() -> None:
    from . import resnet_kl, self_distillation  # noqa: F401
