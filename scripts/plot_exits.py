"""Per-exit accuracy against the MACs a row pays to reach that exit, for several runs.

Each run directory gives its exits' val accuracy (best.pt's `val_metrics`), test accuracy
(test_metrics.json) and per-segment MACs (best.pt's `costs`: a row reaching exit k has run
segments 1..k, every earlier exit head included, as the exported chain runs them). Writes
exits.json and exits.png under --out.

    python scripts/plot_exits.py --run "3.3.0=runs/soup3/sd" \\
        --run "+ block 1=runs/soup_heads/block1" --out docs/results/soup_heads
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


class PlotError(ValueError):
    """A run directory this plot cannot read (bad input: one line, exit 2)."""


def read_run(path: Path) -> dict[str, Any]:
    from training.checkpoint_io import read_checkpoint

    checkpoint = read_checkpoint(path / "best.pt", PlotError, "--run")
    try:
        test = json.loads((path / "test_metrics.json").read_text(encoding="utf-8"))["best"]
        val = checkpoint["val_metrics"]
        segments = checkpoint["costs"]["segment_macs"]
        config = checkpoint["config"]
        exits = range(1, len(segments) + 1)
        return {
            "exit_blocks": config.get("exit_blocks"),
            "head": config.get("head"),
            # A row reaching exit k has run segments 1..k.
            "macs": [sum(segments[:k]) for k in exits],
            "val": [round(float(val[f"acc_exit{k}"]), 2) for k in exits],
            "test": [round(float(test[f"acc_exit{k}"]), 2) for k in exits],
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PlotError(f"--run {path}: not a finished run with per-exit metrics ({exc})") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    runs: dict[str, dict[str, Any]] = {}
    for item in args.run:
        label, sep, where = item.partition("=")
        path = Path(where)
        if (
            not sep
            or not (path / "best.pt").is_file()
            or not (path / "test_metrics.json").is_file()
        ):
            print(f"plot_exits.py: error: --run {item!r}: need LABEL=DIR with best.pt and "
                  "test_metrics.json", file=sys.stderr)  # fmt: skip
            return 2
        try:
            runs[label] = read_run(path)
        except PlotError as exc:
            print(f"plot_exits.py: error: {exc}", file=sys.stderr)
            return 2

    from core.atomic import atomic_write_json
    from core.plots import pyplot, save_png

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "exits.json", runs)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, split in zip(axes, ("val", "test"), strict=True):
        for label, run in runs.items():
            millions = [m / 1e6 for m in run["macs"]]
            ax.plot(millions, run[split], "o-", label=label)
        ax.set_xlabel("MACs to reach the exit (millions, earlier heads included)")
        ax.set_title(f"{split} accuracy per exit")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, args.out / "exits.png", tight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
