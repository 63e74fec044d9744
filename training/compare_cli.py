"""`earlyexit-compare`: train N recipes ("arms") under one protocol and several seeds, then
compare per-exit test accuracy with a paired McNemar test against a reference arm.

    earlyexit-compare --arms configs/compare/*.yaml --reference baseline --seeds 0,1 \\
        --runs runs/compare --out docs/results/compare --epochs 10 --parallel 2

Arms may also be loss registry names with overrides on a shared --base recipe (an ablation):

    earlyexit-compare --base configs/ablation/base.yaml --reference baseline \\
        --arms baseline deep_supervision self_distillation drg dsr drg_dsr sfr \\
               kd_self_distillation:teacher=runs/teacher/best.pt \\
        --runs runs/ablation --out docs/results/ablation --epochs 2 --seeds 0

Each arm × seed is an `earlyexit-train` run in RUNS/ARM_sSEED, started in the background
(PARALLEL at a time, log in the run directory) and resumed from its checkpoint when the
command is run again; finished runs are not retrained.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.atomic import atomic_write_bytes, atomic_write_json
from serving.cli_common import OneLineParser, UsageError, setup_cli_logging

log = logging.getLogger("earlyexit.compare")

# Everything that makes two arms' training budgets and data the same; arms may differ only in
# the loss, its options and the exits.
PROTOCOL_FIELDS = (
    "arch",
    "width",
    "stem",
    "dataset",
    "val_size",
    "split_seed",
    "train_subset",
    "crop_padding",
    "flip",
    "cutout",
    "autoaugment",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "nesterov",
    "schedule",
    "milestones",
    "gamma",
    "warmup_epochs",
    "ema_decay",
)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="earlyexit-compare", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--arms",
        nargs="+",
        required=True,
        help="one per arm: a YAML recipe, or a loss registry name with config overrides, "
        "LOSS[:FIELD=VALUE,...][@LABEL] (e.g. drg, ckdf:head=ckdf,teacher=t.pt@ckdf_head), "
        "built on --base",
    )
    p.add_argument(
        "--base",
        help="YAML recipe the registry-name arms start from (the shared protocol: arch, data, "
        "epochs, ...); its loss is replaced by the arm's",
    )
    p.add_argument("--reference", required=True, help="arm the others are tested against")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds (default 0,1)")
    p.add_argument("--runs", required=True, help="directory for the arms' run directories")
    p.add_argument("--out", required=True, help="report directory (JSON, Markdown, PNG)")
    p.add_argument("--epochs", type=int, help="override every arm's epochs")
    p.add_argument("--train-subset", type=int, help="override: train on N stratified rows")
    p.add_argument("--data-dir", help="override every arm's data directory")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--parallel", type=int, default=2, help="runs at once (default 2)")
    p.add_argument("--step-steps", type=int, default=10, help="steps per arm for step time")
    p.add_argument("--report-only", action="store_true", help="do not train; report finished runs")
    p.add_argument(
        "--vary",
        default="",
        help="comma-separated protocol fields the arms may differ in (e.g. arch,width for an "
        "architecture ablation at one budget); the report lists each arm's values",
    )
    p.add_argument(
        "--latency",
        action="store_true",
        help="also export each arm's first-seed run and measure batch-1 latency of the exit "
        "chain at full depth and of the plain single graph (onnxruntime CPU, --threads)",
    )
    p.add_argument(
        "--pairs",
        default="",
        help="comma-separated A:B arm pairs also tested against each other (deepest exit, "
        "McNemar), e.g. base_p50:sd_p50",
    )
    return p


def _parse_pairs(text: str, names: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        a, sep, b = item.partition(":")
        if not sep or a not in names or b not in names or a == b:
            raise UsageError(f"--pairs: {item!r} is not A:B with two different arm names")
        pairs.append((a, b))
    return pairs


def _parse_vary(text: str) -> tuple[str, ...]:
    fields = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in fields if f not in PROTOCOL_FIELDS]
    if unknown:
        raise UsageError(
            f"--vary: {', '.join(unknown)} is not a protocol field "
            f"(one of {', '.join(PROTOCOL_FIELDS)})"
        )
    return fields


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UsageError(f"--seeds must name distinct non-negative integers, got {text!r}")
    return seeds


def load_arms(args: argparse.Namespace, varied: tuple[str, ...] = ()):
    from .compare import Arm, parse_arm_spec, with_overrides
    from .config import TrainConfig, load_yaml_config

    base: dict = {}
    if args.base:
        if not Path(args.base).is_file():
            raise UsageError(f"--base recipe not found: {args.base}")
        try:
            base = load_yaml_config(args.base)
        except Exception as exc:  # yaml errors, bad structure
            raise UsageError(f"cannot read --base {args.base}: {exc}") from exc
    arms = []
    for path in args.arms:
        if path.endswith((".yaml", ".yml", ".json")):
            if not Path(path).is_file():
                raise UsageError(f"arm recipe not found: {path}")
            name, recipe = Path(path).stem, None
        else:
            try:
                name, loss, overrides = parse_arm_spec(path)
            except ValueError as exc:
                raise UsageError(str(exc)) from exc
            recipe = {**base, "loss": loss, **overrides}
        try:
            data = recipe if recipe is not None else load_yaml_config(path)
            cfg = TrainConfig.from_dict(data)
            cfg = with_overrides(
                cfg,
                epochs=args.epochs,
                train_subset=args.train_subset,
                data_dir=args.data_dir,
                num_threads=args.threads,
            ).resolved()
            cfg.validate()
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{path}: {exc}") from exc
        arms.append(Arm(name, cfg))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise UsageError(
            f"arm names (file stems, loss names or @LABELs) must be distinct: {', '.join(names)}"
        )
    if args.reference not in names:
        raise UsageError(f"--reference {args.reference!r} is not an arm: {', '.join(names)}")
    first = arms[0]
    fixed = [f for f in PROTOCOL_FIELDS if f not in varied]
    for arm in arms[1:]:
        differ = [f for f in fixed if getattr(arm.config, f) != getattr(first.config, f)]
        if differ:
            raise UsageError(
                f"arm {arm.name!r} differs from {first.name!r} in {', '.join(differ)}: "
                "arms must share one protocol (--vary names the fields they may differ in)"
            )
    return arms


def _check_starting_weights(arms, seeds: list[int], runs: Path) -> None:
    """UsageError before anything starts when a run still to train names `init` weights that
    are not there (e.g. "{seed}" in a continuation recipe whose first run is missing)."""
    import dataclasses

    from .compare import run_dir, run_finished

    for seed in seeds:
        for arm in arms:
            path = dataclasses.replace(arm.config, seed=seed).init_path()
            if path is None or path.is_file():
                continue
            if not run_finished(run_dir(runs, arm.name, seed), arm.config.epochs):
                raise UsageError(f"{arm.name} seed {seed}: its init weights {path} do not exist")


def train_all(arms, seeds: list[int], runs: Path, parallel: int) -> None:
    """Start every unfinished arm × seed as a background `earlyexit-train` (PARALLEL at a
    time), with one progress bar per run (epochs done). SIGTERM or SIGINT is passed on to the
    runs (each saves its last.pt after the step in progress) and no further run starts."""
    from tqdm.auto import tqdm

    from .compare import epochs_done, run_dir, run_finished

    todo = []
    # Seed-major: every arm of the first seed finishes first, so an interrupted comparison
    # already holds one complete arm set to report.
    for seed in seeds:
        for arm in arms:
            run = run_dir(runs, arm.name, seed)
            if not run_finished(run, arm.config.epochs):
                todo.append((arm, seed, run))
    if not todo:
        return
    bars = {
        str(run): tqdm(
            total=arm.config.epochs,
            initial=epochs_done(run),
            desc=run.name,
            position=i,
            unit="epoch",
            file=sys.stderr,
        )
        for i, (arm, seed, run) in enumerate(todo)
    }
    waiting = list(todo)
    active: list[tuple[subprocess.Popen[bytes], Path]] = []
    failed: list[str] = []
    stop: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stop.append(signum)
        for proc, _run in active:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while (waiting and not stop) or active:
            while waiting and not stop and len(active) < parallel:
                active.append(_start_run(*waiting.pop(0)))
            time.sleep(2.0)
            for proc, run in list(active):
                bar = bars[str(run)]
                bar.update(epochs_done(run) - bar.n)
                if proc.poll() is not None:
                    active.remove((proc, run))
                    if proc.returncode != 0 and not stop:
                        failed.append(
                            f"{run.name} (exit {proc.returncode}, see {run / 'train.log'})"
                        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for bar in bars.values():
            bar.close()
    if stop:
        raise RuntimeError(
            f"stopped by {signal.Signals(stop[0]).name}: the runs saved their last.pt; "
            "the same command resumes them"
        )
    if failed:
        raise RuntimeError("runs failed: " + "; ".join(failed))


def _start_run(arm, seed: int, run: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """One arm × seed as a background `earlyexit-train` logging to RUN/train.log."""
    import dataclasses

    run.mkdir(parents=True, exist_ok=True)
    recipe = dataclasses.replace(arm.config, seed=seed).to_dict()
    atomic_write_json(run / "recipe.json", recipe)  # JSON is YAML: --config reads it
    with open(run / "train.log", "ab") as logfile:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "training.cli",
                "--config",
                str(run / "recipe.json"),
                "--out",
                str(run),
                "--no-progress",
            ],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            # Ctrl-C at a terminal reaches this process alone, which passes one SIGTERM on: a
            # run that got both would take the second as "stop now, no checkpoint".
            start_new_session=True,
        )
    return proc, run


def main(argv: list[str] | None = None) -> int:
    setup_cli_logging(timestamps=True)
    try:
        args = build_parser().parse_args(argv)
        seeds = _parse_seeds(args.seeds)
        if args.threads < 1 or args.parallel < 1 or args.step_steps < 1:
            raise UsageError("--threads, --parallel and --step-steps must be ≥ 1")
        varied = _parse_vary(args.vary)
        arms = load_arms(args, varied)
        pairs = _parse_pairs(args.pairs, [a.name for a in arms])
        if not args.report_only:
            _check_starting_weights(arms, seeds, Path(args.runs))
    except UsageError as exc:
        print(f"earlyexit-compare: error: {exc}", file=sys.stderr)
        return 2
    from .compare import (
        measure_chain_latency,
        measure_step_times,
        paired_tests,
        plot,
        plot_params,
        render_markdown,
        run_dir,
        run_finished,
        summarize,
    )

    runs, out = Path(args.runs), Path(args.out)
    try:
        if not args.report_only:
            train_all(arms, seeds, runs, args.parallel)
        missing = [
            run_dir(runs, a.name, s).name
            for a in arms
            for s in seeds
            if not run_finished(run_dir(runs, a.name, s), a.config.epochs)
        ]
        if missing:
            print(
                f"earlyexit-compare: error: unfinished runs: {', '.join(missing)}", file=sys.stderr
            )
            return 2
        log.info("measuring step time: %d interleaved steps per arm", args.step_steps)
        steps = measure_step_times(arms, steps=args.step_steps, threads=args.threads)
        latency = None
        if args.latency:
            log.info("measuring batch-1 latency of every arm's exported bundle (seed %d)", seeds[0])
            latency = measure_chain_latency(arms, seeds[0], runs, threads=args.threads)
        report = summarize(arms, seeds, runs, args.reference, steps, varied, latency)
        report["pairs"] = paired_tests(pairs, seeds, runs)
    except RuntimeError as exc:
        print(f"earlyexit-compare: error: {exc}", file=sys.stderr)
        return 1
    command = "earlyexit-compare " + " ".join(sys.argv[1:] if argv is None else argv)
    report["command"] = command
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", report)
    atomic_write_bytes(out / "README.md", render_markdown(report, command).encode())
    plot(report, out / "compare.png")
    plot_params(report, out / "accuracy_vs_params.png")
    for name, arm in report["arms"].items():
        diff = arm.get("deepest_difference_points")
        log.info(
            "%s: exits %s%s",
            name,
            " / ".join(f"{a:.2f}" for a in arm["mean_exit_accuracy"]),
            f", deepest {diff['mean']:+.2f} vs {args.reference}" if diff else "",
        )
    print(json.dumps({"out": str(out), "arms": list(report["arms"])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
