"""The training loop: SGD, schedules, per-epoch validation of every exit, atomic checkpoints,
exact resume and DDP (the same command under `torchrun`)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from core.atomic import atomic_write_bytes, atomic_write_json
from core.datasets import ImageArrays, load_split, val_indices
from core.normalize import normalization

from .checkpoint_io import read_checkpoint
from .config import TrainConfig, write_config
from .costs import measure_costs
from .data import AugmentConfig, BatchLoader
from .losses import create_loss
from .losses.inputs import LossInputs, capture_stage_maps
from .models import MultiExitNetwork, create_model, model_kwargs
from .teacher import Teacher, TeacherError  # noqa: F401  (TeacherError: bad --teacher)

if TYPE_CHECKING:
    from .prune import PrunePlan

logger = logging.getLogger(__name__)

# Fields that say where and how fast a run executes, not what it learns: a run may resume
# with other threads or with its data moved (the checkpoint keeps the first values).
RUN_ENVIRONMENT_FIELDS = frozenset({"num_threads", "data_dir", "checkpoint_minutes"})

LAST_CKPT = "last.pt"
BEST_CKPT = "best.pt"
METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    env = DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    return env


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(cfg: TrainConfig, epoch_progress: float) -> float:
    """Multiplier of the base LR at a (fractional) epoch."""
    if cfg.warmup_epochs > 0 and epoch_progress < cfg.warmup_epochs:
        return (epoch_progress + 1e-8) / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (epoch_progress - cfg.warmup_epochs) / span))
    if cfg.schedule == "linear":  # the triangular / one-cycle shape of fast-CIFAR recipes
        return max(0.0, 1.0 - (epoch_progress - cfg.warmup_epochs) / span)
    passed = sum(1 for m in cfg.milestones if epoch_progress >= m * cfg.epochs)
    return cfg.gamma**passed


def distill_weights(cfg: TrainConfig, epoch: int) -> tuple[float, float]:
    """(α, λ) for an epoch: both 0 for the last `distill_off_epochs` epochs (seed 004 §4.1)."""
    if epoch >= cfg.epochs - cfg.distill_off_epochs:
        return 0.0, 0.0
    return cfg.alpha, cfg.lam


def network_from_config(
    cfg: TrainConfig, num_classes: int, in_chans: int = 3, widths: dict[str, int] | None = None
) -> MultiExitNetwork:
    """The network a config describes, freshly initialised (pruned site widths if given): the
    one place training code turns a recipe into a model."""
    return create_model(
        cfg.arch,
        num_classes,
        exits=cfg.exits,
        head=cfg.head,
        exit_blocks=cfg.exit_blocks,
        act=cfg.act,
        groups=cfg.groups,
        width=cfg.width,
        stem=cfg.stem,
        in_chans=in_chans,
        widths=widths,
    )


def loss_from_config(
    cfg: TrainConfig, model: MultiExitNetwork, train_rows: int | None = None
) -> nn.Module:
    """The loss a config describes, sized for `model` (adapters and projections need its
    exits and width; per-sample state the training set's `train_rows`)."""
    return create_loss(
        cfg.loss,
        **cfg.loss_options(),
        num_exits=model.num_exits,
        feature_dim=model.feature_dim,
        num_classes=model.num_classes,
        train_rows=train_rows,
    )


class InitError(ValueError):
    """--init names weights that do not fit the model being trained (bad input, exit 2)."""


def load_backbone(model: MultiExitNetwork, cfg: TrainConfig) -> None:
    """Load trained backbone weights from `cfg.init_path()` into `model.backbone`.

    Accepts a checkpoint of this project (its architecture, width, stem and classes must
    match; its EMA weights when it has them) or a plain state_dict of the registry backbone
    (keys with or without a "backbone." prefix). Exit heads keep their fresh initialisation.
    """
    path = cfg.init_path()
    if path is None:
        raise InitError("no --init checkpoint to load")
    state = read_checkpoint(path, InitError, "--init")
    if not isinstance(state, dict):
        raise InitError(f"--init {path}: expected a dict, got {type(state).__name__}")
    their_points: tuple[str, ...] | None = None
    if "config" in state and "model" in state:  # this project's checkpoint
        theirs = state["config"] if isinstance(state["config"], dict) else {}
        for key in ("arch", "width", "stem"):
            if key in theirs and theirs[key] != getattr(cfg, key):
                raise InitError(
                    f"--init {path}: its {key} is {theirs[key]!r}, this run's is "
                    f"{getattr(cfg, key)!r}"
                )
        if state.get("num_classes") not in (None, model.num_classes):
            raise InitError(
                f"--init {path}: {state['num_classes']} classes, this run has {model.num_classes}"
            )
        if cfg.init_heads:
            their_points = checkpoint_exit_points(state, model)
        state = exported_weights(state)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if cfg.init_heads and their_points is None:
        their_points = state_dict_exit_points(tensors, model, cfg)
    prefixed = any(k.startswith("backbone.") for k in tensors)
    weights = (
        {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
        if prefixed
        else tensors
    )
    mine = model.backbone.state_dict()
    missing = sorted(set(mine) - set(weights))
    unexpected = sorted(set(weights) - set(mine))
    wrong = sorted(k for k in set(mine) & set(weights) if mine[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        detail = (
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}), {len(wrong)} of another shape (e.g. {wrong[:2]})"
        )
        raise InitError(f"--init {path}: weights do not fit {cfg.arch} x{cfg.width}: {detail}")
    model.backbone.load_state_dict(weights)
    logger.info("backbone initialised from %s", path.name)
    if cfg.init_heads:
        load_exit_heads(model, cfg, path, tensors, their_points)


def checkpoint_exit_points(state: dict[str, Any], model: MultiExitNetwork) -> tuple[str, ...]:
    """The blocks a checkpoint's exits follow, from its recorded config (its layout only,
    built on the meta device); this run's own when the config does not say."""
    config = state["config"] if isinstance(state["config"], dict) else {}
    if "exits" not in config:
        return tuple(model.exit_points)
    try:
        with torch.device("meta"):
            theirs = create_model(
                str(config.get("arch", "")),
                model.num_classes,
                exits=int(config["exits"]),
                # Channels change the stem, not where exits sit; the checkpoint's own if known.
                **model_kwargs(config, int((state.get("input_shape") or [3])[0])),
            )
    except (ValueError, TypeError, KeyError) as exc:
        raise InitError(f"--init-heads: cannot read the exits of the checkpoint: {exc}") from exc
    return tuple(theirs.exit_points)


def state_dict_exit_points(
    tensors: dict[str, torch.Tensor], model: MultiExitNetwork, cfg: TrainConfig
) -> tuple[str, ...] | None:
    """The blocks a plain state_dict's exits follow. It records no layout: with as many heads
    as this run has exits it is taken to be this run's layout (None, as before), with another
    count the architecture's stage-end placement for that count (the final head included),
    which every model without `exit_blocks` has (e.g. weights recovered from a stage-end
    bundle). None without heads."""
    indices = {k.split(".")[1] for k in tensors if k.startswith("heads.")}
    if not indices or not all(i.isdigit() for i in indices):
        return None
    count = max(int(i) for i in indices) + 1
    if count == model.num_exits:
        return None
    config = {"arch": cfg.arch, "exits": count}
    config.update({key: getattr(cfg, key) for key in ("width", "stem", "head", "act")})
    return checkpoint_exit_points({"config": config}, model)


def load_exit_heads(
    model: MultiExitNetwork,
    cfg: TrainConfig,
    path: Path,
    tensors: dict[str, torch.Tensor],
    their_points: tuple[str, ...] | None,
) -> None:
    """--init-heads: load the checkpoint's shallow exit heads into this run's heads at the
    same blocks. Every exit of the same layout is carried over whole (seed 004's prune and
    fine-tune); with other exit blocks (e.g. a block-1 exit added to a trained stage-end
    model), the heads at shared blocks load and the others keep their fresh initialisation.
    """
    mine_points = tuple(model.exit_points)
    theirs = their_points if their_points is not None else mine_points
    heads = {k.removeprefix("heads."): v for k, v in tensors.items() if k.startswith("heads.")}
    if theirs == mine_points:
        mine = model.heads.state_dict()
        if set(heads) != set(mine) or any(heads[k].shape != mine[k].shape for k in mine):
            raise InitError(
                f"--init-heads: the exit heads of {path} do not fit this run's "
                f"{cfg.exits} {cfg.head} exits"
            )
        model.heads.load_state_dict(heads)
        logger.info("exit heads initialised from %s", path.name)
        return
    # The final exit is the backbone's own head (loaded with it); only shallow heads map.
    shared = [
        (k, theirs.index(point)) for k, point in enumerate(mine_points[:-1]) if point in theirs[:-1]
    ]
    if not shared:
        raise InitError(
            f"--init-heads: {path} has no shallow exit at this run's blocks "
            f"({', '.join(mine_points[:-1])}; it has {', '.join(theirs[:-1]) or 'none'})"
        )
    for k, j in shared:
        prefix = f"{j}."
        sub = {n.removeprefix(prefix): v for n, v in heads.items() if n.startswith(prefix)}
        want = model.heads[k].state_dict()
        if set(sub) != set(want) or any(sub[n].shape != want[n].shape for n in want):
            raise InitError(
                f"--init-heads: the exit head of {path} after {mine_points[k]} does not fit "
                f"this run's {cfg.head} head there"
            )
        model.heads[k].load_state_dict(sub)
    loaded = {k for k, _ in shared}
    fresh = [p for k, p in enumerate(mine_points[:-1]) if k not in loaded]
    logger.info(
        "exit heads after %s initialised from %s; those after %s left as they were",
        ", ".join(mine_points[k] for k, _ in shared),
        path.name,
        ", ".join(fresh) or "none",
    )


def forward_for_loss(
    net: nn.Module,
    model: MultiExitNetwork,
    needs: frozenset[str],
    x: torch.Tensor,
    y: torch.Tensor,
    teacher: Teacher | None = None,
    rows: torch.Tensor | None = None,
    epoch: int = 0,
    step: int = 0,
    alpha: float | None = None,
    lam: float | None = None,
) -> tuple[LossInputs, list[torch.Tensor]]:
    """Run `net` (the model, or its DDP wrapper) on `x` and gather what a loss `needs`:
    (its `LossInputs`, the exits' logits as computed). Exit maps, stage maps, the teacher's
    outputs and rows are computed or kept only when asked for."""
    with capture_stage_maps(model, "stage_maps" in needs) as stage_maps:
        out = net(x, with_maps=True) if "maps" in needs else net(x)
    inputs = LossInputs(
        logits=[z.float() for z in out.logits],
        features=[f.float() for f in out.features],
        target=y,
        maps=[m.float() for m in out.maps] if out.maps is not None else None,
        stage_maps=[m.float() for m in stage_maps] if "stage_maps" in needs else None,
        teacher=teacher.outputs(x) if teacher is not None and "teacher" in needs else None,
        rows=rows.to(y.device) if rows is not None and "rows" in needs else None,
        epoch=epoch,
        step=step,
        alpha=alpha,
        lam=lam,
    )
    return inputs, out.logits


@torch.no_grad()
def check_teacher_maps(
    teacher: Teacher,
    model: MultiExitNetwork,
    input_shape: tuple[int, int, int],
    device: torch.device,
) -> None:
    """TeacherError unless the teacher's stage maps pair with the student's one to one at
    equal resolution (attention transfer compares them), checked on one blank image."""
    if not teacher.with_stage_maps:
        return
    x = torch.zeros(1, *input_shape, device=device)
    was_training = model.training
    model.eval()
    with capture_stage_maps(model) as mine:
        model(x)
    model.train(was_training)
    theirs = teacher.outputs(x).stage_maps or []
    sizes = [tuple(m.shape[-2:]) for m in mine]
    their_sizes = [tuple(m.shape[-2:]) for m in theirs]
    if sizes != their_sizes:
        raise TeacherError(
            f"--teacher {teacher.path.name}: its stage maps are {their_sizes}, this network's "
            f"are {sizes}; attention transfer needs them stage by stage at equal resolution"
        )


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def ensemble_probs(probs: list[torch.Tensor]) -> torch.Tensor:
    """The exits' ensemble: the mean of their softmax outputs (core.decision's `ensemble`
    fallback, on torch tensors)."""
    return torch.stack(probs).mean(0)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: BatchLoader,
    device: torch.device,
    amp: bool = False,
    tta_flip: bool = False,
) -> dict[str, float]:
    """Top-1 accuracy (percent) of every exit and of the ensemble (mean of softmax outputs).

    `tta_flip` averages each exit's softmax over the image and its mirror: a reporting aid
    only, since the exported model and the server see one view."""
    was_training = model.training
    model.eval()
    correct: list[int] | None = None
    ens_correct = total = 0
    for x, y in loader.epoch(0):
        x, y = x.to(device, non_blocking=True), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
            flipped = model(x.flip(-1)) if tta_flip else None
        probs = [torch.softmax(z.float(), dim=1) for z in out.logits]
        if flipped is not None:
            probs = [
                0.5 * (p + torch.softmax(z.float(), dim=1))
                for p, z in zip(probs, flipped.logits, strict=True)
            ]
        hits = [int((p.argmax(1) == y).sum()) for p in probs]
        correct = hits if correct is None else [a + b for a, b in zip(correct, hits, strict=True)]
        ens_correct += int((ensemble_probs(probs).argmax(1) == y).sum())
        total += int(y.numel())
    model.train(was_training)
    assert correct is not None  # loader is never empty (BatchLoader refuses empty data)
    metrics = {f"acc_exit{k + 1}": 100.0 * c / total for k, c in enumerate(correct)}
    metrics["acc_last"] = metrics[f"acc_exit{len(correct)}"]
    metrics["acc_ensemble"] = 100.0 * ens_correct / total
    return metrics


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Owns model, optimiser, schedule and data for one run directory."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | Path,
        train_data: ImageArrays | None = None,
        val_data: ImageArrays | None = None,
        dist_env: DistEnv | None = None,
        device: torch.device | None = None,
    ) -> None:
        cfg = cfg.resolved()
        cfg.validate()
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.dist = dist_env or DistEnv()
        if device is None:
            device = (
                torch.device("cuda", self.dist.local_rank)
                if torch.cuda.is_available()
                else torch.device("cpu")
            )
        self.device = device
        self.use_cuda = device.type == "cuda"
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        seed_everything(cfg.seed)

        if train_data is None:
            train_data = load_split(
                cfg.dataset, cfg.data_dir, "train", cfg.val_size, cfg.split_seed
            )
        if cfg.train_subset:
            # The controlled small-data regime: same classes, fewer rows, fixed by split_seed.
            train_data = train_data.subset(
                val_indices(train_data.labels, cfg.train_subset, cfg.split_seed)
            )
        if val_data is None and cfg.val_size > 0:
            val_data = load_split(cfg.dataset, cfg.data_dir, "val", cfg.val_size, cfg.split_seed)
        self.classes = list(train_data.classes)
        self.num_classes = len(self.classes)
        h, w, c = train_data.images.shape[1:]
        self.input_shape = (int(c), int(h), int(w))
        self.mean, self.std = normalization(cfg.dataset)
        if len(self.mean) != c:  # image folders may be grey; fall back to per-channel stats
            self.mean, self.std = (0.5,) * c, (0.25,) * c
        augment = AugmentConfig(
            cfg.crop_padding, cfg.flip, cfg.cutout, cfg.autoaugment, cutmix=cfg.cutmix
        )
        self.train_loader = BatchLoader(
            train_data,
            cfg.batch_size,
            self.mean,
            self.std,
            train=True,
            augment=augment,
            seed=cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.val_loader = (
            BatchLoader(val_data, 500, self.mean, self.std, train=False) if val_data else None
        )

        self.model: MultiExitNetwork = self.create_network()
        self.costs = measure_costs(self.model, self.input_shape)
        if cfg.init and not (self.out_dir / LAST_CKPT).is_file():  # a resume loads its own
            load_backbone(self.model, cfg)
        if cfg.freeze_backbone:
            # No gradient reaches the backbone, so autograd records nothing through it: the
            # backward pass covers the exit heads alone.
            for param in self.model.backbone.parameters():
                param.requires_grad_(False)
        self.model.to(device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.net: nn.Module = self.model
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(
                self.model, device_ids=[device.index] if self.use_cuda else None
            )
        self.loss_fn: nn.Module = loss_from_config(cfg, self.model, len(train_data)).to(device)
        self.loss_needs: frozenset[str] = frozenset(getattr(self.loss_fn, "needs", ()))
        # A frozen teacher (--teacher): outside the model, the optimiser and the state dict.
        self.teacher: Teacher | None = None
        if "teacher" in self.loss_needs:
            self.teacher = Teacher(
                str(cfg.teacher),
                self.num_classes,
                self.input_shape,
                device,
                with_stage_maps="stage_maps" in self.loss_needs,
            )
            check_teacher_maps(self.teacher, self.model, self.input_shape, device)
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = self.train_loader.steps_per_epoch()
        if self.steps_per_epoch == 0:
            rows = len(self.train_loader.rows(0, 0)) if len(train_data) else 0
            what = (
                f"loss {cfg.loss!r} compares each batch row by row with the previous one, and "
                if getattr(self.loss_fn, "aligned_rows", False)
                else ""
            )
            raise ValueError(
                f"{what}--batch-size {cfg.batch_size} leaves no full batch of the {rows} "
                "training rows per process; use a smaller batch"
            )
        self.scheduler = self._make_scheduler()
        self.ema: torch.optim.swa_utils.AveragedModel | None = self._make_ema()
        # Structured pruning (training.prune): the site widths the network has now (empty =
        # as built) and the epochs whose pruning round has run; both live in the checkpoint.
        self.widths: dict[str, int] = {}
        self.pruned_epochs: list[int] = []
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_value = -math.inf
        self.last_val: dict[str, float] = {}
        self.step_seconds: list[float] = []
        # set by request_stop() (the CLI's SIGTERM/SIGINT handler): fit() saves last.pt after
        # the step in progress and returns, so a stopped run resumes exactly
        self.stop_requested = False
        # the current epoch's running train statistics, kept in mid-epoch checkpoints so the
        # epoch's record after a resume averages over the whole epoch; reset at each epoch end
        self.epoch_sums: dict[str, float] = {}
        self.epoch_count = 0
        self.epoch_seconds = 0.0

    def create_network(self, widths: dict[str, int] | None = None) -> MultiExitNetwork:
        """The run's network, fresh, at the given pruned site widths (None = as built). With
        `init_seed` its weights are drawn from that seed, and the run's own random stream is
        left where it was; an `init_seed` equal to `seed` is the run without one, bit for bit
        (the draw of that seed is then also the recipe's)."""
        if self.cfg.init_seed is None or self.cfg.init_seed == self.cfg.seed:
            return network_from_config(self.cfg, self.num_classes, self.input_shape[0], widths)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.init_seed)
            return network_from_config(self.cfg, self.num_classes, self.input_shape[0], widths)

    def _make_optimizer(self) -> torch.optim.SGD:
        # Loss parameters (feature adapters) train with the model and live in the checkpoint.
        cfg = self.cfg
        return torch.optim.SGD(
            self._trained_parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
        )

    def _trained_parameters(self) -> list[nn.Parameter]:
        return [
            p for p in (*self.model.parameters(), *self.loss_fn.parameters()) if p.requires_grad
        ]

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        cfg = self.cfg
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(cfg, step / self.steps_per_epoch)
        )

    def _make_ema(self) -> torch.optim.swa_utils.AveragedModel | None:
        if self.cfg.ema_decay <= 0:
            return None
        return torch.optim.swa_utils.AveragedModel(
            self.model,
            multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(self.cfg.ema_decay),
            use_buffers=True,
        )

    # -- structured pruning ------------------------------------------------------------
    def prune(self) -> None:
        """One pruning round now (`training.prune`): the network is rebuilt at the smaller
        widths with the surviving weights; momentum and the EMA copy are sliced the same way,
        the schedule goes on where it was, DDP and costs follow. best.pt is picked afresh
        among the epochs after the round (a bigger pre-pruning model never wins it)."""
        from .prune import plan_pruning

        plan = plan_pruning(self.model, self.cfg.prune_ratio, self.cfg.prune_round_to)
        self._install_widths(plan.widths, plan)
        self.pruned_epochs.append(self.epoch)
        self.best_value = -math.inf

    def _install_widths(self, widths: dict[str, int], plan: PrunePlan | None = None) -> None:
        """Replace the network by the one at `widths`. With a `PrunePlan`, carry the weights,
        momentum and EMA over sliced; without (resume), fresh modules whose states the
        checkpoint then loads."""
        from .prune import prune_network, prune_sites, slice_state

        old_model, old_opt, old_sched = self.model, self.optimizer, self.scheduler
        names = [n for n, p in old_model.named_parameters() if p.requires_grad]
        names += [f"loss.{n}" for n, p in self.loss_fn.named_parameters() if p.requires_grad]
        if plan is None:
            with torch.random.fork_rng(devices=[]):  # leave the run's RNG stream as it was
                model = self.create_network(widths)
        else:
            model = prune_network(old_model, plan, self.create_network)
        model.to(self.device)
        if self.cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.net = model
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.use_cuda else None
            )
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        old_ema = self.ema
        self.ema = self._make_ema()
        if plan is not None:
            sites = prune_sites(old_model)
            opt_state = old_opt.state_dict()
            moved = {}
            for i, entry in opt_state["state"].items():
                entry = dict(entry)
                if entry.get("momentum_buffer") is not None:
                    name = names[i]
                    buf = {name: entry["momentum_buffer"]}
                    entry["momentum_buffer"] = slice_state(buf, plan.kept, sites)[name]
                moved[i] = entry
            self.optimizer.load_state_dict({**opt_state, "state": moved})
            self.scheduler.load_state_dict(old_sched.state_dict())
            if self.ema is not None and old_ema is not None:
                ema_state = slice_state(old_ema.state_dict(), plan.kept, sites, "module.")
                self.ema.load_state_dict(ema_state)
        self.costs = measure_costs(self.model, self.input_shape)
        self.widths = dict(widths)

    @property
    def eval_model(self) -> MultiExitNetwork:
        """The weights that are evaluated and exported: the EMA copy when on."""
        if self.ema is not None:
            return self.ema.module  # type: ignore[return-value]
        return self.model

    # -- one optimisation step ---------------------------------------------------------
    def loss_inputs(
        self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None = None
    ) -> tuple[LossInputs, list[torch.Tensor]]:
        """Forward the network on `x` and gather what the loss needs (`ExitLoss.needs`):
        (the loss's inputs, the exits' logits as computed)."""
        alpha, lam = distill_weights(self.cfg, self.epoch)
        return forward_for_loss(
            self.net,
            self.model,
            self.loss_needs,
            x,
            y,
            teacher=self.teacher,
            rows=rows,
            epoch=self.epoch,
            step=self.global_step,
            alpha=alpha,
            lam=lam,
        )

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None = None
    ) -> dict[str, float]:
        """One optimiser step on batch (x, y); `rows` (the batch's training-set indices) for
        a loss with per-sample state."""
        if "rows" in self.loss_needs and rows is None:
            rows = self.train_loader.rows(self.epoch, self.step_in_epoch)
        self.net.train()
        if self.cfg.freeze_backbone:
            self.model.backbone.eval()  # BN statistics stay the trained model's
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.use_cuda and self.cfg.amp
        ):
            inputs, logits = self.loss_inputs(x, y, rows)
            terms = self.loss_fn(inputs)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.global_step += 1
        stats = terms.as_floats()
        # CutMix targets are class-probability rows: the larger share is the label counted.
        hard = y.argmax(1) if y.ndim == 2 else y
        stats["acc_last"] = 100.0 * float((logits[-1].argmax(1) == hard).float().mean())
        return stats

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "earlyexit-checkpoint/1",
            "model": self.model.state_dict(),
            # EMA weights, when on: what evaluation, best.pt selection and export use.
            "ema_model": self.ema.module.state_dict() if self.ema is not None else None,
            "ema_state": self.ema.state_dict() if self.ema is not None else None,
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_value": self.best_value,
            "epoch_partial": {
                "sums": dict(self.epoch_sums),
                "count": self.epoch_count,
                "seconds": self.epoch_seconds,
            },
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.use_cuda else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "loader": self.train_loader.generator.get_state(),
            },
            "config": self.cfg.to_dict(),
            # A pruned network's site widths: export and resume rebuild it from them.
            "widths": self.widths or None,
            "pruned_epochs": list(self.pruned_epochs),
            "num_classes": self.num_classes,
            "classes": self.classes,
            "input_shape": list(self.input_shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "costs": self.costs.to_dict(),
            "val_metrics": self.last_val,
            "git_commit": git_commit(),
            "torch_version": torch.__version__,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        widths = dict(state.get("widths") or {})
        if widths != self.widths:  # a pruned run: rebuild at its widths, then load
            self._install_widths(widths)
        self.pruned_epochs = [int(e) for e in state.get("pruned_epochs", [])]
        self.model.load_state_dict(state["model"])
        self.loss_fn.load_state_dict(state.get("loss") or {})
        if self.ema is not None:
            self.ema.load_state_dict(state["ema_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.best_value = float(state["best_value"])
        self.last_val = dict(state.get("val_metrics", {}))
        # Checkpoints older than this field carry none: the resumed epoch restarts its sums.
        partial = (state.get("epoch_partial") or {}) if self.step_in_epoch > 0 else {}
        self.epoch_sums = {k: float(v) for k, v in dict(partial.get("sums", {})).items()}
        self.epoch_count = int(partial.get("count", 0))
        self.epoch_seconds = float(partial.get("seconds", 0.0))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if self.use_cuda and rng.get("cuda") is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.train_loader.generator.set_state(rng["loader"])

    def save(self, name: str = LAST_CKPT) -> Path:
        path = self.out_dir / name
        if self.dist.is_main:
            atomic_torch_save(self.state_dict(), path)
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        path = Path(path) if path else self.out_dir / LAST_CKPT
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        saved = TrainConfig.from_dict(state["config"])
        differ = [
            f
            for f in saved.to_dict()
            if f not in RUN_ENVIRONMENT_FIELDS and getattr(saved, f) != getattr(self.cfg, f)
        ]
        if differ:
            raise ValueError(
                f"{path} was trained with a different config ({', '.join(differ)}); use a new --out"
            )
        self.load_state_dict(state)
        logger.info("resumed from %s at epoch %d step %d", path, self.epoch, self.step_in_epoch)
        return True

    # -- the loop ----------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask fit() to checkpoint and return after the current step (signal-handler safe)."""
        self.stop_requested = True

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop: every rank leaves at the same step under DDP."""
        if self.dist.world_size == 1:
            return self.stop_requested
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def log_metrics(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def fit(self, max_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
        """Train until `cfg.epochs` (or `max_steps` optimiser steps in total). Resumable."""
        from tqdm.auto import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            write_config(self.cfg, self.out_dir / "config.json")
            atomic_write_json(self.out_dir / "costs.json", self.costs.to_dict())
        while self.epoch < self.cfg.epochs:
            if max_steps is not None and self.global_step >= max_steps:
                break
            if self._stop_agreed():  # asked between epochs: last.pt already holds the epoch end
                break
            if (
                self.step_in_epoch == 0
                and self.epoch in self.cfg.prune_epochs
                and self.epoch not in self.pruned_epochs
            ):
                self.prune()
                if self.dist.is_main:
                    atomic_write_json(self.out_dir / "costs.json", self.costs.to_dict())
                logger.info(
                    "epoch %d: pruned to %d backbone parameters, %d MACs",
                    self.epoch,
                    self.costs.backbone_params,
                    self.costs.backbone_macs,
                )
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.step_in_epoch,
                desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                disable=not (progress and self.dist.is_main),
                mininterval=1.0 if sys.stderr.isatty() else 30.0,
                file=sys.stderr,
            )
            sums = self.epoch_sums
            resumed_seconds = self.epoch_seconds
            epoch_start = last_save = time.perf_counter()
            for x, y in self.train_loader.epoch(self.epoch, self.step_in_epoch):
                t0 = time.perf_counter()
                stats = self.train_step(x, y)
                self.step_seconds.append(time.perf_counter() - t0)
                self.step_in_epoch += 1
                self.epoch_count += 1
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.update(1)
                bar.set_postfix(loss=f"{stats['total']:.3f}", acc=f"{stats['acc_last']:.1f}")
                self.epoch_seconds = resumed_seconds + time.perf_counter() - epoch_start
                if max_steps is not None and self.global_step >= max_steps:
                    break
                if self._stop_agreed():
                    break
                if (
                    self.cfg.checkpoint_minutes > 0
                    and self.step_in_epoch < self.steps_per_epoch
                    and time.perf_counter() - last_save >= 60.0 * self.cfg.checkpoint_minutes
                ):
                    self.save()  # a recovery point; the epoch-end save below supersedes it
                    last_save = time.perf_counter()
            bar.close()
            epoch_seconds, count = self.epoch_seconds, self.epoch_count
            if self.step_in_epoch < self.steps_per_epoch:  # stopped mid-epoch (max_steps, signal)
                self.save()
                if self.stop_requested:
                    logger.info(
                        "stopped at epoch %d step %d: %s holds it; run again to resume",
                        self.epoch,
                        self.step_in_epoch,
                        LAST_CKPT,
                    )
                break
            self.epoch += 1
            self.step_in_epoch = 0
            self.epoch_sums, self.epoch_count, self.epoch_seconds = {}, 0, 0.0
            record: dict[str, Any] = {
                "epoch": self.epoch,
                "global_step": self.global_step,
                "lr": self.optimizer.param_groups[0]["lr"],
                "epoch_seconds": epoch_seconds,
                "step_seconds_median": float(np.median(self.step_seconds[-count:]))
                if count
                else None,
                "images_per_second": count
                * self.cfg.batch_size
                * self.dist.world_size
                / epoch_seconds,
            }
            record.update({f"train_{k}": v / max(count, 1) for k, v in sums.items()})
            if self.val_loader is not None and self.dist.is_main:
                self.last_val = evaluate(
                    self.eval_model,
                    self.val_loader,
                    self.device,
                    amp=self.use_cuda and self.cfg.amp,
                )
                record.update({f"val_{k}": v for k, v in self.last_val.items()})
            self.log_metrics(record)
            if self.dist.is_main:
                logger.info("epoch %d: %s", self.epoch, _brief(record))
            self.save()
            metric = selection_metric(self.cfg, record)
            if metric is not None and metric > self.best_value:
                self.best_value = metric
                self.save(BEST_CKPT)
                self.save()  # keep best_value in last.pt consistent
        if self.dist.is_main and not (self.out_dir / BEST_CKPT).is_file():
            # A run cut short (--max-steps) or without validation still leaves a checkpoint
            # that export accepts: the current weights, not ones picked on validation.
            logger.info("no validated best yet: %s holds the current weights", BEST_CKPT)
            self.save(BEST_CKPT)
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "val": self.last_val,
            "stopped": self.stop_requested,
        }


def selection_metric(cfg: TrainConfig, record: dict[str, Any]) -> float | None:
    """The value best.pt is chosen on: `cfg.best_metric` from this epoch's record.

    On a frozen backbone the final exit is the trained model itself and its accuracy never
    changes, so "best last exit" would keep the first epoch's half-trained heads forever; the
    default metric then becomes the mean validation accuracy of the exits being trained.
    """
    if cfg.freeze_backbone and cfg.best_metric == "val_acc_last":
        heads = sorted(
            (int(k.removeprefix("val_acc_exit")), float(v))
            for k, v in record.items()
            if k.startswith("val_acc_exit") and k.removeprefix("val_acc_exit").isdigit()
        )
        if len(heads) > 1:
            return sum(v for _, v in heads[:-1]) / (len(heads) - 1)
    value = record.get(cfg.best_metric)
    return None if value is None else float(value)


def _brief(record: dict[str, Any]) -> str:
    keys = [k for k in record if k.startswith("val_acc")] + ["train_total", "images_per_second"]
    return ", ".join(f"{k}={record[k]:.3f}" for k in keys if isinstance(record.get(k), float))


def evaluate_test_split(trainer: Trainer, checkpoint: str | Path | None = None) -> dict[str, float]:
    """Per-exit and ensemble accuracy on the official test split (for reports, never tuning)."""
    cfg = trainer.cfg
    model = trainer.eval_model
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location=trainer.device, weights_only=False)
        widths = dict(state.get("widths") or {})
        if widths != trainer.widths:  # saved before a pruning round: its own widths
            model = trainer.create_network(widths).to(trainer.device)
        model.load_state_dict(exported_weights(state))
    test = load_split(cfg.dataset, cfg.data_dir, "test", cfg.val_size, cfg.split_seed)
    loader = BatchLoader(test, 500, trainer.mean, trainer.std, train=False)
    amp = trainer.use_cuda and cfg.amp
    result = evaluate(model, loader, trainer.device, amp=amp)
    if cfg.report_tta_flip:
        flip = evaluate(model, loader, trainer.device, amp=amp, tta_flip=True)
        result.update({f"tta_flip_{k}": v for k, v in flip.items()})
    return result


@torch.no_grad()
def predict(
    model: nn.Module, loader: BatchLoader, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Every exit's predicted class per row (int16 K×N, the loader's order) and the
    ensemble's (int16 N: the argmax of the exits' mean softmax, as `evaluate` scores it and as
    the runtime's `ensemble` fallback answers)."""
    was_training = model.training
    model.eval()
    chunks: list[np.ndarray] = []
    ensemble: list[np.ndarray] = []
    for x, _ in loader.epoch(0):
        out = model(x.to(device))
        chunks.append(torch.stack([z.argmax(1) for z in out.logits]).cpu().numpy())
        probs = [torch.softmax(z.float(), dim=1) for z in out.logits]
        ensemble.append(ensemble_probs(probs).argmax(1).cpu().numpy())
    model.train(was_training)
    return (
        np.concatenate(chunks, axis=1).astype(np.int16),
        np.concatenate(ensemble).astype(np.int16),
    )


def write_test_predictions(trainer: Trainer, path: str | Path) -> dict[str, Any]:
    """Per-row predictions of every exit on the test split (for paired tests), written
    atomically as .npz with `predictions` (K×N), `ensemble` (N) and `labels` (N)."""
    cfg = trainer.cfg
    test = load_split(cfg.dataset, cfg.data_dir, "test", cfg.val_size, cfg.split_seed)
    loader = BatchLoader(test, 500, trainer.mean, trainer.std, train=False)
    preds, ensemble = predict(trainer.eval_model, loader, trainer.device)
    save_predictions(path, preds, ensemble, test.labels)
    return {"rows": int(preds.shape[1]), "exits": int(preds.shape[0])}


def save_predictions(
    path: str | Path, predictions: np.ndarray, ensemble: np.ndarray, labels: np.ndarray
) -> None:
    """`predict`'s output and the labels as the .npz paired tests read (training.compare's
    `read_predictions`): int16 `predictions` (K×N), `ensemble` (N), `labels` (N), atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        predictions=predictions.astype(np.int16),
        ensemble=ensemble.astype(np.int16),
        labels=labels.astype(np.int16),
    )
    atomic_write_bytes(Path(path), buffer.getvalue())


def exported_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The model weights a checkpoint stands for: its EMA copy when it has one."""
    ema = state.get("ema_model")
    return ema if ema is not None else state["model"]
