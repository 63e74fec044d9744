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


def register_loss(
    name: str, fields: Sequence[str] = ()
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        _LOSSES[name] = factory
        _FIELDS[name] = tuple(fields)
        return factory

    return wrap


def list_losses() -> list[str]:
    _ensure_registered()
    return sorted(_LOSSES)


def loss_fields(name: str) -> tuple[str, ...]:
    """Loss-specific TrainConfig fields `name` reads (empty for unknown names)."""
    _ensure_registered()
    return _FIELDS.get(name, ())


def all_loss_fields() -> set[str]:
    _ensure_registered()
    return {f for fields in _FIELDS.values() for f in fields}


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    _ensure_registered()
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(_LOSSES))}")
    return _LOSSES[name](**kwargs)


def _ensure_registered() -> None:
    from . import self_distillation  # noqa: F401
