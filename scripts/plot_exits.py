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


def read_run(path: Path) -> dict[str, Any]:
    import torch

    checkpoint = torch.load(path / "best.pt", map_location="cpu", weights_only=False)
    test = json.loads((path / "test_metrics.json").read_text(encoding="utf-8"))["best"]
    val = checkpoint["val_metrics"]
    segments = checkpoint["costs"]["segment_macs"]
    exits = len(segments)
    cumulative = [sum(segments[: k + 1]) for k in range(exits)]
    config = checkpoint["config"]
    return {
        "exit_blocks": config.get("exit_blocks"),
        "head": config.get("head"),
        "macs": cumulative,
        "val": [round(float(val[f"acc_exit{k}"]), 2) for k in range(1, exits + 1)],
        "test": [round(float(test[f"acc_exit{k}"]), 2) for k in range(1, exits + 1)],
    }


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
        runs[label] = read_run(path)

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
