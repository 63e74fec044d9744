"""Baseline vs self-distillation: per-exit accuracy from two run directories and the SD/baseline
training step-time ratio, measured side by side (interleaved) in one process.

`earlyexit-train-report --sd RUN --baseline RUN --out docs/results/training`
writes `report.json`, `report.md` and `val_accuracy.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_bytes, atomic_write_json
from serving.cli_common import setup_cli_logging

logger = logging.getLogger(__name__)


def measure_step_ratio(
    arch: str,
    width: float,
    exits: int,
    batch_size: int = 128,
    steps: int = 20,
    threads: int = 2,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    head: str = "attention",
) -> dict[str, Any]:
    """Median seconds per SGD step of SD (K exits) and baseline (backbone only), interleaved."""
    import torch

    from .losses import create_loss
    from .models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch_size, *input_shape)
    y = torch.randint(0, num_classes, (batch_size,))
    variants = {}
    for name, k, loss in (("sd", exits, "self_distillation"), ("baseline", 1, "baseline")):
        model = create_model(arch, num_classes, exits=k, width=width, head=head).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        variants[name] = (model, opt, create_loss(loss))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(steps + 2):  # two warm-up rounds
        for name, (model, opt, loss_fn) in variants.items():
            t0 = time.perf_counter()
            out = model(x)
            loss_fn(out.logits, out.features, y).total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 2:
                times[name].append(time.perf_counter() - t0)
    sd, base = statistics.median(times["sd"]), statistics.median(times["baseline"])
    return {
        "sd_step_s": sd,
        "baseline_step_s": base,
        "ratio": sd / base,
        "steps": steps,
        "batch_size": batch_size,
        "threads": threads,
    }


def _read_run(run: Path) -> dict[str, Any]:
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    test = (
        json.loads((run / "test_metrics.json").read_text())
        if (run / "test_metrics.json").is_file()
        else {}
    )
    config = json.loads((run / "config.json").read_text())
    return {"metrics": metrics, "test": test, "config": config}


def _plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    from core.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in runs.items():
        epochs = [m["epoch"] for m in run["metrics"]]
        keys = sorted(k for k in run["metrics"][-1] if k.startswith("val_acc_exit"))
        for key in keys:
            style = "-" if name == "self-distillation" else "--"
            ax.plot(
                epochs,
                [m[key] for m in run["metrics"]],
                style,
                label=f"{name} {key.removeprefix('val_acc_')}",
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(fig, path, tight=False)


def build_report(
    sd_dir: Path, baseline_dir: Path, step_ratio: dict[str, Any] | None
) -> dict[str, Any]:
    sd, base = _read_run(sd_dir), _read_run(baseline_dir)
    sd_test, base_test = sd["test"].get("final", {}), base["test"].get("final", {})
    report: dict[str, Any] = {
        "sd_run": str(sd_dir),
        "baseline_run": str(baseline_dir),
        "sd_config": sd["config"],
        "baseline_config": base["config"],
        "test_accuracy": {"self_distillation": sd_test, "baseline": base_test},
        "deepest_gain_points": (
            sd_test.get("acc_last", float("nan")) - base_test.get("acc_last", float("nan"))
        ),
        "epoch_seconds_median": {
            "self_distillation": statistics.median(m["epoch_seconds"] for m in sd["metrics"]),
            "baseline": statistics.median(m["epoch_seconds"] for m in base["metrics"]),
        },
        "step_time": step_ratio,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": sys.version.split()[0],
        },
    }
    return report


def render_markdown(report: dict[str, Any], command: str) -> str:
    sd, base = report["test_accuracy"]["self_distillation"], report["test_accuracy"]["baseline"]
    exits = sorted(k for k in sd if k.startswith("acc_exit"))
    lines = [
        "# Baseline vs self-distillation (CIFAR-10 test split)",
        "",
        f"Produced by: `{command}`",
        "",
        f"SD config: arch={report['sd_config']['arch']} width={report['sd_config']['width']} "
        f"exits={report['sd_config']['exits']} "
        f"head={report['sd_config'].get('head', 'attention')} "
        f"epochs={report['sd_config']['epochs']} "
        f"schedule={report['sd_config']['schedule']} seed={report['sd_config']['seed']} "
        f"(baseline: same arch, width, seed, epochs; backbone only, CE).",
        "",
        "| model | " + " | ".join(e.removeprefix("acc_") for e in exits) + " | ensemble |",
        "|---|" + "---|" * (len(exits) + 1),
        "| self-distillation | "
        + " | ".join(f"{sd[e]:.2f}" for e in exits)
        + f" | {sd.get('acc_ensemble', float('nan')):.2f} |",
        "| baseline | "
        + " | ".join("" for _ in exits[:-1])
        + (" | " if len(exits) > 1 else "")
        + f"{base.get('acc_last', float('nan')):.2f} | – |",
        "",
        f"Deepest exit gain: **{report['deepest_gain_points']:+.2f} points** (target ≥ +1).",
    ]
    if report.get("step_time"):
        st = report["step_time"]
        lines += [
            "",
            f"Step time, interleaved in one process (batch {st['batch_size']}, {st['threads']} "
            f"threads, median of {st['steps']}): SD {st['sd_step_s'] * 1000:.1f} ms, baseline "
            f"{st['baseline_step_s'] * 1000:.1f} ms, **ratio {st['ratio']:.2f}** (target ≤ 1.3).",
        ]
    em = report["epoch_seconds_median"]
    lines += [
        "",
        f"Median epoch wall time during the runs (shared, noisy machine): SD "
        f"{em['self_distillation']:.0f} s, baseline {em['baseline']:.0f} s.",
        "",
        f"Machine: {report['machine']['platform']}, Python {report['machine']['python']}.",
        "",
        "![validation accuracy](val_accuracy.png)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    setup_cli_logging()
    p = argparse.ArgumentParser(prog="earlyexit-train-report", description=__doc__)
    p.add_argument("--sd", required=True, type=Path, help="self-distillation run directory")
    p.add_argument("--baseline", required=True, type=Path, help="baseline run directory")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=20, help="interleaved steps per variant")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-step-time", action="store_true")
    args = p.parse_args(argv)
    for run in (args.sd, args.baseline):
        if not (run / "metrics.jsonl").is_file() or not (run / "config.json").is_file():
            print(
                f"earlyexit-train-report: error: {run} is not a finished run directory",
                file=sys.stderr,
            )
            return 2
    cfg = json.loads((args.sd / "config.json").read_text())
    ratio = (
        None
        if args.no_step_time
        else measure_step_ratio(
            cfg["arch"],
            cfg["width"],
            cfg["exits"],
            cfg["batch_size"],
            args.steps,
            args.threads,
            head=cfg.get("head", "attention"),  # runs from before the head registry: the seed's
        )
    )
    report = build_report(args.sd, args.baseline, ratio)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "earlyexit-train-report " + " ".join(sys.argv[1:] if argv is None else argv)
    report["command"] = command
    atomic_write_json(args.out / "report.json", report)
    atomic_write_bytes(args.out / "report.md", render_markdown(report, command).encode())
    _plot(
        {"self-distillation": _read_run(args.sd), "baseline": _read_run(args.baseline)},
        args.out / "val_accuracy.png",
    )
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
