"""`earlyexit-export`: training checkpoint → verified bundle of chained ONNX segments."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from core.decision import FALLBACKS
from serving.cli_common import OneLineParser, parse_or_exit, setup_cli_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="earlyexit-export",
        description="Export a multi-exit checkpoint as a bundle: one ONNX segment per exit "
        "(parity- and MAC-checked), stage files, the plain full model, manifest.json and "
        "thresholds.json (export-greedy thresholds from --data-dir's validation split, "
        "else all 1.0).",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by earlyexit-train")
    parser.add_argument("--out", required=True, help="bundle directory to create")
    parser.add_argument("--name", help="model name in the manifest (default: <arch>-<dataset>)")
    parser.add_argument("--version", help="model version (default: export time, UTC)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default="ensemble",
        help="answer for rows no exit accepts: mean of all exits (ensemble), the last exit, or "
        "the plain model (plain: --baseline-run's graph, else full_model.onnx)",
    )
    parser.add_argument(
        "--exporter",
        choices=("auto", "dynamo", "torchscript"),
        default="auto",
        help="torch.onnx exporter (auto: dynamo, TorchScript if dynamo fails)",
    )
    parser.add_argument(
        "--data-dir", help="dataset root: real images for parity and calibration thresholds"
    )
    parser.add_argument("--dataset", help="dataset name (default: the checkpoint's)")
    parser.add_argument(
        "--calibration-split", choices=("val", "test"), default="val", help="split for thresholds"
    )
    parser.add_argument(
        "--calibration-limit", type=int, help="use only the first N rows of the split"
    )
    parser.add_argument(
        "--no-stage-files",
        action="store_true",
        help="do not write stage_k.onnx (disabled exits then still run their heads)",
    )
    parser.add_argument(
        "--baseline-run",
        help="run directory of the plain model (earlyexit-train --loss baseline) this bundle is "
        "compared with: its accuracy goes into the manifest's baseline block, its graph into "
        "baseline.onnx unless it is this bundle's own backbone",
    )
    parser.add_argument(
        "--baseline-recipe", help="recipe name recorded for the baseline (default: run dir name)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing bundle")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_or_exit(build_parser(), argv)
    setup_cli_logging(quiet=args.quiet)
    if args.opset < 13:
        print("earlyexit-export: error: --opset must be at least 13", file=sys.stderr)
        return 2
    if args.calibration_limit is not None and args.calibration_limit < 1:
        print("earlyexit-export: error: --calibration-limit must be positive", file=sys.stderr)
        return 2

    from training.export import CheckpointError, ExportError, ExportOptions, export_checkpoint

    options = ExportOptions(
        name=args.name,
        version=args.version,
        opset=args.opset,
        fallback=args.fallback,
        stage_files=not args.no_stage_files,
        force=args.force,
        exporter=args.exporter,
        data_dir=args.data_dir,
        dataset=args.dataset,
        calibration_split=args.calibration_split,
        calibration_limit=args.calibration_limit,
        baseline_run=args.baseline_run,
        baseline_recipe=args.baseline_recipe,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    try:
        result = export_checkpoint(args.checkpoint, args.out, options)
    except CheckpointError as exc:
        print(f"earlyexit-export: error: {exc}", file=sys.stderr)
        return 2
    except ExportError as exc:
        print(f"earlyexit-export: export failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        logger.info(
            "wrote %s (%d segments, thresholds %s, %.1f s)",
            result.bundle,
            result.manifest.num_exits,
            list(result.thresholds.values),
            result.seconds,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
