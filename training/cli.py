"""`earlyexit-train`: train a multi-exit network (or a baseline) into a run directory."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_json
from core.datasets import DATASETS, DatasetError, download
from serving.cli_common import OneLineParser, UsageError, setup_cli_logging

log = logging.getLogger("earlyexit.train")


# flag name → config field, for flags that override a --config file
_FLAG_FIELDS = {
    "arch": "arch",
    "width": "width",
    "stem": "stem",
    "exits": "exits",
    "head": "head",
    "act": "act",
    "groups": "groups",
    "dataset": "dataset",
    "data_dir": "data_dir",
    "val_size": "val_size",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "schedule": "schedule",
    "loss": "loss",
    "distill_path": "distill_path",
    "alpha": "alpha",
    "lam": "lam",
    "temperature": "temperature",
    "distill_off_epochs": "distill_off_epochs",
    "seed": "seed",
    "init_seed": "init_seed",
    "cutout": "cutout",
    "cutmix": "cutmix",
    "autoaugment": "autoaugment",
    "threads": "num_threads",
    "checkpoint_minutes": "checkpoint_minutes",
    "warmup_epochs": "warmup_epochs",
    "weight_decay": "weight_decay",
    "best_metric": "best_metric",
    "loss_reduction": "loss_reduction",
    "distill": "distill",
    "feature_hint": "feature_hint",
    "feature_exits": "feature_exits",
    "label_smoothing": "label_smoothing",
    "ema_decay": "ema_decay",
    "nesterov": "nesterov",
    "report_tta_flip": "report_tta_flip",
    "train_subset": "train_subset",
    "init": "init",
    "exit_blocks": "exit_blocks",
    "freeze_backbone": "freeze_backbone",
    "init_heads": "init_heads",
    "prune_ratio": "prune_ratio",
    "prune_epochs": "prune_epochs",
    "prune_round_to": "prune_round_to",
    "teacher": "teacher",
    "kd_weight": "kd_weight",
    "kd_temperature": "kd_temperature",
    "kd_exits": "kd_exits",
    "ckdf_alpha": "ckdf_alpha",
    "ckdf_beta": "ckdf_beta",
    "drg_alpha": "drg_alpha",
    "drg_temperature": "drg_temperature",
    "dsr_beta": "dsr_beta",
    "dsr_temperature": "dsr_temperature",
    "sfr_weight": "sfr_weight",
    "sfr_distance": "sfr_distance",
    "dls_epsilon": "dls_epsilon",
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="earlyexit-train", description=__doc__)
    p.add_argument("--config", help="YAML file of TrainConfig fields (flags override it)")
    p.add_argument("--out", required=True, help="run directory (resumed if it has last.pt)")
    p.add_argument("--arch", help="backbone name (see training.list_models())")
    p.add_argument("--width", type=float, help="channel width multiplier")
    p.add_argument("--stem", choices=["cifar", "imagenet"])
    p.add_argument("--exits", type=int, help="number of exits K (≤ backbone stages)")
    p.add_argument(
        "--head",
        help="exit-head variant: attention (Zhang et al. 2021), lite, pool, st (ResNet-KL paper) or ckdf (Ni et al. 2024)",
    )
    p.add_argument(
        "--act",
        help="activation of the backbone and every exit head: relu | trelu (the ResNet-KL paper's "
        "T-ReLU: x for x > 0, tanh(x) otherwise); default: the architecture's own",
    )
    p.add_argument(
        "--groups",
        type=int,
        help="group convolutions (Ni et al. 2024, §3.4): groups of every residual 3×3 conv (ResNet) or "
        "of the last two modules' convs (VGG-BN); must divide the channel widths",
    )
    p.add_argument(
        "--exit-blocks",
        help="put the shallow exits after these backbone blocks (1-based indices or names, "
        "e.g. 1,2,3,5,7 or layer1.0,layer2.1; training.models.block_names(ARCH) lists them; "
        "resnet18 has 8); the final exit always follows the last block",
    )
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--data-dir")
    p.add_argument("--download", action="store_true", help="fetch official archives first")
    p.add_argument("--val-size", type=int, help="rows held out of train for tuning")
    p.add_argument(
        "--train-subset", type=int, help="train on a class-stratified subset of N rows (0 = all)"
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["multistep", "cosine", "linear"])
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--label-smoothing", type=float, help="ε on every CE term (0 = off)")
    p.add_argument("--ema-decay", type=float, help="EMA of weights, e.g. 0.999 (0 = off)")
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument(
        "--loss",
        help="self_distillation | baseline | deep_supervision | resnet_kl (ResNet-KL paper) | ckdf "
        "(Ni et al. 2024) | sfr (Hou & Fan 2025) | drg | dsr | drg_dsr (Wang et al.) | kd_self_distillation "
        "(Zhang et al. 2021, Table 3)",
    )
    p.add_argument(
        "--teacher",
        help="a checkpoint of this project (e.g. a trained run's best.pt) the losses "
        "kd_self_distillation and ckdf learn from; frozen, never saved with this run",
    )
    p.add_argument("--kd-weight", type=float, help="kd_self_distillation: teacher KL weight")
    p.add_argument(
        "--kd-temperature", type=float, help="teacher KL temperature (kd_self_distillation, ckdf)"
    )
    p.add_argument(
        "--kd-exits", help="kd_self_distillation: teacher KL on the deepest exit or all exits"
    )
    p.add_argument("--ckdf-alpha", type=float, help="ckdf α (eq. 3–4), in [0, 1]")
    p.add_argument("--ckdf-beta", type=float, help="ckdf β (eq. 3, 5, 6), in [0, 1]")
    p.add_argument("--drg-alpha", type=float, help="drg / drg_dsr α (eq. 10; paper 0.2)")
    p.add_argument("--drg-temperature", type=float, help="drg τ (eq. 9; paper 1)")
    p.add_argument("--dsr-beta", type=float, help="dsr / drg_dsr β (eq. 12; paper 1)")
    p.add_argument("--dsr-temperature", type=float, help="dsr τ (eq. 11; paper 4)")
    p.add_argument("--sfr-weight", type=float, help="sfr: weight of the feature loss")
    p.add_argument("--sfr-distance", help="sfr feature distance: l2 | emd (Sinkhorn)")
    p.add_argument(
        "--dls-epsilon",
        type=float,
        help="sfr: dynamic label smoothing ε, mass moved to the wrong classes by the previous "
        "epoch's predictions (0 = off)",
    )
    p.add_argument("--distill-path", choices=["deepest", "ensemble", "transitive", "dense"])
    p.add_argument("--loss-reduction", help="sum (every implementation) | mean (eq. 3 as printed)")
    p.add_argument("--distill", help="soft_ce (authors' code) | kl_t2 (T²·KL, paper)")
    p.add_argument("--feature-hint", help="none | l2 (paper) | adapter (learned linear adapter)")
    p.add_argument("--feature-exits", help="comma-separated shallow exits given the hint, e.g. 1,2")
    p.add_argument("--alpha", type=float)
    p.add_argument("--lambda", dest="lam", type=float)
    p.add_argument("--temperature", type=float)
    p.add_argument("--distill-off-epochs", type=int)
    p.add_argument("--cutout", type=int, help="Cutout square size (0 = off)")
    p.add_argument(
        "--cutmix",
        type=float,
        help="CutMix (ResNet-KL paper): probability a batch is mixed, box area ~ U(0, 1) (0 = off)",
    )
    p.add_argument("--autoaugment", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--report-tta-flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="test report also gives flip-averaged accuracy (reporting only, never exported)",
    )
    p.add_argument(
        "--init",
        help="start from trained weights: a checkpoint of this project (e.g. a plain baseline's "
        "best.pt) or a plain state_dict of the registry backbone; {seed} in the path stands for "
        "the run's seed",
    )
    p.add_argument(
        "--freeze-backbone",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --init: train only the exit heads (backbone weights and BN statistics "
        "frozen), so the final exit stays the plain model",
    )
    p.add_argument(
        "--init-heads",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --init of a multi-exit checkpoint: load its exit heads too, each into the "
        "exit after the same block (e.g. a trained self-distilled model to prune and "
        "fine-tune); exits it lacks, such as one added with --exit-blocks, start fresh",
    )
    p.add_argument(
        "--prune-ratio",
        type=float,
        help="structured L1 channel pruning: fraction of every block-internal channel set "
        "removed per round, in (0, 1) (ResNet-KL paper; Zhang et al. 2021, §4.6)",
    )
    p.add_argument(
        "--prune-epochs",
        help="comma-separated epochs before which a pruning round runs (0 = before training, "
        "e.g. with --init a trained model then fine-tuned; 1,2,3 = after each early epoch)",
    )
    p.add_argument(
        "--prune-round-to",
        type=int,
        help="round every kept width to a multiple of N (e.g. 8, the vector width a CPU "
        "runtime computes in; default 1)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--init-seed",
        type=int,
        help="seed of the network's fresh weights (default: --seed); draws to be averaged "
        "into a soup share it, so heads --init does not supply start alike",
    )
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--best-metric", help="record key that picks best.pt (default val_acc_last)")
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        help="also write last.pt mid-epoch at least every N minutes (default 10; 0 = epoch ends)",
    )
    p.add_argument("--max-steps", type=int, help="stop after N optimiser steps (smoke runs)")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    p.add_argument("--no-progress", action="store_true")
    return p


def resolve_config(args: argparse.Namespace):
    from .config import TrainConfig, load_yaml_config

    base = {}
    if args.config:
        if not Path(args.config).is_file():
            raise UsageError(f"config file not found: {args.config}")
        try:
            base = load_yaml_config(args.config)
        except Exception as exc:  # yaml errors, bad structure
            raise UsageError(f"cannot read config {args.config}: {exc}") from exc
    for flag, field in _FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            base[field] = value
    try:
        cfg = TrainConfig.from_dict(base).resolved()
        cfg.validate()
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    return cfg


def check_inputs(cfg) -> None:
    """Fail fast on what a user mistypes, before any heavy work."""
    from .losses import list_losses
    from .models import create_backbone, list_models

    if cfg.arch not in list_models():
        raise UsageError(f"unknown arch {cfg.arch!r}; valid: {', '.join(list_models())}")
    if cfg.loss not in list_losses():
        raise UsageError(f"unknown loss {cfg.loss!r}; valid: {', '.join(list_losses())}")
    if cfg.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {cfg.dataset!r}; valid: {', '.join(DATASETS)}")
    stages = create_backbone(cfg.arch, 10, width=0.125).num_stages
    if cfg.groups != 1 or cfg.act is not None:
        import torch

        # Built at the run's width on the meta device (no memory, no init cost): groups that do
        # not divide a width, or an option this backbone lacks, fail here in one line.
        try:
            with torch.device("meta"):
                create_backbone(cfg.arch, 10, width=cfg.width, groups=cfg.groups, act=cfg.act)
        except ValueError as exc:
            raise UsageError(f"--arch {cfg.arch}: {exc}") from exc
    if cfg.exit_blocks is None and not 1 <= cfg.exits <= stages:
        raise UsageError(f"--exits {cfg.exits} is invalid: {cfg.arch} has {stages} stages")


def _stop_on_signals(trainer: Any) -> list[signal.Signals]:
    """SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C) makes the run save last.pt after the
    step in progress and exit; a second signal ends it at once. Returns the list the first
    signal is recorded in."""
    received: list[signal.Signals] = []

    def handle(signum: int, _frame: object) -> None:
        if received:  # asked twice: no checkpoint, stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signal.Signals(signum))
        trainer.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)
    return received


def main(argv: list[str] | None = None) -> int:
    setup_cli_logging(timestamps=True)
    try:
        args = build_parser().parse_args(argv)
        cfg = resolve_config(args)
        check_inputs(cfg)
        out = Path(args.out)
        if args.no_resume and (out / "last.pt").exists():
            raise UsageError(
                f"{out} already holds a run (last.pt); drop --no-resume to continue it"
            )
        if args.download:
            download(cfg.dataset, cfg.data_dir)
        from .engine import (
            BEST_CKPT,
            Trainer,
            evaluate_test_split,
            init_distributed,
            write_test_predictions,
        )

        dist_env = init_distributed()
        trainer = Trainer(cfg, out, dist_env=dist_env)
        trainer.resume()
    except (UsageError, DatasetError, ValueError) as exc:  # InitError is a ValueError
        print(f"earlyexit-train: error: {exc}", file=sys.stderr)
        return 2

    stopped_by = _stop_on_signals(trainer)
    summary = trainer.fit(max_steps=args.max_steps, progress=not args.no_progress)
    if trainer.stop_requested and stopped_by:
        # 128 + signal number, as a shell reports a process the signal ended: a parent
        # (earlyexit-compare, a scheduler) sees the run is unfinished, yet last.pt is whole.
        log.info("stopped by %s; the same command resumes the run", stopped_by[0].name)
        return 128 + int(stopped_by[0])
    if dist_env.is_main and cfg.eval_test and trainer.epoch >= cfg.epochs:
        result = {"final": evaluate_test_split(trainer)}
        # Before best.pt is loaded into the model below: the final weights' rows, for paired
        # tests between runs (earlyexit-compare).
        write_test_predictions(trainer, out / "test_predictions.npz")
        best = out / BEST_CKPT
        if best.is_file():
            result["best"] = evaluate_test_split(trainer, best)
        result["config"] = dataclasses.asdict(cfg)
        atomic_write_json(out / "test_metrics.json", result)
        log.info("test accuracy (final): %s", result["final"])
    log.info("done: %s", summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
