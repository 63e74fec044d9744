"""Training step time of the recipes side by side (interleaved in one process, same batch and
threads): the plain backbone, self-distillation with `lite` exits at stage ends and after
blocks 1, 2, 3, 5, 7, and the same exits trained on a frozen backbone (--freeze-backbone).

    python scripts/step_time.py --out docs/results/step_time --steps 20 --threads 2

Writes step_time.json and step_time.png under --out.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from core.atomic import atomic_write_json
from core.plots import pyplot, save_png
from training.compare import Arm, measure_step_times
from training.config import TrainConfig


def arms(width: float, batch: int) -> list[Arm]:
    base = {"arch": "resnet18", "width": width, "head": "lite", "batch_size": batch}
    blocks = {"exit_blocks": (1, 2, 3, 5, 7)}
    frozen = {"init": "trained.pt", "freeze_backbone": True}  # timing only: nothing is loaded
    return [
        Arm("baseline", TrainConfig(**base, loss="baseline", exits=1).resolved()),
        Arm("sd_stage_exits", TrainConfig(**base, exits=4)),
        Arm("sd_stage_exits_frozen", TrainConfig(**base, exits=4, **frozen)),
        Arm("sd_block_exits", TrainConfig(**base, **blocks).resolved()),
        Arm("sd_block_exits_frozen", TrainConfig(**base, **blocks, **frozen).resolved()),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        print("step_time: error: --steps and --threads must be >= 1", file=sys.stderr)
        return 2
    times = measure_step_times(arms(args.width, args.batch_size), args.steps, args.threads)
    ref = times["baseline"]["step_s"]
    report = {
        "command": "python scripts/step_time.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "width": args.width,
        "batch_size": args.batch_size,
        "arms": {
            name: {
                **t,
                "vs_baseline": t["step_s"] / ref,
                "vs_unfrozen": t["step_s"] / times[name.removesuffix("_frozen")]["step_s"],
            }
            for name, t in times.items()
        },
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "step_time.json", report)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(report["arms"])
    ax.barh(names, [report["arms"][n]["vs_baseline"] for n in names])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("step time ÷ plain backbone's (same batch, interleaved)")
    ax.invert_yaxis()
    fig.tight_layout()
    save_png(fig, out / "step_time.png", tight=False)
    for name in names:
        arm = report["arms"][name]
        print(f"{name}: {1000 * arm['step_s']:.0f} ms, {arm['vs_baseline']:.2f}x baseline, "
              f"{arm['vs_unfrozen']:.2f}x unfrozen")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
