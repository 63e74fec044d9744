"""Accuracy × acceleration fronts of several bundles, searched on one split, drawn on another.

For each bundle, NSGA-II (the same search as `earlyexit-tune --pareto`) finds the
(accuracy, acceleration) front on the tuning split (default val). Every front vector is then
scored on the held-out split (default test). Comparing bundles there asks which exits are
faster at the same held-out accuracy over the whole range, not only at one tuned point. The
plain model's held-out accuracy is drawn for reference: a `--baseline-bundle` (its final exit),
else each bundle's own plain graph (the manifest's baseline block).

The summary's "best held-out acceleration within D points of the plain model" picks the front
point on the held-out rows themselves. It describes the front and is not a tuning result: a
tuner never sees those rows.

    python scripts/fronts_on_heldout.py --bundle stage_ends=B1 --bundle blocks=B2 \
        --dataset cifar10 --data-dir DATA --baseline-bundle PLAIN --out DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.atomic import atomic_write_json  # noqa: E402
from core.bundle import BundleError, load_manifest  # noqa: E402
from core.datasets import DatasetError  # noqa: E402
from core.plots import pyplot, save_png  # noqa: E402
from serving.cli_common import setup_cli_logging  # noqa: E402
from thresholds.calibrate import load_or_collect  # noqa: E402
from thresholds.costs import macs_cost_model  # noqa: E402
from thresholds.errors import TuningError  # noqa: E402
from thresholds.evaluate import build_exit_table, evaluate_population  # noqa: E402
from thresholds.pareto import run_nsga2  # noqa: E402
from thresholds.pipeline import plain_correct  # noqa: E402
from thresholds.search import GAConfig  # noqa: E402

log = logging.getLogger("fronts_on_heldout")
DROPS = (0.5, 1.0, 1.5, 2.0, 2.5)  # points below the plain model for the summary


def _named(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=BUNDLE_DIR, got {text!r}")
    return name, Path(path)


def plain_rows(
    bundle: Path, args: argparse.Namespace, split: str, labels: np.ndarray
) -> np.ndarray:
    """The plain model's correctness on `split`, row for row with `labels`."""
    if args.baseline_bundle is not None:
        manifest = load_manifest(args.baseline_bundle)
        cal = load_or_collect(args.baseline_bundle, manifest, args.dataset, args.data_dir, split)
    else:
        manifest = load_manifest(bundle)
        cal = load_or_collect(bundle, manifest, args.dataset, args.data_dir, split, plain=True)
    return plain_correct(cal, labels, f"the plain model's {split} split")[1]


def front_of(name: str, bundle: Path, args: argparse.Namespace) -> dict[str, Any]:
    manifest = load_manifest(bundle)
    costs = macs_cost_model(manifest)
    tables = {}
    for split in (args.split, args.held_out):
        cal = load_or_collect(bundle, manifest, args.dataset, args.data_dir, split)
        reference = plain_rows(bundle, args, split, cal.labels)
        own = None  # fallback "plain": the bundle's own plain graph answers the rest
        if manifest.fallback == "plain" and args.baseline_bundle is None:
            own = reference  # plain_rows ran that very graph on these rows
        elif manifest.fallback == "plain":
            mine = load_or_collect(bundle, manifest, args.dataset, args.data_dir, split, plain=True)
            own = plain_correct(mine, cal.labels, f"the bundle's plain model on {split}")[1]
        tables[split] = build_exit_table(
            cal.exit_probs, cal.labels, manifest.fallback, reference, own
        )
    front = run_nsga2(tables[args.split], costs, GAConfig(seed=args.seed, progress=False)).front
    thresholds = np.asarray([m.thresholds for m in front])
    held = evaluate_population(tables[args.held_out], thresholds, costs)
    points = [
        {
            "thresholds": [float(t) for t in m.thresholds],
            "tune_accuracy": float(m.accuracy),
            "tune_acceleration": float(m.acceleration),
            "held_out_accuracy": float(held.accuracy[i]),
            "held_out_acceleration": float(held.acceleration[i]),
        }
        for i, m in enumerate(front)
    ]
    plain = tables[args.held_out].baseline_accuracy
    best = {}
    for drop in DROPS:
        ok = [p["held_out_acceleration"] for p in points if p["held_out_accuracy"] >= plain - drop]
        best[f"{drop:g}"] = max(ok) if ok else None
    log.info("%s: %d front points; held-out plain %.2f%%", name, len(points), plain)
    return {
        "name": name,
        "bundle": {"name": manifest.name, "version": manifest.version},
        "exits": manifest.num_exits,
        "plain_held_out_accuracy": plain,
        "plain_tune_accuracy": tables[args.split].baseline_accuracy,
        "best_held_out_acceleration_within": best,
        "front": points,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for entry in report["bundles"]:
        pts = sorted(entry["front"], key=lambda p: p["held_out_acceleration"])
        x = [p["held_out_acceleration"] for p in pts]
        y = [p["held_out_accuracy"] for p in pts]
        ax.plot(x, y, ".-", ms=4, lw=1, label=f"{entry['name']} ({entry['exits']} exits)")
    plain = report["bundles"][0]["plain_held_out_accuracy"]
    ax.axhline(plain, color="0.3", lw=1, label=f"plain model {plain:.2f} %")
    ax.axhline(plain - 0.5, color="tab:red", lw=1, ls="--", label="plain − 0.5")
    ax.set_xlabel(f"MAC acceleration on {report['held_out']}")
    ax.set_ylabel(f"accuracy on {report['held_out']} (%)")
    ax.set_title(
        f"fronts searched on {report['split']}, scored on {report['held_out']}", fontsize=10
    )
    ax.set_ylim(plain - 6, plain + 1)
    # Only the part of each front above the plot's floor matters; beyond it the axis would
    # stretch to accelerations nobody would deploy at.
    shown = [
        p["held_out_acceleration"]
        for e in report["bundles"]
        for p in e["front"]
        if p["held_out_accuracy"] >= plain - 6
    ]
    if shown:
        ax.set_xlim(min(shown) - 0.05, max(shown) + 0.05)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    save_png(fig, path, dpi=110, tight=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=_named, action="append", required=True,
                        help="NAME=BUNDLE_DIR (repeat)")  # fmt: skip
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--split", default="val")
    parser.add_argument("--held-out", default="test")
    parser.add_argument("--baseline-bundle", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    setup_cli_logging(timestamps=True)
    try:
        if args.split == args.held_out:
            raise TuningError("--split and --held-out must differ")
        entries = [front_of(name, path, args) for name, path in args.bundle]
        plains = {round(e["plain_held_out_accuracy"], 6) for e in entries}
        if len(plains) > 1:
            raise TuningError(
                "the bundles' plain models differ on the held-out rows; give --baseline-bundle"
            )
    except (BundleError, TuningError, DatasetError, OSError, ValueError) as exc:
        print(f"fronts_on_heldout: error: {exc}", file=sys.stderr)
        return 2
    report = {
        "split": args.split,
        "held_out": args.held_out,
        "dataset": args.dataset,
        "baseline_bundle": None if args.baseline_bundle is None else args.baseline_bundle.name,
        "note": "best_held_out_acceleration_within picks on the held-out rows: descriptive only",
        "bundles": entries,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "fronts.json", report)
    plot(report, args.out / "fronts.png")
    for e in entries:
        log.info("%s: best held-out acceleration within D points of the plain model: %s",
                 e["name"], e["best_held_out_acceleration_within"])  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
