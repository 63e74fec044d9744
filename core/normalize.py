"""Pixels to network input: uint8 images → float32 N×C×H×W, (x / 255 − mean) / std per channel.

One arithmetic for every numpy path (serving's preprocessing, export's parity batches);
training does the same on tensors (`training.data.BatchLoader`), held to it by a test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

# Per-dataset channel mean and std of the training images (what a bundle's `input` records).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def normalization(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of `dataset`'s training images; KeyError for an unknown name."""
    return NORMALIZATION[dataset]


def normalize_images(
    images: npt.ArrayLike, mean: Sequence[float], std: Sequence[float]
) -> npt.NDArray[np.float32]:
    """uint8 N×H×W×C (or N×H×W, one channel) → normalised float32 N×C×H×W, C-contiguous."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    scaled = arr.astype(np.float32) / np.float32(255.0)
    x = np.asarray((scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
