"""Training losses, created by name from a registry."""

from .registry import all_loss_fields, create_loss, list_losses, loss_fields, register_loss
from .self_distillation import (
    DISTILL_TERMS,
    FEATURE_HINTS,
    PATHS,
    REDUCTIONS,
    LossTerms,
    SelfDistillationLoss,
)

__all__ = [
    "DISTILL_TERMS",
    "FEATURE_HINTS",
    "PATHS",
    "REDUCTIONS",
    "LossTerms",
    "SelfDistillationLoss",
    "all_loss_fields",
    "create_loss",
    "list_losses",
    "loss_fields",
    "register_loss",
]
