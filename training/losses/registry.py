"""Losses looked up by name, so variants plug in without copy-paste."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_LOSSES: dict[str, Callable[..., nn.Module]] = {}


def register_loss(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        _LOSSES[name] = factory
        return factory

    return wrap


def list_losses() -> list[str]:
    _ensure_registered()
    return sorted(_LOSSES)


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    _ensure_registered()
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(_LOSSES))}")
    return _LOSSES[name](**kwargs)


def _ensure_registered() -> None:
    from . import self_distillation  # noqa: F401
