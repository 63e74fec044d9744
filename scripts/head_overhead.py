"""What a row that reaches the last exit pays for the early-exit chain, as the backbone grows.

For each width, builds the multi-exit network (random weights: onnxruntime's timing does not
depend on them), exports it as a bundle, and times at batch 1 on the same rows
(`serving.bench.time_variants`, as `earlyexit-bench` does: each variant in its own warm loop
over all rows, turns rotated, per image the median over repeats of that loop's time):

- `full_model`: the single-graph plain model;
- `chain_with_heads`: every segment with its exit head, no exit accepting (what a deep row runs
  under tuned thresholds);
- `chain_stage_files`: exits 1..K-1 disabled, so the stage files run without heads (chaining
  alone).

Writes head_overhead.json and head_overhead.png to --out.

    python scripts/head_overhead.py --widths 0.25,0.5,1.0 --out docs/results/head_overhead
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from serving.bench import time_variants
from serving.bundle import atomic_write_json
from serving.cli_common import setup_cli_logging
from serving.plots import pyplot, save_png
from serving.runtime import EarlyExitRuntime

log = logging.getLogger("head_overhead")
NEVER = 1.0 - 1e-6  # an enabled exit that accepts no row of an untrained network


def export_random(arch: str, width: float, head: str, exits: int, out: Path) -> None:
    import torch

    from training.export import ExportOptions, export_bundle
    from training.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, 10, exits=exits, width=width, stem="cifar", head=head).eval()
    export_bundle(
        model,
        out,
        classes=[str(i) for i in range(10)],
        input_shape=(3, 32, 32),
        mean=[0.5] * 3,
        std=[0.25] * 3,
        options=ExportOptions(progress=False),
    )


def time_bundle(bundle: Path, rows: int, repeats: int) -> dict[str, Any]:
    runtime = EarlyExitRuntime(bundle, intra_op_threads=1, inter_op_threads=1)
    k = runtime.manifest.num_exits
    heads = (NEVER,) * (k - 1) + (0.0,)
    stages = (1.0,) * (k - 1) + (0.0,)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(rows)]
    deep = [int(runtime.classify(x, thresholds=heads).exits[0]) == k for x in xs]
    variants = {
        "full_model": runtime.run_full_model,
        "chain_with_heads": lambda x: runtime.classify(x, thresholds=heads),
        "chain_stage_files": lambda x: runtime.classify(x, thresholds=stages),
    }
    seconds = time_variants(variants, xs, repeats)  # warm loops, turns rotated per repeat
    ms = {name: 1e3 * total / len(xs) for name, total in seconds.items()}
    m = runtime.manifest
    return {
        "full_macs": m.full_model.macs,
        "head_mac_share": sum(m.segment_macs()) / m.full_model.macs - 1.0,
        "rows_reaching_last_exit": sum(deep) / len(deep),
        "ms": ms,
        "chain_with_heads_vs_full_model": ms["chain_with_heads"] / ms["full_model"],
        "chain_stage_files_vs_full_model": ms["chain_stage_files"] / ms["full_model"],
    }


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    widths = [float(w) for w in report["widths"]]
    runs = [report["widths"][w] for w in report["widths"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(widths, [r["chain_with_heads_vs_full_model"] for r in runs], "o-", label="with heads")
    ax.plot(
        widths, [r["chain_stage_files_vs_full_model"] for r in runs], "s--", label="stages only"
    )
    ax.axhline(1.05, color="grey", lw=0.8, ls=":", label="1.05 target")
    ax.set_xlabel(f"{report['arch']} width multiplier")
    ax.set_ylabel("last-exit row time ÷ single graph (batch 1)")
    ax.set_title(f"{report['head']} heads, {report['exits']} exits")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=110, tight=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--head", default="lite")
    parser.add_argument("--exits", type=int, default=4)
    parser.add_argument("--widths", default="0.25,0.5,1.0")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    setup_cli_logging(timestamps=True)
    try:
        widths = [float(w) for w in args.widths.split(",") if w.strip()]
    except ValueError:
        print(f"head_overhead: error: --widths: not numbers: {args.widths!r}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "arch": args.arch,
        "head": args.head,
        "exits": args.exits,
        "rows": args.rows,
        "repeats": args.repeats,
        "threads": 1,
        "weights": "random (timing does not depend on them)",
        "widths": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for width in widths:
            bundle = Path(tmp) / f"w{width}"
            log.info("exporting %s ×%s with %s heads", args.arch, width, args.head)
            export_random(args.arch, width, args.head, args.exits, bundle)
            result = time_bundle(bundle, args.rows, args.repeats)
            log.info(
                "×%s: full %.3f ms, heads %.3f×, stages only %.3f×",
                width,
                result["ms"]["full_model"],
                result["chain_with_heads_vs_full_model"],
                result["chain_stage_files_vs_full_model"],
            )
            report["widths"][str(width)] = result
    atomic_write_json(out / "head_overhead.json", report)
    plot(report, out / "head_overhead.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
