"""One model registry: `@register_model` per variant, `create_model` as the single front door."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(ValueError):
    """Raised for a name that is not registered; the message lists the valid ones."""


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a backbone constructor under its function name; duplicates are an error."""
    name = fn.__name__
    if name in _BACKBONES:
        raise ValueError(f"model {name!r} registered twice")
    _BACKBONES[name] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    _ensure_registered()
    return sorted(_BACKBONES)


def create_backbone(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The plain single-exit backbone (what users would deploy without early exits)."""
    _ensure_registered()
    if name not in _BACKBONES:
        raise UnknownModelError(f"unknown model {name!r}; valid: {', '.join(sorted(_BACKBONES))}")
    return _BACKBONES[name](num_classes=num_classes, **kwargs)


def create_model(
    name: str,
    num_classes: int,
    exits: int = 4,
    head: str = "attention",
    exit_blocks: tuple[int, ...] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A multi-exit network over backbone `name` with `exits` classifiers (1 = backbone only).

    `head` names the exit-head variant ("attention" = seed 004, "lite", "pool"; see
    `training.models.exits`). `exit_blocks` (1-based block indices, `block_names(name)`) puts
    the shallow exits after any residual block instead of at stage ends; exits is then
    len(exit_blocks) + 1. kwargs go to the backbone (`width`, `stem`, `in_chans`, ...).
    Raises UnknownModelError for an unknown name and ValueError for an unknown head or when
    `exits` exceeds the backbone's number of stages.
    """
    from .multi_exit import MultiExitNetwork

    return MultiExitNetwork(
        create_backbone(name, num_classes, **kwargs),
        exits=exits,
        head=head,
        exit_blocks=exit_blocks,
    )


def _ensure_registered() -> None:
    # Importing the modules runs their @register_model decorators.
    from . import mobilenetv2, resnet, wideresnet  # noqa: F401
