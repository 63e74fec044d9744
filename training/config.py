"""The training configuration: one frozen dataclass, written as config.json in every run dir."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEDULES = ("multistep", "cosine", "linear")


@dataclass(frozen=True)
class TrainConfig:
    # model
    arch: str = "resnet18"
    width: float = 1.0
    stem: str = "cifar"
    exits: int = 4
    # exit-head variant: "attention" (seed 004), "lite", "pool" or "st" (seed 000's ST layer)
    head: str = "attention"
    # 1-based backbone blocks the shallow exits follow (training.models.block_names(arch));
    # None = stage ends. Sets exits to len(exit_blocks) + 1.
    exit_blocks: tuple[int, ...] | None = None
    # activation of the backbone and every exit head: "relu" | "trelu" (seed 000's T-ReLU);
    # None keeps the architecture's own (ReLU; ReLU6 in MobileNetV2; T-ReLU in resnet*_kl)
    act: str | None = None
    # groups of the residual 3×3 / VGG last-two-module convolutions (seed 001 §3.4); 1 = none
    groups: int = 1
    # data
    dataset: str = "cifar10"
    data_dir: str = "data"
    val_size: int = 5000
    split_seed: int = 0
    train_subset: int = 0  # train on a class-stratified subset of N rows (0 = all)
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0
    # CutMix (seed 000, eq. 1): probability a training batch is CutMix-ed (0 = off); the
    # targets become class-probability rows, which every loss accepts
    cutmix: float = 0.0
    autoaugment: bool = False
    # loss: the defaults are the authors' released code (training/losses/self_distillation.py
    # lists which setting reproduces which implementation; the paper as printed is
    # configs/sd_paper.yaml)
    loss: str = "self_distillation"
    loss_reduction: str = "sum"  # "sum" over exits (every implementation) | "mean" (eq. 3)
    distill_path: str = "deepest"
    distill: str = "soft_ce"  # "soft_ce" (authors' code) | "kl_t2" (T²·KL)
    alpha: float = 0.3
    feature_hint: str = "none"  # "none" | "l2" (eq. 3 as printed) | "adapter"
    feature_exits: tuple[int, ...] | None = None  # 1-based shallow exits given the hint
    lam: float = 0.0
    temperature: float = 3.0
    distill_off_epochs: int = 0  # α and λ are 0 for the last N epochs
    label_smoothing: float = 0.0
    # a frozen teacher (training.teacher): a checkpoint of this project, for the losses that
    # learn from one (kd_self_distillation, ckdf)
    teacher: str | None = None
    # seed methods' options (training/losses/*.py say where each default comes from); each is
    # read by its method only and refused for the others
    kd_weight: float = 1.0  # kd_self_distillation: weight of the teacher's KL
    kd_temperature: float = 3.0  # teacher KL temperature (kd_self_distillation, ckdf: T = 3)
    kd_exits: str = "deepest"  # kd_self_distillation: teacher KL on "deepest" | "all" exits
    ckdf_alpha: float = 0.5  # ckdf α (eq. 3–4; not given by the paper)
    ckdf_beta: float = 0.5  # ckdf β (eq. 3, 5, 6; not given by the paper)
    drg_alpha: float = 0.2  # drg α (eq. 10)
    drg_temperature: float = 1.0  # drg τ (eq. 9, Fig. 6)
    dsr_beta: float = 1.0  # dsr β (eq. 12)
    dsr_temperature: float = 4.0  # dsr τ (eq. 11, Fig. 6)
    sfr_weight: float = 1.0  # sfr: weight of the many-to-one feature loss
    sfr_distance: str = "l2"  # sfr feature distance: "l2" | "emd"
    dls_epsilon: float = 0.1  # sfr: dynamic label smoothing ε (0 = off)
    # optimisation
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "multistep"  # multistep | cosine | linear (warm-up, then linear to 0)
    milestones: tuple[float, ...] = (0.3, 0.6, 0.9)  # fractions of the epochs
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    ema_decay: float = 0.0  # EMA of weights (0 = off); evaluated and exported when on
    # start from trained weights (a checkpoint of this project, or a plain state_dict of a
    # registry backbone); with freeze_backbone only the exit heads train and the final exit
    # stays the plain model bit for bit. "{seed}" in the path stands for this run's seed, so a
    # continuation recipe (a second cycle) starts every seed from its own first run
    init: str | None = None
    freeze_backbone: bool = False
    init_heads: bool = False  # with init: also load its exit heads, matched by exit block
    # structured L1 channel pruning (training.prune; seeds 000 and 004 §4.6): before each
    # listed epoch (0 = before training, e.g. a trained --init model then fine-tuned) remove
    # this fraction of every block-internal channel set; the pruned widths live in the
    # checkpoint
    prune_ratio: float = 0.0
    prune_epochs: tuple[int, ...] = ()
    # kept widths rounded to a multiple of this (e.g. 8: a CPU runtime's vector width; pruned
    # widths like 11 or 45 cost as much time as the unpruned ones: docs/results/pruning)
    prune_round_to: int = 1
    # run
    seed: int = 0
    # seed of the network's fresh weights (None = `seed`): draws meant to be averaged into a
    # soup share it, so a head that --init does not supply starts alike in every draw (heads
    # that start apart do not average: docs/results/soup1246); data order and augmentation
    # still follow `seed`
    init_seed: int | None = None
    best_metric: str = "val_acc_last"
    amp: bool = True  # bf16 autocast, only on CUDA
    channels_last: bool = True  # CUDA and CPU (oneDNN convolutions run faster in NHWC)
    num_threads: int = 0  # 0 = torch default
    # also write last.pt mid-epoch at least this often (minutes of training; 0 = only at epoch
    # ends): a run killed mid-epoch resumes exactly from there instead of the epoch's start
    checkpoint_minutes: float = 10.0
    eval_test: bool = True
    report_tta_flip: bool = False  # test report adds flip-averaged accuracy (never exported)
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """The config actually trained: the baseline is the backbone alone (one exit); exit
        blocks fix the exit count."""
        if self.loss in ("baseline", "dsr") and (self.exits != 1 or self.exit_blocks):
            return dataclasses.replace(self, exits=1, exit_blocks=None)
        if self.loss in ("drg", "drg_dsr") and not self.exit_blocks:
            # DRG's one auxiliary classifier follows the second stage (seed 003 §III)
            from .models import block_names

            names = block_names(self.arch)
            stage2 = [i + 1 for i, n in enumerate(names) if n.startswith("layer2.")]
            if stage2 and stage2[-1] < len(names):
                return dataclasses.replace(self, exits=2, exit_blocks=(stage2[-1],))
        if self.exit_blocks and self.exits != len(self.exit_blocks) + 1:
            return dataclasses.replace(self, exits=len(self.exit_blocks) + 1)
        return self

    def init_path(self) -> Path | None:
        """The weights `init` names for this run's seed ("{seed}" replaced), None without."""
        return None if not self.init else Path(self.init.replace("{seed}", str(self.seed)))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["milestones"] = list(self.milestones)
        data["prune_epochs"] = list(self.prune_epochs)
        if self.feature_exits is not None:
            data["feature_exits"] = list(self.feature_exits)
        if self.exit_blocks is not None:
            data["exit_blocks"] = list(self.exit_blocks)
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
        if "prune_epochs" in values:
            epochs = values["prune_epochs"]
            if isinstance(epochs, str):
                epochs = [e for e in epochs.replace(" ", "").split(",") if e]
            if isinstance(epochs, int) and not isinstance(epochs, bool):
                epochs = [epochs]
            if not isinstance(epochs, list | tuple) or not all(
                isinstance(e, int | str) and str(e).isdigit() for e in epochs
            ):
                raise ValueError(f"prune_epochs must list epoch numbers ≥ 0, got {epochs!r}")
            values["prune_epochs"] = tuple(int(e) for e in epochs)
        if values.get("exit_blocks") is not None:
            from .models import parse_exit_blocks

            values["exit_blocks"] = parse_exit_blocks(
                values["exit_blocks"], str(values.get("arch", cls.arch))
            )
        if values.get("feature_exits") is not None:
            exits = values["feature_exits"]
            if isinstance(exits, str):
                exits = [e for e in exits.replace(" ", "").split(",") if e]
            if not isinstance(exits, list | tuple) or not all(
                isinstance(e, int | str) and str(e).lstrip("-").isdigit() for e in exits
            ):
                raise ValueError(f"feature_exits must be a list of exit numbers, got {exits!r}")
            values["feature_exits"] = tuple(int(e) for e in exits)
        return cls(**values)

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.init_seed is not None and self.init_seed < 0:
            raise ValueError(f"init_seed must be >= 0, got {self.init_seed}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if self.width <= 0:
            raise ValueError("width must be positive")
        if self.exits < 1:
            raise ValueError("exits must be ≥ 1")
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be a positive integer, got {self.groups!r}")
        if self.act is not None:
            from .models.activations import check_activation

            check_activation(self.act)
        if not self.checkpoint_minutes >= 0:  # also rejects NaN
            raise ValueError(f"checkpoint_minutes must be ≥ 0, got {self.checkpoint_minutes}")
        if self.freeze_backbone and not self.init:
            raise ValueError("--freeze-backbone needs --init CKPT (the trained backbone to keep)")
        if self.init_heads and not self.init:
            raise ValueError("--init-heads needs --init CKPT (the trained multi-exit model)")
        if self.freeze_backbone and self.loss == "baseline":
            raise ValueError("--freeze-backbone with the baseline loss leaves nothing to train")
        self._validate_pruning()
        if not 0.0 <= self.cutmix <= 1.0:
            raise ValueError(
                f"cutmix (a probability per batch) must be in [0, 1], got {self.cutmix}"
            )
        if self.train_subset < 0:
            raise ValueError(f"train_subset must be ≥ 0, got {self.train_subset}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_epochs < 0 or (self.warmup_epochs > 0 and self.warmup_epochs >= self.epochs):
            raise ValueError("warmup_epochs must be ≥ 0 and below epochs")
        from .losses import all_loss_fields, list_losses, loss_fields
        from .losses.self_distillation import check_common, check_options

        if self.loss not in list_losses():
            raise ValueError(f"unknown loss {self.loss!r}; valid: {', '.join(list_losses())}")
        if self.loss in ("self_distillation", "kd_self_distillation"):
            check_options(
                path=self.distill_path,
                alpha=self.alpha,
                lam=self.lam,
                temperature=self.temperature,
                reduction=self.loss_reduction,
                distill=self.distill,
                feature=self.feature_hint,
                feature_exits=self.feature_exits,
                label_smoothing=self.label_smoothing,
                num_exits=self.exits,
            )
        if self.loss != "self_distillation":
            from .losses import create_loss

            check_common(self.loss_reduction, self.label_smoothing)
            create_loss(self.loss, **self.loss_options())  # its constructor checks the options
        from .losses import loss_needs

        if "teacher" in loss_needs(self.loss) and not self.teacher:
            raise ValueError(f"loss {self.loss!r} learns from a teacher: pass --teacher CKPT")
        # A loss-specific field moved off its default for a loss that never reads it is a
        # recipe mistake: refuse it rather than train something other than what was asked.
        defaults = TrainConfig()
        ignored = sorted(
            name
            for name in all_loss_fields() - set(loss_fields(self.loss))
            if getattr(self, name) != getattr(defaults, name)
        )
        if ignored:
            raise ValueError(
                f"{', '.join(ignored)} do(es) not apply to loss {self.loss!r}; remove it"
            )
        from .models.exits import EXIT_HEADS, head_provides_map

        if self.head not in EXIT_HEADS:
            raise ValueError(f"head must be one of {sorted(EXIT_HEADS)}, got {self.head!r}")
        from .losses import loss_uses_maps

        if loss_uses_maps(self.loss) and self.exits > 1 and not head_provides_map(self.head):
            maps = sorted(h for h in EXIT_HEADS if head_provides_map(h))
            raise ValueError(
                f"loss {self.loss!r} compares feature maps; head {self.head!r} has none "
                f"(use {', '.join(maps)})"
            )

    def loss_options(self) -> dict[str, Any]:
        """The keyword set `create_loss` gets from this config (each factory takes what it
        reads); the engine adds the network's sizes."""
        options: dict[str, Any] = {
            "path": self.distill_path,
            "alpha": self.alpha,
            "lam": self.lam,
            "temperature": self.temperature,
            "reduction": self.loss_reduction,
            "distill": self.distill,
            "feature": self.feature_hint,
            "feature_exits": self.feature_exits,
            "label_smoothing": self.label_smoothing,
        }
        from .losses import loss_fields

        for name in loss_fields(self.loss):
            options.setdefault(name, getattr(self, name))
        return options

    def _validate_pruning(self) -> None:
        round_to = self.prune_round_to
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"prune_round_to must be a positive integer, got {round_to!r}")
        if not self.prune_epochs and not self.prune_ratio:
            if round_to != 1:
                raise ValueError("prune_round_to applies only with prune_ratio and prune_epochs")
            return
        if not self.prune_epochs:
            raise ValueError("prune_ratio needs prune_epochs (the epochs before which to prune)")
        if not 0.0 < self.prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in (0, 1), got {self.prune_ratio}")
        epochs = list(self.prune_epochs)
        if epochs != sorted(set(epochs)) or not all(0 <= e < self.epochs for e in epochs):
            raise ValueError(
                f"prune_epochs must increase strictly inside 0..{self.epochs - 1}, got {epochs}"
            )
        if self.freeze_backbone:
            raise ValueError("pruning changes the backbone; it cannot be frozen")
        if self.groups != 1:
            raise ValueError("pruning grouped convolutions (--groups) is not supported")
        from .models import list_models
        from .models.registry import model_options

        if self.arch in list_models() and "widths" not in model_options(self.arch):
            prunable = sorted(n for n in list_models() if "widths" in model_options(n))
            raise ValueError(f"pruning cannot rebuild {self.arch}; prunable: {', '.join(prunable)}")


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return data


def write_config(cfg: TrainConfig, path: str | Path) -> None:
    from core.atomic import atomic_write_json

    atomic_write_json(path, cfg.to_dict())


def read_config(path: str | Path) -> TrainConfig:
    return TrainConfig.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
