"""The training configuration: one frozen dataclass, written as config.json in every run dir."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEDULES = ("multistep", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    # model
    arch: str = "resnet18"
    width: float = 1.0
    stem: str = "cifar"
    exits: int = 4
    head: str = "attention"  # exit-head variant: "attention" (seed 004), "lite" or "pool"
    # data
    dataset: str = "cifar10"
    data_dir: str = "data"
    val_size: int = 5000
    split_seed: int = 0
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0
    autoaugment: bool = False
    # loss (seed 004 §4.1 defaults)
    loss: str = "self_distillation"
    distill_path: str = "deepest"
    alpha: float = 0.6
    lam: float = 0.04
    temperature: float = 3.0
    distill_off_epochs: int = 5  # α and λ are 0 for the last N epochs
    # optimisation
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "multistep"
    milestones: tuple[float, ...] = (0.3, 0.6, 0.9)  # fractions of the epochs
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    # run
    seed: int = 0
    best_metric: str = "val_acc_last"
    amp: bool = True  # bf16 autocast, only on CUDA
    channels_last: bool = True  # only on CUDA
    num_threads: int = 0  # 0 = torch default
    eval_test: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """The config actually trained: the baseline is the backbone alone (one exit)."""
        if self.loss == "baseline" and self.exits != 1:
            return dataclasses.replace(self, exits=1)
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["milestones"] = list(self.milestones)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        values = dict(data)
        if "milestones" in values:
            values["milestones"] = tuple(float(m) for m in values["milestones"])
        return cls(**values)

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if self.width <= 0:
            raise ValueError("width must be positive")
        if self.exits < 1:
            raise ValueError("exits must be ≥ 1")
        from .models.exits import EXIT_HEADS

        if self.head not in EXIT_HEADS:
            raise ValueError(f"head must be one of {sorted(EXIT_HEADS)}, got {self.head!r}")


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return data


def write_config(cfg: TrainConfig, path: str | Path) -> None:
    from serving.bundle import atomic_write_json

    atomic_write_json(path, cfg.to_dict())


def read_config(path: str | Path) -> TrainConfig:
    return TrainConfig.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
