"""Batch-level tensor augmentations (no torchvision): crop with padding, flip, Cutout,
CutMix, and AutoAugment's CIFAR policy through kornia.

All take a uint8 or float batch N×C×H×W and an explicit `torch.Generator`, so an epoch's
augmentation is reproducible and its state can be checkpointed for exact resume.
"""

from __future__ import annotations

import math

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


def cutmix_box(h: int, w: int, lam: float, cy: int, cx: int) -> tuple[int, int, int, int]:
    """The pasted box (y1, y2, x1, x2) for a CutMix draw: sides H·√(1−λ) × W·√(1−λ) centred at
    (cy, cx), clipped to the image (Yun et al., 2019, as their code cuts it)."""
    cut_h, cut_w = int(h * math.sqrt(1.0 - lam)), int(w * math.sqrt(1.0 - lam))
    y1, y2 = min(max(cy - cut_h // 2, 0), h), min(max(cy + cut_h // 2, 0), h)
    x1, x2 = min(max(cx - cut_w // 2, 0), w), min(max(cx + cut_w // 2, 0), w)
    return y1, y2, x1, x2


def apply_cutmix(
    x: torch.Tensor,
    target: torch.Tensor,
    perm: torch.Tensor,
    box: tuple[int, int, int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste image perm[i]'s `box` into image i; mix the target rows (N×C probabilities) by
    the pixel share each image keeps: λ' = 1 − box area / image area (seed 000's eq. 1)."""
    y1, y2, x1, x2 = box
    h, w = x.shape[-2:]
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    keep = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
    return mixed, keep * target + (1.0 - keep) * target[perm]


def cutmix(
    x: torch.Tensor, labels: torch.Tensor, num_classes: int, gen: torch.Generator, prob: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix a batch with probability `prob`: one box and one partner permutation per batch,
    box area share 1 − λ with λ ~ U(0, 1) (Beta(1, 1), CutMix's CIFAR setting; seed 000 prints
    none). Returns (images, N×C float targets); an unmixed batch gets one-hot rows, so a run
    with CutMix on always yields probability targets.
    """
    target = F.one_hot(labels, num_classes).to(torch.float32)
    if prob <= 0 or float(torch.rand((), generator=gen)) >= prob:
        return x, target
    n, _, h, w = x.shape
    lam = float(torch.rand((), generator=gen))
    perm = torch.randperm(n, generator=gen)
    cy = int(torch.randint(0, h, (), generator=gen))
    cx = int(torch.randint(0, w, (), generator=gen))
    return apply_cutmix(x, target, perm, cutmix_box(h, w, lam, cy, cx))


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
