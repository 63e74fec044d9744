"""Batch-level tensor augmentations (no torchvision): crop with padding, flip, Cutout,
and AutoAugment's CIFAR policy through kornia.

All take a uint8 or float batch N×C×H×W and an explicit `torch.Generator`, so an epoch's
augmentation is reproducible and its state can be checkpointed for exact resume.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` and crop back to H×W at a random offset per image."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    rows = dy[:, None] + torch.arange(h)[None, :]  # N×H
    cols = dx[:, None] + torch.arange(w)[None, :]  # N×W
    batch = torch.arange(n)[:, None, None]
    # Advanced indexing gathers every image's window in one op: N×H×W×C → N×C×H×W.
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen) < p
    if flip.any():
        x = x.clone()
        x[flip] = x[flip].flip(-1)
    return x


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero one size×size square per image, centred anywhere (DeVries & Taylor, 2017)."""
    if size <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=gen)
    cx = torch.randint(0, w, (n,), generator=gen)
    ys = torch.arange(h)[None, :]
    xs = torch.arange(w)[None, :]
    in_y = (ys >= (cy[:, None] - size // 2)) & (ys < (cy[:, None] - size // 2 + size))
    in_x = (xs >= (cx[:, None] - size // 2)) & (xs < (cx[:, None] - size // 2 + size))
    mask = ~(in_y[:, :, None] & in_x[:, None, :])  # N×H×W
    return x * mask[:, None].to(x.dtype)


class AutoAugmentCifar:
    """AutoAugment's CIFAR-10 policy (Cubuk et al.) from kornia, on float images in [0, 1]."""

    def __init__(self) -> None:
        try:
            from kornia.augmentation.auto import AutoAugment
        except ImportError as exc:  # kornia is in the `train` extra
            raise RuntimeError("AutoAugment needs kornia: pip install kornia") from exc
        self._aug = AutoAugment(policy="cifar10")

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # kornia draws from torch's global RNG: seed it from our generator so runs repeat.
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._aug(x).clamp_(0, 1)
