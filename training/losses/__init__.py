"""Training losses, created by name from a registry; each takes one `LossInputs` per step."""

from .inputs import ExitLoss, LossInputs, TeacherOutputs
from .registry import (
    all_loss_fields,
    create_loss,
    list_losses,
    loss_fields,
    loss_needs,
    loss_uses_maps,
    register_loss,
)
from .resnet_kl import ResNetKLLoss
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
    "ExitLoss",
    "LossInputs",
    "LossTerms",
    "ResNetKLLoss",
    "SelfDistillationLoss",
    "TeacherOutputs",
    "all_loss_fields",
    "create_loss",
    "list_losses",
    "loss_fields",
    "loss_needs",
    "loss_uses_maps",
    "register_loss",
]
