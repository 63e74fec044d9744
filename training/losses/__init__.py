"""Training losses, created by name from a registry."""

from .registry import create_loss, list_losses, register_loss
from .self_distillation import PATHS, LossTerms, SelfDistillationLoss

__all__ = [
    "PATHS",
    "LossTerms",
    "SelfDistillationLoss",
    "create_loss",
    "list_losses",
    "register_loss",
]
