"""Data for training: numpy readers from `core.datasets`, tensor batches and augmentation."""

from .augment import (
    AutoAugmentCifar,
    apply_cutmix,
    cutmix,
    cutmix_box,
    cutout,
    random_crop,
    random_flip,
)
from .loader import AugmentConfig, BatchLoader

__all__ = [
    "AugmentConfig",
    "AutoAugmentCifar",
    "BatchLoader",
    "apply_cutmix",
    "cutmix",
    "cutmix_box",
    "cutout",
    "random_crop",
    "random_flip",
]
