"""Backbones, exit heads and the multi-exit wrapper, behind one registry."""

from .multi_exit import MultiExitNetwork, MultiExitOutput, stage_groups
from .registry import UnknownModelError, create_backbone, create_model, list_models, register_model

__all__ = [
    "MultiExitNetwork",
    "MultiExitOutput",
    "UnknownModelError",
    "create_backbone",
    "create_model",
    "list_models",
    "register_model",
    "stage_groups",
]
