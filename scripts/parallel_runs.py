"""Two training runs on one host: side by side on one thread each (`earlyexit-compare
--parallel 2 --threads 1`, the default) or one after the other on every core (`--parallel 1
--threads N`)? Measured as an A/B, both ways in each repetition, the order alternating.

    python scripts/parallel_runs.py --configs configs/r18w05_sd_long.yaml \\
        configs/r18w05_base_long.yaml --steps 12 --reps 4 --out docs/results/parallel_runs

A "pair" is one step of each recipe: side by side it costs the slower process's median step
(both run at once), in turn the sum of the two medians on N threads. Each measurement is a fresh
process timing its own steps (`training.compare.measure_step_times`: warm-up excluded), so
process start-up does not count. Writes parallel_runs.json and parallel_runs.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from core.atomic import atomic_write_json
from core.plots import pyplot, save_png


def _worker(config: str, steps: int, threads: int) -> int:
    from training.compare import Arm, measure_step_times
    from training.config import TrainConfig, load_yaml_config

    cfg = TrainConfig.from_dict(load_yaml_config(config)).resolved()
    times = measure_step_times([Arm("arm", cfg)], steps=steps, threads=threads)
    sys.stdout.write(json.dumps({"config": config, **times["arm"]}) + "\n")
    return 0


def _start(config: str, steps: int, threads: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--worker", config, "--steps", str(steps)]
    return subprocess.Popen([*cmd, "--threads", str(threads)], stdout=subprocess.PIPE, text=True)


def _step_s(proc: subprocess.Popen[str]) -> float:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"a timing process failed (exit {proc.returncode})")
    return float(json.loads(out.strip().splitlines()[-1])["step_s"])


def side_by_side(configs: list[str], steps: int) -> list[float]:
    procs = [_start(c, steps, 1) for c in configs]
    return [_step_s(p) for p in procs]


def in_turn(configs: list[str], steps: int, threads: int) -> list[float]:
    return [_step_s(_start(c, steps, threads)) for c in configs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", help="the recipes (YAML) of the runs to place")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="in turn (all cores)")
    p.add_argument("--out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.reps < 1 or args.threads < 1:
        print("parallel_runs: error: --steps, --reps and --threads must be >= 1", file=sys.stderr)
        return 2
    if args.worker:
        return _worker(args.worker, args.steps, args.threads)
    if not args.configs or not args.out:
        print("parallel_runs: error: --configs and --out are required", file=sys.stderr)
        return 2
    missing = [c for c in args.configs if not Path(c).is_file()]
    if missing:
        print(f"parallel_runs: error: recipe not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    reps = []
    for rep in range(args.reps):
        # Alternate which way goes first: the host's speed drifts over minutes.
        order = ["side_by_side", "in_turn"] if rep % 2 else ["in_turn", "side_by_side"]
        row: dict[str, list[float]] = {}
        for way in order:
            if way == "side_by_side":
                row[way] = side_by_side(args.configs, args.steps)
            else:
                row[way] = in_turn(args.configs, args.steps, args.threads)
        pair_side, pair_turn = max(row["side_by_side"]), sum(row["in_turn"])
        reps.append(
            {
                "order": order,
                "step_s_side_by_side": row["side_by_side"],
                "step_s_in_turn": row["in_turn"],
                "pair_s_side_by_side": pair_side,
                "pair_s_in_turn": pair_turn,
                "in_turn_over_side_by_side": pair_turn / pair_side,
            }
        )
        print(f"rep {rep + 1}: a pair of steps {pair_side:.2f} s side by side, "
              f"{pair_turn:.2f} s in turn ({pair_turn / pair_side:.2f}x)")  # fmt: skip
    report = {
        "command": "python scripts/parallel_runs.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "configs": args.configs,
        "steps": args.steps,
        "threads_in_turn": args.threads,
        "reps": reps,
        "median_in_turn_over_side_by_side": statistics.median(
            r["in_turn_over_side_by_side"] for r in reps
        ),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "parallel_runs.json", report)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    x = range(1, len(reps) + 1)
    ax.plot(x, [r["pair_s_side_by_side"] for r in reps], "o-", label="side by side, 1 thread each")
    ax.plot(x, [r["pair_s_in_turn"] for r in reps], "s-", label=f"in turn, {args.threads} threads")
    ax.set_xlabel("repetition")
    ax.set_ylabel("seconds per pair of steps")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    save_png(fig, out / "parallel_runs.png", tight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
