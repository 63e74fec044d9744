"""Dynamic inference in the form of seed 004 Table 5, on one bundle.

For several β (eq. 7) and `--max-drop` settings, thresholds are tuned on the validation split
and reported on the test split: accuracy change vs the final exit and vs the baseline model,
MAC acceleration, measured wall-clock acceleration in-process (early-exit chain vs the
single-graph full model, each in its own warm loop, turns rotated) and over HTTP (a real server, throughput with
the tuned thresholds vs the same server at full depth).

    python scripts/table5.py --bundle B --data-dir ../shared/data \
        --baseline-report docs/results/training/report.json --out docs/results/dynamic
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.loadtest import run_http_bench
from core.atomic import atomic_write_bytes, atomic_write_json
from core.bundle import load_manifest
from core.datasets import load_split
from core.timing import time_variants
from serving.cli_common import setup_cli_logging
from serving.runtime import EarlyExitRuntime
from thresholds.calibrate import load_or_collect
from thresholds.costs import macs_cost_model
from thresholds.evaluate import build_exit_table, evaluate
from thresholds.tuning import TuneOptions, tune

log = logging.getLogger("table5")

SETTINGS = [("beta", b) for b in (0.5, 1.0, 2.0, 5.0)] + [("max_drop", e) for e in (0.0, 0.5, 1.0)]


def in_process_speedup(
    runtime: EarlyExitRuntime, x: np.ndarray, thresholds, batch: int, rounds: int
) -> dict:
    """Single-graph full model time ÷ early-exit chain time on the same rows (warm loops)."""
    batches = [x[i : i + batch] for i in range(0, len(x), batch)]
    seconds = time_variants(
        {
            "full_model": runtime.run_full_model,
            "early_exit": lambda b: runtime.classify(b, thresholds=thresholds),
        },
        batches,
        rounds,
    )
    return {
        "batch": batch,
        "rows": len(x),
        "speedup": seconds["full_model"] / seconds["early_exit"],
        "early_ms_per_row": 1000 * seconds["early_exit"] / len(x),
        "full_ms_per_row": 1000 * seconds["full_model"] / len(x),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _put_thresholds(url: str, token: str, values) -> None:
    req = urllib.request.Request(
        f"{url}/v1/thresholds",
        method="PUT",
        data=json.dumps({"thresholds": [float(v) for v in values]}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()


def main(argv: list[str] | None = None) -> int:
    setup_cli_logging()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--baseline-report", type=Path, help="training report.json (baseline accuracy)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--rows", type=int, default=2000, help="test rows timed in-process")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--http-duration", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--skip-http", action="store_true")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads, in process and in the server",
    )
    args = p.parse_args(argv)

    manifest = load_manifest(args.bundle)
    val = load_or_collect(args.bundle, manifest, args.dataset, args.data_dir, "val")
    test = load_or_collect(args.bundle, manifest, args.dataset, args.data_dir, "test")
    val_table = build_exit_table(val.exit_probs, val.labels, manifest.fallback)
    test_table = build_exit_table(test.exit_probs, test.labels, manifest.fallback)
    costs = macs_cost_model(manifest)
    baseline_acc = None
    if args.baseline_report and args.baseline_report.is_file():
        rep = json.loads(args.baseline_report.read_text())
        baseline_acc = rep["test_accuracy"]["baseline"].get("acc_last")

    runtime = EarlyExitRuntime(args.bundle, providers=("cpu",), intra_op_threads=args.threads)
    test_images = load_split(args.dataset, args.data_dir, "test")
    x = runtime.preprocess(test_images.images[: args.rows])

    rows = []
    for mode, value in SETTINGS:
        options = (
            TuneOptions(beta=value, compare=False)
            if mode == "beta"
            else TuneOptions(max_drop=value, compare=False)
        )
        outcome = tune(val_table, costs, options)
        thresholds = np.asarray(outcome.thresholds, dtype=np.float64)
        m_val = evaluate(val_table, thresholds, costs)
        m_test = evaluate(test_table, thresholds, costs)
        row = {
            "mode": mode,
            "value": value,
            "thresholds": [round(float(t), 4) for t in thresholds],
            "val_accuracy": m_val.accuracy,
            "test_accuracy": m_test.accuracy,
            "test_final_exit_accuracy": test_table.final_accuracy,
            "delta_vs_final_exit": m_test.accuracy - test_table.final_accuracy,
            "delta_vs_baseline": None if baseline_acc is None else m_test.accuracy - baseline_acc,
            "mac_acceleration": m_test.acceleration,
            "exit_fractions": [round(float(f), 4) for f in m_test.exit_fractions],
            "in_process": [
                in_process_speedup(runtime, x, tuple(thresholds), b, args.rounds) for b in (1, 32)
            ],
        }
        rows.append(row)
        log.info(
            "%s=%s: test acc %.2f (final %.2f), MAC %.2fx, wall b1 %.2fx b32 %.2fx",
            mode,
            value,
            m_test.accuracy,
            test_table.final_accuracy,
            m_test.acceleration,
            row["in_process"][0]["speedup"],
            row["in_process"][1]["speedup"],
        )

    if not args.skip_http:
        http_rows(args, manifest, rows, test_images)

    report = {
        "bundle": str(args.bundle),
        "model": f"{manifest.name} {manifest.version}",
        "baseline_accuracy": baseline_acc,
        "rows": rows,
        "command": "python scripts/table5.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "table5.json", report)
    atomic_write_bytes(args.out / "table5.md", render(report).encode())
    print(json.dumps({"out": str(args.out), "settings": len(rows)}))
    return 0


def http_rows(args, manifest, rows, test_images) -> None:
    """One real server (CPU, default settings) on a copy of the bundle; thresholds swapped live."""
    token = "table5-token"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        shutil.copytree(args.bundle, bundle, ignore=shutil.ignore_patterns("calibration_cache"))
        env = {
            **os.environ,
            "EARLYEXIT_ADMIN_TOKEN": token,
            "EARLYEXIT_PROVIDERS": "cpu",
            "EARLYEXIT_INTRA_OP_THREADS": str(args.threads),
        }
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving.cli",
                "--bundle",
                str(bundle),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(120):
                try:
                    with urllib.request.urlopen(f"{url}/readyz", timeout=2):
                        break
                except OSError:
                    time.sleep(0.5)
            images, labels = test_images.images[:1000], test_images.labels[:1000]
            _put_thresholds(url, token, [1.0] * manifest.num_exits)
            full = run_http_bench(
                url, images, labels, args.concurrency, args.http_duration, check_answers=False
            )
            full_tp = full["early_exit"]["throughput_rps"]
            for row in rows:
                _put_thresholds(url, token, row["thresholds"])
                early = run_http_bench(
                    url, images, labels, args.concurrency, args.http_duration, check_answers=False
                )
                tp = early["early_exit"]["throughput_rps"]
                row["http"] = {
                    "throughput": tp,
                    "full_depth_throughput": full_tp,
                    "speedup": tp / full_tp,
                    "concurrency": args.concurrency,
                    "duration_s": args.http_duration,
                }
                log.info(
                    "HTTP %s=%s: %.1f req/s vs full depth %.1f (%.2fx)",
                    row["mode"],
                    row["value"],
                    tp,
                    full_tp,
                    tp / full_tp,
                )
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def render(report: dict) -> str:
    base = report["baseline_accuracy"]
    lines = [
        f"# Dynamic inference (seed 004 Table 5 form) — {report['model']}",
        "",
        f"Produced by: `{report['command']}`",
        "",
        "Thresholds tuned on the validation split (5 000 images held out of train), reported on "
        "the 10 000-image test split. Accuracy deltas in points; MAC acceleration = full-model "
        "MACs ÷ mean MACs per row; in-process wall-clock = single-graph full model time ÷ "
        "early-exit chain time on the same rows (warm loops, median of rounds, onnxruntime CPU); "
        "HTTP = server throughput with these thresholds ÷ the same server at full depth "
        "(every exit disabled).",
        "",
        f"Baseline model (backbone only, same arch/epochs/seed) test accuracy: "
        f"{'n/a' if base is None else f'{base:.2f}%'}.",
        "",
        "| setting | thresholds | test acc | Δ vs final exit | Δ vs baseline | MAC accel | wall b=1 | wall b=32 | HTTP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        name = f"β={r['value']}" if r["mode"] == "beta" else f"max-drop {r['value']}"
        dbase = "–" if r["delta_vs_baseline"] is None else f"{r['delta_vs_baseline']:+.2f}"
        http = f"{r['http']['speedup']:.2f}×" if "http" in r else "–"
        lines.append(
            f"| {name} | {', '.join(f'{t:.3f}' for t in r['thresholds'])} | "
            f"{r['test_accuracy']:.2f} | {r['delta_vs_final_exit']:+.2f} | {dbase} | "
            f"{r['mac_acceleration']:.2f}× | {r['in_process'][0]['speedup']:.2f}× | "
            f"{r['in_process'][1]['speedup']:.2f}× | {http} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
