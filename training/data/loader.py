"""In-memory batch loader: whole-batch augmentation, deterministic order, DDP sharding.

A 2-core CPU can't afford per-image Python transforms; CIFAR fits in memory, so batches are
sliced from one uint8 tensor and augmented as tensors. The order of epoch e is a permutation
seeded by (seed, e), so resuming mid-epoch only needs the step index and the augmentation
generator's state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from core.datasets import ImageArrays

from .augment import AutoAugmentCifar, cutmix, cutout, random_crop, random_flip


@dataclass(frozen=True)
class AugmentConfig:
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0
    autoaugment: bool = False
    cutmix: float = 0.0  # probability a batch is CutMix-ed; on, targets are N×C probabilities


class BatchLoader:
    def __init__(
        self,
        data: ImageArrays,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
    ) -> None:
        if len(data) == 0:
            raise ValueError("empty dataset")
        # N×H×W×C uint8 → N×C×H×W uint8 once; float conversion happens per batch.
        self.images = torch.from_numpy(np.ascontiguousarray(data.images.transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(data.labels)
        self.num_classes = len(data.classes)
        self.batch_size = batch_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.train = train
        self.augment = augment or AugmentConfig()
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)
        self._autoaugment = AutoAugmentCifar() if train and self.augment.autoaugment else None

    def _order(self, epoch: int) -> torch.Tensor:
        n = len(self.labels)
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(n)
        # Every rank gets the same number of rows (pad by wrapping, as DistributedSampler does).
        per_rank = -(-n // self.world_size)
        if self.world_size > 1:
            order = torch.cat([order, order[: per_rank * self.world_size - n]])
        return order[self.rank :: self.world_size]

    def steps_per_epoch(self) -> int:
        n = len(self._order(0))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def rows(self, epoch: int, step: int) -> torch.Tensor:
        """The dataset row indices of batch `step` of `epoch` (what `epoch()` yields there)."""
        return self._order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (float images normalised N×C×H×W, int64 labels) from step `start_step` on; with
        CutMix on (training), the targets are N×C float class probabilities instead."""
        order = self._order(epoch)
        for step in range(start_step, self.steps_per_epoch()):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            x, y = self.transform(self.images[idx]), self.labels[idx]
            if self.train and self.augment.cutmix > 0:
                x, y = cutmix(x, y, self.num_classes, self.generator, self.augment.cutmix)
            yield x, y

    def transform(self, batch_u8: torch.Tensor) -> torch.Tensor:
        x = batch_u8.float().div_(255.0)
        if self.train:
            gen = self.generator
            if self._autoaugment is not None:
                x = self._autoaugment(x, gen)
            x = random_crop(x, self.augment.crop_padding, gen)
            if self.augment.flip:
                x = random_flip(x, gen)
        x = (x - self.mean) / self.std
        if self.train and self.augment.cutout:
            x = cutout(x, self.augment.cutout, self.generator)
        return x

    def __len__(self) -> int:
        return self.steps_per_epoch()
