"""How closely can a tuning split predict held-out accuracy? A resampling study on one bundle.

Pools the rows of two calibration files (e.g. the validation and test splits), draws `--splits`
random disjoint partitions into a tuning part of N rows (each of `--tune-rows`) and a held-out
part (the rest), tunes `--max-drop EPS` thresholds on the tuning part for each `--confidence Z`
exactly as `earlyexit-tune` does (same GA, same constraint), and scores them on the held-out
part. Per (N, Z) it reports the held-out − tuning accuracy difference (mean, SD, share of splits
within ±0.5 points), the held-out drop below the final exit, and the acceleration; the final
exit's own difference on the same partitions is the part no threshold can move.

Pooling treats the two files' rows as one population (exchangeable); the report says so.
Writes transfer_study.json and transfer_study.png to --out.

    python scripts/transfer_study.py --bundle B --calibration val.npz \
        --test-calibration test.npz --out docs/results/transfer_study
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_write_json
from core.bundle import BundleError, load_manifest
from core.plots import pyplot, save_png
from serving.cli_common import setup_cli_logging
from thresholds.calibrate import check_against_manifest, read_calibration_file
from thresholds.costs import macs_cost_model
from thresholds.errors import TuningError
from thresholds.evaluate import build_exit_table
from thresholds.report import transfer
from thresholds.search import GAConfig
from thresholds.tuning import TuneOptions, tune

log = logging.getLogger("transfer_study")
WITHIN = 0.5  # points: the target for held-out vs tuning accuracy


def _summary(values: list[float]) -> dict[str, float]:
    v = np.asarray(values)
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "p05": float(np.percentile(v, 5)),
        "p95": float(np.percentile(v, 95)),
    }


def study(
    probs: np.ndarray,
    labels: np.ndarray,
    fallback: str,
    costs: Any,
    tune_rows: list[int],
    confidences: list[float],
    max_drop: float,
    splits: int,
    seed: int,
) -> list[dict[str, Any]]:
    """One result per (tune_rows, confidence), each over the same `splits` partitions."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    cells: dict[tuple[int, float], dict[str, list[float]]] = {}
    for s in range(splits):
        order = rng.permutation(n)
        for rows in tune_rows:
            part, rest = order[:rows], order[rows:]
            table = build_exit_table(probs[part], labels[part], fallback)
            held_out = build_exit_table(probs[rest], labels[rest], fallback)
            for z in confidences:
                options = TuneOptions(
                    max_drop=max_drop,
                    confidence=z or None,
                    compare=False,
                    ga=GAConfig(seed=s, progress=False),
                )
                outcome = tune(table, costs, options, test_table=held_out)
                assert outcome.test is not None  # a held-out table was given
                moved = transfer(outcome.tune, outcome.test)
                cell = cells.setdefault((rows, z), {})
                for key, value in (
                    ("difference", moved["accuracy_difference"]),
                    ("final_exit_difference", moved["final_exit_difference"]),
                    ("se", moved["se"]),
                    ("held_out_drop", outcome.test.drop),
                    ("acceleration", outcome.tune.metrics.acceleration),
                ):
                    cell.setdefault(key, []).append(float(value))
        log.info("partition %d/%d done", s + 1, splits)
    results = []
    for (rows, z), cell in cells.items():
        diffs = np.asarray(cell["difference"])
        results.append(
            {
                "tune_rows": rows,
                "held_out_rows": n - rows,
                "confidence": z,
                "within_0_5": float(np.mean(np.abs(diffs) <= WITHIN)),
                "difference": _summary(cell["difference"]),
                "final_exit_difference": _summary(cell["final_exit_difference"]),
                "final_exit_within_0_5": float(
                    np.mean(np.abs(cell["final_exit_difference"]) <= WITHIN)
                ),
                "binomial_se": float(np.mean(cell["se"])),
                "held_out_drop": _summary(cell["held_out_drop"]),
                "drop_within_0_5": float(np.mean(np.asarray(cell["held_out_drop"]) <= WITHIN)),
                "acceleration": _summary(cell["acceleration"]),
            }
        )
    return results


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    results = report["results"]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    labels = [f"N={r['tune_rows']}\nZ={r['confidence']:g}" for r in results]
    lows = [r["difference"]["p05"] for r in results]
    highs = [r["difference"]["p95"] for r in results]
    means = [r["difference"]["mean"] for r in results]
    x = np.arange(len(results))
    ax.vlines(x, lows, highs, color="tab:blue", lw=6, alpha=0.4, label="5–95 % of partitions")
    ax.plot(x, means, "o", color="tab:blue", label="mean")
    ax.axhspan(-WITHIN, WITHIN, color="tab:green", alpha=0.12, label="±0.5 point target")
    for xi, r in zip(x, results, strict=True):
        ax.annotate(f"{100 * r['within_0_5']:.0f} %", (xi, r["difference"]["p95"]), ha="center",
                    va="bottom", fontsize=8)  # fmt: skip
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("held-out − tuning accuracy (points)")
    ax.set_title(
        f"--max-drop {report['max_drop']:g}, {report['splits']} partitions: "
        "share within ±0.5 above each bar",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    fig.tight_layout()
    save_png(fig, path, dpi=110, tight=False)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--test-calibration", required=True)
    parser.add_argument("--tune-rows", type=_ints, default=[2500, 5000, 10000])
    parser.add_argument("--confidence", type=_floats, default=[0.0, 1.0, 1.645])
    parser.add_argument("--max-drop", type=float, default=0.0)
    parser.add_argument("--splits", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    setup_cli_logging(timestamps=True)
    try:
        manifest = load_manifest(args.bundle)
        parts = [read_calibration_file(p) for p in (args.calibration, args.test_calibration)]
        for part, what in zip(parts, ("--calibration", "--test-calibration"), strict=True):
            check_against_manifest(part, manifest, what)
        probs = np.concatenate([p.exit_probs for p in parts])
        labels = np.concatenate([p.labels for p in parts])
        if args.splits < 2 or not args.tune_rows or max(args.tune_rows) >= len(labels):
            raise TuningError(
                f"need --splits >= 2 and every --tune-rows below the {len(labels)} pooled rows"
            )
        results = study(
            probs,
            labels,
            manifest.fallback,
            macs_cost_model(manifest),
            args.tune_rows,
            args.confidence,
            args.max_drop,
            args.splits,
            args.seed,
        )
    except (BundleError, TuningError, OSError, ValueError) as exc:
        print(f"transfer_study: error: {exc}", file=sys.stderr)
        return 2
    report = {
        "bundle": {"name": manifest.name, "version": manifest.version},
        "sources": [p.source for p in parts],
        "pooled_rows": int(len(labels)),
        "assumption": "the two files' rows are pooled and treated as exchangeable",
        "max_drop": args.max_drop,
        "splits": args.splits,
        "seed": args.seed,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "transfer_study.json", report)
    plot(report, out / "transfer_study.png")
    for r in results:
        log.info(
            "N=%d Z=%g: held-out - tuning %.2f ± %.2f (SD), within 0.5: %.0f%% (final exit "
            "alone %.0f%%), held-out drop %.2f (<= 0.5 in %.0f%%), acceleration %.3fx",
            r["tune_rows"],
            r["confidence"],
            r["difference"]["mean"],
            r["difference"]["sd"],
            100 * r["within_0_5"],
            100 * r["final_exit_within_0_5"],
            r["held_out_drop"]["mean"],
            100 * r["drop_within_0_5"],
            r["acceleration"]["mean"],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
