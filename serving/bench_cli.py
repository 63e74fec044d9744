"""`earlyexit-bench`: accuracy, exit fractions, MAC and wall-clock speedups of a bundle.

In-process (`--bundle`) by default; `--http URL` benchmarks a running server through
`serving.loadtest.main_http(args)`, and `--http URL --compare-url URL2` an early-exit server
against a `--full-model` server of the same bundle (`serving.http_compare`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from serving.cli_common import OneLineParser, parse_or_exit, providers_arg, setup_cli_logging
from serving.datasets import DATASETS


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("batch sizes must be positive integers")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="earlyexit-bench",
        description="Measure accuracy of every exit, dynamic accuracy and exit fractions under "
        "the bundle's thresholds, MAC speedup and measured wall-clock speedup against the full "
        "chain and the single-graph model.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--bundle", help="bundle directory (in-process benchmark)")
    target.add_argument("--http", metavar="URL", help="benchmark a running earlyexit-serve")
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--data-dir", required=True, help="dataset root directory")
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--limit", type=_positive, help="use only the first N rows")
    parser.add_argument(
        "--batch-sizes", type=_batch_sizes, default=(1, 8, 32), help="e.g. 1,8,32 (default)"
    )
    parser.add_argument("--repeats", type=_positive, default=5, help="timing repeats (median)")
    parser.add_argument(
        "--timing-rows", type=_positive, default=256, help="rows timed per batch size"
    )
    parser.add_argument(
        "--last-exit-rows", type=_positive, default=64, help="deep rows timed at batch 1"
    )
    parser.add_argument(
        "--providers",
        type=providers_arg,
        default="cpu",
        help="execution providers, e.g. cuda,cpu (default cpu)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads per session (0 = default)"
    )
    parser.add_argument("--concurrency", type=_positive, default=8, help="--http: clients")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="--http: seconds per load pass (default 10)"
    )
    parser.add_argument(
        "--compare-full",
        action="store_true",
        help="--http: also run at full depth (all thresholds 1.0 via the admin endpoint, "
        "restored afterwards); needs the admin token",
    )
    parser.add_argument(
        "--compare-url",
        metavar="URL2",
        help="--http: an earlyexit-serve --full-model server of the same bundle; load passes "
        "alternate between the two (early exit, plain, early exit, ...) and the report gives "
        "the throughput ratio of each pair, its median and the servers' agreement",
    )
    parser.add_argument(
        "--pairs",
        type=_positive,
        default=3,
        help="--compare-url: pairs of passes, one on each server (default 3)",
    )
    parser.add_argument(
        "--admin-token", help="--http: admin bearer token (default $EARLYEXIT_ADMIN_TOKEN)"
    )
    parser.add_argument("--server-pid", type=int, help="--http: report this server's RSS")
    parser.add_argument(
        "--local-bundle",
        help="--http with --compare-full or --compare-url: a copy of the served bundle, timed "
        "in-process at the early-exit server's mean batch size so the HTTP speedup can be set "
        "against the runtime's own",
    )
    parser.add_argument("--out", help="directory for bench.json and PNG plots")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_or_exit(build_parser(), argv)
    setup_cli_logging(quiet=args.quiet)
    if args.http:
        if importlib.util.find_spec("serving.loadtest") is None:
            print("earlyexit-bench: error: --http is not available in this build", file=sys.stderr)
            return 2
        from serving.loadtest import main_http

        return int(main_http(args))

    from serving.bench import BenchConfig, run_benchmark
    from serving.bundle import BundleError
    from serving.datasets import DatasetError

    config = BenchConfig(
        bundle=args.bundle,
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        limit=args.limit,
        batch_sizes=args.batch_sizes,
        repeats=args.repeats,
        timing_rows=args.timing_rows,
        last_exit_rows=args.last_exit_rows,
        providers=args.providers,
        intra_op_threads=args.threads,
        out=args.out,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    try:
        report = run_benchmark(config)
    except (BundleError, DatasetError, ValueError) as exc:
        print(f"earlyexit-bench: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        _summary(report)
    return 0


# A median over fewer rows than this is a few calls' luck rather than a measurement: the
# summary still prints it (the JSON has every figure) but flags it, so it is not quoted.
MIN_ROWS_TO_QUOTE = 20


def _counted(figure: str, rows: int) -> str:
    """`figure` with the rows it was measured on, flagged when they are too few to quote."""
    flag = "; too few" if rows < MIN_ROWS_TO_QUOTE else ""
    return f"{figure} ({rows} rows{flag})"


def _summary(report: dict) -> None:
    dyn = report["dynamic"]
    lines = [
        f"exit accuracy (%): {', '.join(f'{a:.2f}' for a in report['exit_accuracy'])}",
        f"dynamic accuracy {dyn['accuracy']:.2f}% at thresholds {dyn['thresholds']}, "
        f"acceleration {dyn['acceleration']:.2f}x, calibration agreement "
        f"{dyn['calibration_agreement']:.4f}",
        "exit fractions: " + ", ".join(f"{100 * f:.1f}%" for f in dyn["exit_fractions"]),
    ]
    counts: list[int] = []
    for batch, t in report["timing"].items():
        lines.append(
            f"batch {batch}: {t['speedup_vs_full_model']:.2f}x vs full model, "
            f"{t['speedup_vs_chain']:.2f}x vs chain, MAC {t['mac_speedup']:.2f}x, "
            f"efficiency {t['efficiency']:.2f}"
        )
        per_mac: list[str] = []
        for seg in t["segments"]:
            ratio = seg["time_per_mac_vs_full_model"]
            per_mac.append(_counted("-" if ratio is None else f"{ratio:.2f}", seg["rows"]))
            counts.append(seg["rows"])
        lines.append(
            f"batch {batch}: time per MAC vs the full model, segment 1..K: " + ", ".join(per_mac)
        )
    last = report.get("last_exit_latency")
    if last:
        deep_ratio = _counted(f"{last['ratio']:.2f}x", last["rows"])
        lines.append(
            f"deep rows at batch 1: {last['chain_ms']:.3f} ms vs full model "
            f"{last['full_model_ms']:.3f} ms: {deep_ratio}"
        )
        counts.append(last["rows"])
    by_exit = report["latency_by_exit"]["exits"]
    lines.append(
        "batch-1 latency by exit among all rows, vs full model: "
        + ", ".join(_counted(f"{e['exit']}: {e['vs_full_model']:.2f}x", e["rows"]) for e in by_exit)
    )
    counts += [e["rows"] for e in by_exit]
    if any(n < MIN_ROWS_TO_QUOTE for n in counts):
        lines.append(
            f"too few: under {MIN_ROWS_TO_QUOTE} rows, a figure is a few calls' luck, not a "
            "measurement; time more rows (--timing-rows, --last-exit-rows) before quoting it"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
