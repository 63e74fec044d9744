"""`earlyexit-tune`: tune a bundle's exit thresholds on calibration data (see docs/tuning.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from serving.cli_common import OneLineParser, UsageError, providers_arg, setup_cli_logging
from thresholds.errors import TuningError

if TYPE_CHECKING:
    from thresholds.pipeline import TuneRequest

logger = logging.getLogger(__name__)

PROG = "earlyexit-tune"
DATASETS = ("cifar10", "cifar100", "fashion-mnist", "imagefolder")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Tune per-exit confidence thresholds (genetic search, seed 004 Alg. 2) and "
        "write them to the bundle's thresholds.json.",
    )
    p.add_argument("--bundle", required=True, type=Path, help="bundle directory")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, help="dataset to collect calibration on")
    data.add_argument("--data-dir", type=Path, help="directory holding the dataset")
    data.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="split to tune on (default val; test is then the held-out report)",
    )
    data.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        help="tune on only the first N rows of the split (quick runs; the held-out report "
        "keeps all its rows)",
    )
    data.add_argument(
        "--from-server",
        metavar="URL",
        help="tune on a running server's live shadow sample (GET URL/v1/shadow), labelled by "
        "the final exit: --max-drop then bounds the agreement with full depth given up",
    )
    data.add_argument(
        "--from-server-rows",
        type=_positive_int,
        default=100_000,
        metavar="N",
        help="newest rows of the live sample to fetch (default 100000; the server's window caps "
        "it)",
    )
    data.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE.npz",
        help="tune from saved calibration arrays instead of running the bundle",
    )
    data.add_argument(
        "--test-calibration",
        type=Path,
        metavar="FILE.npz",
        help="held-out calibration arrays to report on (with --calibration)",
    )
    data.add_argument(
        "--cache-dir",
        type=Path,
        help="where collected calibration is cached (default <bundle>/calibration_cache)",
    )
    data.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="batch size for collecting calibration and timing latency (32)",
    )
    data.add_argument(
        "--providers",
        type=providers_arg,
        help="comma-separated execution providers for the runtime (cpu, cuda)",
    )
    data.add_argument(
        "--threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads for collecting and timing (0 = its default)",
    )
    data.add_argument(
        "--latency-repeats",
        type=int,
        default=20,
        help="timed runs per measurement with --cost latency (20; the median is kept)",
    )

    mode = p.add_argument_group("objective")
    choice = mode.add_mutually_exclusive_group()
    choice.add_argument(
        "--beta",
        type=float,
        help="maximise acceleration + beta * (accuracy - baseline) (default 1)",
    )
    choice.add_argument(
        "--max-drop",
        type=float,
        metavar="EPS",
        help="maximise acceleration with accuracy >= baseline - EPS points",
    )
    mode.add_argument(
        "--confidence",
        type=float,
        metavar="Z",
        help="with --max-drop: require the one-sided lower confidence bound of the accuracy "
        "difference (paired row by row with the baseline when it ran on the same rows: the "
        "plain model or the final exit; binomial for a given --baseline) to stay above -EPS, "
        "i.e. a margin of Z standard errors (default 0 = none; e.g. 1.0 or 1.645 for ~95%%)",
    )
    mode.add_argument(
        "--certify",
        type=float,
        metavar="F",
        help="with --max-drop: hold this share of the tuning rows back (e.g. 0.5), search the "
        "NSGA-II front on the rest, test its points on the held-back rows against the "
        "--confidence bound, safest first, until one fails, and write the fastest that passed "
        "(a guarantee on new rows, not only a margin)",
    )
    mode.add_argument(
        "--pareto",
        action="store_true",
        help="search the accuracy x acceleration front (NSGA-II); the written "
        "point is the front's best for --beta/--max-drop",
    )
    mode.add_argument(
        "--baseline",
        "--baseline-accuracy",
        dest="baseline",
        type=float,
        metavar="PCT",
        help="the plain model's accuracy in percent that --max-drop and --beta are measured "
        "against (default: the manifest's baseline block for each split, its plain graph "
        "run on the same rows when --dataset/--data-dir are given; else the final exit)",
    )
    mode.add_argument(
        "--baseline-bundle",
        type=Path,
        metavar="DIR",
        help="bundle of the plain model: its accuracy on the same splits is the baseline",
    )
    mode.add_argument(
        "--against-final-exit",
        action="store_true",
        help="measure against this bundle's own final exit even when the manifest names a "
        "plain-model baseline",
    )
    mode.add_argument(
        "--cost",
        choices=("macs", "latency"),
        default="macs",
        help="what a segment costs: manifest MACs or measured latency",
    )

    ga = p.add_argument_group("search")
    ga.add_argument("--bits", type=int, default=10, help="bits per threshold gene (10)")
    ga.add_argument(
        "--encoding",
        choices=("gray", "binary"),
        default="gray",
        help="gene code: Gray (neighbouring thresholds one bit apart, default) or plain binary",
    )
    ga.add_argument("--population", type=int, default=100, help="population size (100)")
    ga.add_argument("--generations", type=int, default=100, help="max generations (100)")
    ga.add_argument(
        "--patience",
        type=int,
        default=25,
        help="stop after this many generations without improvement (25; 0 = never)",
    )
    ga.add_argument("--seed", type=int, default=0, help="random seed (0)")
    ga.add_argument(
        "--restarts",
        type=int,
        default=1,
        metavar="N",
        help="independent GA runs (seeds SEED, SEED+1, ...); the best is kept (1)",
    )
    ga.add_argument(
        "--grid-steps",
        type=int,
        default=21,
        help="grid values per exit for the exhaustive comparison (21)",
    )
    ga.add_argument(
        "--no-baselines", action="store_true", help="skip the grid and global-threshold comparisons"
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--plots", type=Path, metavar="DIR", help="write PNG plots (and the Pareto front) to DIR"
    )
    out.add_argument(
        "--dry-run", action="store_true", help="tune and report, but write nothing into the bundle"
    )
    out.add_argument(
        "--notify",
        metavar="URL",
        help="PUT the result to a running server's /v1/thresholds "
        "(token from $EARLYEXIT_ADMIN_TOKEN)",
    )
    out.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    out.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    out.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def _request(args: argparse.Namespace) -> TuneRequest:
    from thresholds.pipeline import TuneRequest
    from thresholds.runner import RuntimeOptions
    from thresholds.search import GAConfig
    from thresholds.tuning import TuneOptions

    ga = GAConfig(
        bits=args.bits,
        population=args.population,
        generations=args.generations,
        patience=args.patience,
        seed=args.seed,
        restarts=args.restarts,
        gray=args.encoding == "gray",
    )
    options = TuneOptions(
        beta=args.beta,
        max_drop=args.max_drop,
        confidence=args.confidence,
        pareto=args.pareto,
        certify=args.certify,
        baseline=args.baseline,
        ga=ga,
        grid_steps=args.grid_steps,
        compare=not args.no_baselines,
    )
    return TuneRequest(
        bundle=args.bundle,
        options=options,
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        limit=args.limit,
        calibration=args.calibration,
        test_calibration=args.test_calibration,
        cost=args.cost,
        batch_size=args.batch_size,
        runtime=RuntimeOptions(providers=args.providers, intra_op_threads=args.threads),
        latency_repeats=args.latency_repeats,
        cache_dir=args.cache_dir,
        plots=args.plots,
        dry_run=args.dry_run,
        notify=args.notify,
        baseline_bundle=args.baseline_bundle,
        against_final_exit=args.against_final_exit,
    )


def _live_calibration(args: argparse.Namespace) -> Path:
    """Fetch the live sample into the bundle's calibration cache (a temporary directory with
    --dry-run, which writes nothing into the bundle); the path `--calibration` then reads."""
    import tempfile
    import time

    from thresholds.live import save_live_calibration

    if args.dataset or args.data_dir or args.calibration:
        raise TuningError("--from-server replaces --dataset/--data-dir and --calibration")
    folder = (
        Path(tempfile.mkdtemp(prefix="earlyexit-live-"))
        if args.dry_run
        else (args.cache_dir or args.bundle / "calibration_cache")
    )
    target = folder / f"live-{time.strftime('%Y%m%dT%H%M%S')}.npz"
    return save_live_calibration(args.from_server, target, args.from_server_rows)


def _fail(code: int, message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        return _fail(2, str(exc))
    setup_cli_logging(quiet=args.quiet, verbose=args.verbose, timestamps=True)

    from core.bundle import BundleError
    from core.calibration import CalibrationError
    from core.datasets import DatasetError
    from thresholds.live import LiveSampleError
    from thresholds.notify import NotifyError
    from thresholds.pipeline import run

    try:
        if args.from_server:
            args.calibration = _live_calibration(args)
        result = run(_request(args))
    except (TuningError, BundleError, DatasetError, CalibrationError) as exc:
        return _fail(2, str(exc))
    except (NotifyError, LiveSampleError) as exc:
        return _fail(1, str(exc))
    except KeyboardInterrupt:
        return _fail(130, "interrupted (thresholds.json unchanged unless reported written)")
    except Exception as exc:  # the one line users see; the traceback goes to the debug log
        logger.debug("tuning failed", exc_info=True)
        return _fail(1, f"{type(exc).__name__}: {exc}")
    if args.json:
        print(json.dumps(result))
    else:
        from thresholds.report import summary_text

        print(summary_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
