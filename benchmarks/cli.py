"""`earlyexit-bench`: accuracy, exit fractions, MAC and wall-clock speedups of a bundle.

In-process (`--bundle`, `benchmarks.bench`) by default; `--http URL` load-tests a running server
(`benchmarks.loadtest`), and `--http URL --compare-url URL2` an early-exit server against a
`--full-model` server of the same bundle (`benchmarks.http_compare`). Everything printed is
printed here; the modules behind it return reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.datasets import DATASETS
from serving.cli_common import OneLineParser, parse_or_exit, providers_arg, setup_cli_logging

logger = logging.getLogger(__name__)


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
        "--last-exit-rows",
        type=_positive,
        default=64,
        help="deep rows timed at batch 1 (exit K's rows, and separately the plain model's with fallback plain)",
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
        return http_main(args)

    from benchmarks.bench import BenchConfig, run_benchmark
    from core.bundle import BundleError
    from core.datasets import DatasetError

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


class BenchInputError(ValueError):
    """A bad flag or input of `earlyexit-bench --http` (one line, exit code 2)."""


def http_inputs(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, int, float]:
    """(images, labels, concurrency, duration) of `earlyexit-bench --http ...`, with every flag
    checked before any request is sent; BenchInputError names the problem."""
    from benchmarks.httpclient import parse_base_url
    from core.datasets import DatasetError, load_split

    concurrency = int(getattr(args, "concurrency", 8))
    duration = float(getattr(args, "duration", 10.0))
    if concurrency < 1 or duration <= 0:
        raise BenchInputError("--concurrency must be ≥ 1 and --duration > 0")
    if not getattr(args, "data_dir", None):
        raise BenchInputError("--http needs --dataset and --data-dir")
    try:
        parse_base_url(args.http)
    except ValueError as exc:
        raise BenchInputError(f"--http: {exc}") from None
    compare_url = getattr(args, "compare_url", None)
    if compare_url:
        if getattr(args, "compare_full", False):
            raise BenchInputError(
                "--compare-url and --compare-full are two ways to compare; pick one"
            )
        try:
            parse_base_url(compare_url)
        except ValueError as exc:
            raise BenchInputError(f"--compare-url: {exc}") from None
        if compare_url.rstrip("/") == args.http.rstrip("/"):
            raise BenchInputError("--compare-url must be another server than --http")
    try:
        data = load_split(args.dataset, args.data_dir, getattr(args, "split", None) or "test")
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        raise BenchInputError(str(exc)) from None
    local = getattr(args, "local_bundle", None)
    if local:
        from core.bundle import BundleError, load_manifest

        try:  # before the load passes, not after minutes of them
            load_manifest(local)
        except BundleError as exc:
            raise BenchInputError(f"--local-bundle: {exc}") from None
    limit = getattr(args, "limit", None) or 1000
    return data.images[:limit], data.labels[:limit], concurrency, duration


def http_main(args: argparse.Namespace) -> int:
    """`earlyexit-bench --http URL ...`: reads `http`, `dataset`,
    `data_dir`, `split` (default test), `limit` (images, default 1000), `concurrency`,
    `duration`, `compare_full`, `admin_token` (default $EARLYEXIT_ADMIN_TOKEN), `server_pid`,
    `json` and `out`; with `compare_url` the two-server comparison of
    `compare_main` runs instead. Returns the exit code: 2 bad input,
    1 server unusable.
    """
    from benchmarks.loadtest import (
        LoadTestError,
        add_in_process_reference,
        format_report,
        run_http_bench,
        write_report,
    )

    try:
        images, labels, concurrency, duration = http_inputs(args)
    except BenchInputError as exc:
        print(f"earlyexit-bench: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "compare_url", None):
        return compare_main(args, images, labels, concurrency, duration)
    try:
        report = run_http_bench(
            args.http,
            images,
            labels,
            concurrency,
            duration,
            admin_token=getattr(args, "admin_token", None)
            or os.environ.get("EARLYEXIT_ADMIN_TOKEN"),
            server_pid=getattr(args, "server_pid", None),
            compare_full=bool(getattr(args, "compare_full", False)),
            check_answers=not getattr(args, "no_check", False),
        )
    except LoadTestError as exc:
        print(f"earlyexit-bench: error: {exc}", file=sys.stderr)
        return 1
    report["dataset"] = args.dataset
    if _local_reference(add_in_process_reference, report, args, images) != 0:
        return 2
    if getattr(args, "out", None):
        path = write_report(report, args.out)
        logger.info("wrote %s", path)
    if getattr(args, "json", False):
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


def _local_reference(
    add: Callable[[dict[str, Any], str, np.ndarray, int], None],
    report: dict[str, Any],
    args: argparse.Namespace,
    images: np.ndarray,
) -> int:
    """With --local-bundle, add the in-process reference (`add`) to `report`; 2 (after one
    error line) when that bundle cannot be used, else 0."""
    from core.bundle import BundleError

    local = getattr(args, "local_bundle", None)
    if not local:
        return 0
    try:
        add(report, local, images, int(getattr(args, "threads", 0) or 0))
    except (BundleError, ValueError) as exc:
        print(f"earlyexit-bench: error: --local-bundle: {exc}", file=sys.stderr)
        return 2
    return 0


def compare_main(
    args: argparse.Namespace,
    images: np.ndarray,
    labels: np.ndarray,
    concurrency: int,
    duration: float,
) -> int:
    """`earlyexit-bench --http URL --compare-url URL2 ...` once `http_inputs`
    has checked the flags: reads `pairs`, `server_pid`, `local_bundle`, `threads`, `out` and
    `json`. Returns the exit code: 2 a wrong pair or bad input, 1 a server unusable."""
    from benchmarks.http_compare import (
        REPORT_FILE,
        PairingError,
        add_in_process_reference,
        format_comparison,
        run_http_comparison,
    )
    from benchmarks.loadtest import LoadTestError
    from core.atomic import atomic_write_json

    try:
        report = run_http_comparison(
            args.http,
            args.compare_url,
            images,
            labels,
            concurrency,
            duration,
            int(getattr(args, "pairs", 3) or 3),
            server_pid=getattr(args, "server_pid", None),
        )
    except PairingError as exc:
        print(f"earlyexit-bench: error: {exc}", file=sys.stderr)
        return 2
    except LoadTestError as exc:
        print(f"earlyexit-bench: error: {exc}", file=sys.stderr)
        return 1
    report["dataset"] = args.dataset
    if _local_reference(add_in_process_reference, report, args, images) != 0:
        return 2
    if getattr(args, "out", None):
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / REPORT_FILE, report)
        logger.info("wrote %s", out / REPORT_FILE)
    if getattr(args, "json", False):
        print(json.dumps(report))
    else:
        print(format_comparison(report))
    return 0


# A median over fewer rows than this is a few calls' luck rather than a measurement: the
# summary still prints it (the JSON has every figure) but flags it, so it is not quoted.
MIN_ROWS_TO_QUOTE = 20


def _counted(figure: str, rows: int) -> str:
    """`figure` with the rows it was measured on, flagged when they are too few to quote."""
    flag = "; too few" if rows < MIN_ROWS_TO_QUOTE else ""
    return f"{figure} ({rows} rows{flag})"


def _summary(report: dict[str, Any]) -> None:
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
    # Rows past exit K-1; with fallback "plain", the plain model's rows are timed apart.
    for key, what in (
        ("last_exit_latency", "deep rows at batch 1"),
        ("plain_fallback_latency", "rows the plain model answers, at batch 1"),
    ):
        deep = report.get(key)
        if deep:
            ratio = _counted(f"{deep['ratio']:.2f}x", deep["rows"])
            lines.append(
                f"{what}: {deep['chain_ms']:.3f} ms vs full model "
                f"{deep['full_model_ms']:.3f} ms: {ratio}"
            )
            counts.append(deep["rows"])
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
