"""Backbones, exit heads and the multi-exit wrapper, behind one registry."""

from .multi_exit import (
    MultiExitNetwork,
    MultiExitOutput,
    backbone_blocks,
    block_names,
    parse_exit_blocks,
    stage_groups,
)
from .registry import (
    UnknownModelError,
    create_backbone,
    create_model,
    list_models,
    model_kwargs,
    register_model,
)

__all__ = [
    "MultiExitNetwork",
    "MultiExitOutput",
    "UnknownModelError",
    "backbone_blocks",
    "block_names",
    "parse_exit_blocks",
    "create_backbone",
    "create_model",
    "list_models",
    "model_kwargs",
    "register_model",
    "stage_groups",
]
