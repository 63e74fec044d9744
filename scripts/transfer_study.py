"""How closely can a tuning split predict held-out accuracy? A resampling study on one bundle.

Pools the rows of two calibration files (e.g. the validation and test splits), draws `--splits`
random disjoint partitions into a tuning part of N rows (each of `--tune-rows`) and a held-out
part (the rest), tunes `--max-drop EPS` thresholds on the tuning part for each `--confidence Z`
exactly as `earlyexit-tune` does (same GA, same constraint), and scores them on the held-out
part. Per (N, Z) it reports the held-out − tuning accuracy difference (mean, SD, share of splits
within ±0.5 points), the held-out drop below the final exit, and the acceleration; the final
exit's own difference on the same partitions is the part no threshold can move.

With `--plain-calibration` and `--plain-test-calibration` (the bundle's plain model on the same
two splits, as `earlyexit-tune` caches them: `plain-<dataset>-<split>-*.npz`), the drop is
measured against the plain model instead of the final exit, exactly as `earlyexit-tune` does
when the manifest names a baseline: the floor is the plain model's accuracy on the tuning rows,
and the Z margin is on the paired difference. Each partition then also reports the drop on the
whole pool (tuning and held-out rows together: the best estimate of the population's drop, with
no anti-correlation to the tuning part) and the held-out acceleration.

Pooling treats the two files' rows as one population (exchangeable); the report says so.
Writes transfer_study.json and transfer_study.png to --out.

    python scripts/transfer_study.py --bundle B --calibration val.npz \
        --test-calibration test.npz --out docs/results/transfer_study
    python scripts/transfer_study.py ... --plain-calibration plain-val.npz \
        --plain-test-calibration plain-test.npz --max-drop 0.5 --tune-rows 5000
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_write_json
from core.bundle import BundleError, load_manifest
from core.plots import pyplot, save_png
from serving.cli_common import setup_cli_logging
from thresholds.calibrate import (
    Calibration,
    check_against_manifest,
    check_plain,
    read_calibration_file,
)
from thresholds.costs import macs_cost_model
from thresholds.errors import TuningError
from thresholds.evaluate import build_exit_table, evaluate
from thresholds.pipeline import plain_correct
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
    plain_rows: np.ndarray | None = None,
    certify: tuple[float | None, ...] = (None,),
) -> list[dict[str, Any]]:
    """One result per (tune_rows, confidence, certify), each over the same `splits` partitions
    (`certify`: None = choose and bound on the same rows, F = `earlyexit-tune --certify F`).

    `plain_rows` (N bool, the plain model's correctness on the pooled rows) makes every drop
    and margin relative to the plain model, paired row by row, instead of the final exit."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    cells: dict[tuple[int, float, float | None], dict[str, list[float]]] = {}
    # Fallback "plain": the same plain model also answers the rows no exit accepts. Every
    # column of the table is per row, so each part is the pooled table's rows.
    own = plain_rows if fallback == "plain" else None
    pool = build_exit_table(probs, labels, fallback, plain_rows, own)
    for s in range(splits):
        order = rng.permutation(n)
        for rows in tune_rows:
            part, rest = order[:rows], order[rows:]
            table = pool.take(part)
            held_out = pool.take(rest)
            for z, fraction in itertools.product(confidences, certify):
                options = TuneOptions(
                    max_drop=max_drop,
                    confidence=z or None,
                    compare=False,
                    ga=GAConfig(seed=s, progress=False),
                    certify=fraction,
                )
                cell = cells.setdefault((rows, z, fraction), {})
                try:
                    outcome = tune(table, costs, options, test_table=held_out)
                except TuningError:
                    # No vector meets the floor on these rows (e.g. the final exit alone is
                    # below the plain model by more than the margin allows): counted, not fatal.
                    cell.setdefault("infeasible", []).append(1.0)
                    continue
                assert outcome.test is not None  # a held-out table was given
                moved = transfer(outcome.tune, outcome.test)
                cell.setdefault("infeasible", []).append(0.0)
                extra: tuple[tuple[str, float], ...] = ()
                if plain_rows is not None:
                    whole = evaluate(pool, np.asarray(outcome.thresholds), costs)
                    extra = (("pool_drop", pool.baseline_accuracy - whole.accuracy),)
                for key, value in (
                    *extra,
                    ("held_out_acceleration", outcome.test.metrics.acceleration),
                    ("difference", moved["accuracy_difference"]),
                    ("final_exit_difference", moved["final_exit_difference"]),
                    ("se", moved["se"]),
                    ("held_out_drop", outcome.test.drop),
                    ("acceleration", outcome.tune.metrics.acceleration),
                ):
                    cell.setdefault(key, []).append(float(value))
        log.info("partition %d/%d done", s + 1, splits)
    results = []
    for (rows, z, fraction), cell in cells.items():
        infeasible = float(np.mean(cell["infeasible"]))
        if "difference" not in cell:
            results.append(
                {
                    "tune_rows": rows,
                    "held_out_rows": n - rows,
                    "confidence": z,
                    "certify": fraction,
                    "infeasible": infeasible,
                }
            )
            continue
        diffs = np.asarray(cell["difference"])
        against_plain: dict[str, Any] = {}
        if "pool_drop" in cell:
            against_plain = {
                "pool_drop": _summary(cell["pool_drop"]),
                "pool_drop_within_max_drop": float(
                    np.mean(np.asarray(cell["pool_drop"]) <= max_drop + 1e-9)
                ),
            }
        results.append(
            {
                "infeasible": infeasible,
                "feasible_partitions": len(diffs),
                "tune_rows": rows,
                "held_out_rows": n - rows,
                "confidence": z,
                "certify": fraction,
                "within_0_5": float(np.mean(np.abs(diffs) <= WITHIN)),
                "difference": _summary(cell["difference"]),
                "final_exit_difference": _summary(cell["final_exit_difference"]),
                "final_exit_within_0_5": float(
                    np.mean(np.abs(cell["final_exit_difference"]) <= WITHIN)
                ),
                "binomial_se": float(np.mean(cell["se"])),
                "held_out_drop": _summary(cell["held_out_drop"]),
                "drop_within_0_5": float(np.mean(np.asarray(cell["held_out_drop"]) <= WITHIN)),
                "drop_within_max_drop": float(
                    np.mean(np.asarray(cell["held_out_drop"]) <= max_drop + 1e-9)
                ),
                "acceleration": _summary(cell["acceleration"]),
                "held_out_acceleration": _summary(cell["held_out_acceleration"]),
                **against_plain,
                # Per partition, for plots: (held-out drop, held-out acceleration).
                "partitions": [
                    [round(d, 4), round(a, 4)]
                    for d, a in zip(
                        cell["held_out_drop"], cell["held_out_acceleration"], strict=True
                    )
                ],
            }
        )
    return results


def plot(report: dict[str, Any], path: Path) -> None:
    if report.get("against") == "plain model":
        plot_against_plain(report, path)
        return
    plt = pyplot()
    results = [r for r in report["results"] if "difference" in r]
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


def plot_against_plain(report: dict[str, Any], path: Path) -> None:
    """Each partition's held-out drop below the plain model against its held-out acceleration,
    one colour per (N, Z): where the promise --max-drop makes lands, and what it buys."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for r in report["results"]:
        if "partitions" not in r:
            continue
        points = np.asarray(r["partitions"], dtype=float)
        certified = f" certify {r['certify']:g}" if r.get("certify") else ""
        label = (
            f"N={r['tune_rows']} Z={r['confidence']:g}{certified}: drop ≤ {report['max_drop']:g} in "
            f"{100 * r['drop_within_max_drop']:.0f} %, infeasible {100 * r['infeasible']:.0f} %"
        )
        ax.scatter(points[:, 1], points[:, 0], s=14, alpha=0.7, label=label)
    ax.axhline(report["max_drop"], color="tab:red", lw=1, ls="--", label="--max-drop")
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel("MAC acceleration on the held-out rows")
    ax.set_ylabel("held-out drop below the plain model (points)")
    ax.set_title(f"{report['splits']} partitions of the pooled rows", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_png(fig, path, dpi=110, tight=False)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _fractions(text: str) -> tuple[float | None, ...]:
    return tuple(None if v.strip() == "none" else float(v) for v in text.split(",") if v.strip())


def _plain_rows(
    args: argparse.Namespace, manifest: Any, parts: list[Calibration]
) -> np.ndarray | None:
    """The plain model's correctness on the pooled rows of `parts` (the bundle's calibration
    files, in order), or None without --plain-*."""
    files = (args.plain_calibration, args.plain_test_calibration)
    if files == (None, None):
        return None
    if None in files:
        raise TuningError("--plain-calibration and --plain-test-calibration go together")
    correct = []
    for file, part, what in zip(
        files, parts, ("--plain-calibration", "--plain-test-calibration"), strict=True
    ):
        plain = read_calibration_file(file)
        check_plain(plain, manifest, what)
        correct.append(plain_correct(plain, part.labels, what)[1])
    return np.concatenate(correct)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--test-calibration", required=True)
    parser.add_argument(
        "--plain-calibration",
        help="the plain model on --calibration's rows (N×1×C; with --plain-test-calibration): "
        "drops are then measured against it, paired",
    )
    parser.add_argument("--plain-test-calibration")
    parser.add_argument("--tune-rows", type=_ints, default=[2500, 5000, 10000])
    parser.add_argument("--confidence", type=_floats, default=[0.0, 1.0, 1.645])
    parser.add_argument("--max-drop", type=float, default=0.0)
    parser.add_argument(
        "--certify",
        type=_fractions,
        default=(None,),
        help="comma-separated earlyexit-tune --certify fractions, 'none' for the plain margin "
        "(default none)",
    )
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
        plain_rows = _plain_rows(args, manifest, parts)
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
            plain_rows,
            args.certify,
        )
    except (BundleError, TuningError, OSError, ValueError) as exc:
        print(f"transfer_study: error: {exc}", file=sys.stderr)
        return 2
    report = {
        "bundle": {"name": manifest.name, "version": manifest.version},
        "sources": [Path(p.source).name for p in parts],  # names: no machine paths
        "pooled_rows": int(len(labels)),
        "assumption": "the two files' rows are pooled and treated as exchangeable",
        "against": "final exit" if plain_rows is None else "plain model",
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
        if "difference" not in r:
            log.info("N=%d Z=%g: infeasible in every partition", r["tune_rows"], r["confidence"])
            continue
        log.info(
            "N=%d Z=%g%s: held-out - tuning %.2f ± %.2f (SD), within 0.5: %.0f%% (final exit "
            "alone %.0f%%), held-out drop %.2f (<= 0.5 in %.0f%%), acceleration %.3fx (held "
            "out %.3fx), infeasible in %.0f%%%s",
            r["tune_rows"],
            r["confidence"],
            f" certify {r['certify']:g}" if r.get("certify") else "",
            r["difference"]["mean"],
            r["difference"]["sd"],
            100 * r["within_0_5"],
            100 * r["final_exit_within_0_5"],
            r["held_out_drop"]["mean"],
            100 * r["drop_within_0_5"],
            r["acceleration"]["mean"],
            r["held_out_acceleration"]["mean"],
            100 * r["infeasible"],
            (
                f"; pool drop <= max-drop in {100 * r['pool_drop_within_max_drop']:.0f}%"
                if "pool_drop_within_max_drop" in r
                else ""
            ),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
