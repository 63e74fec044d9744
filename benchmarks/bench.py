"""In-process benchmark of a bundle: accuracy, exit fractions, MAC and wall-clock speedups.

Accuracy is in percent; `acceleration` follows the contract (full_model.macs ÷ mean MACs of the
segments each row ran, a fallback row ran all K); `mac_speedup_executed` counts what the runtime
really ran (stage files instead of segments for skipped heads). Each wall-clock variant runs
the timing rows back to back in its own warm loop (as a server running only that variant
would), the variants take turns in an order rotated from repeat to repeat (this machine is
noisy), and each reported time is the median over repeats of the time to run the rows:

- `dynamic`: the bundle's thresholds;
- `chain_all_disabled`: every threshold 1.0 (every row runs the whole chain);
- `chain_last_exit`: exits 1..K−1 disabled, exit K answers (stage files when the bundle has them);
- `full_model`: the plain single-graph model.

`efficiency` = measured speedup over the full model ÷ MAC speedup on the same rows, counting
the MACs the runtime really ran (a stage file's where it skips a disabled exit's head).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_write_json
from core.bundle import plain_macs
from core.calibration import collect_calibration
from core.costs import acceleration, exit_fractions, plain_fallback_cost
from core.decision import FALLBACK_EXIT, chain_segments, decide
from core.timing import time_variant_runs, time_variants
from serving.runtime import EarlyExitRuntime

logger = logging.getLogger(__name__)

REPORT_FILE = "bench.json"
HISTOGRAM_FILE = "exit_histogram.png"
SWEEP_FILE = "accuracy_vs_speedup.png"
HIGH_CONFIDENCE_THRESHOLDS = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


@dataclass(frozen=True)
class BenchConfig:
    bundle: str
    dataset: str
    data_dir: str
    split: str = "test"
    limit: int | None = None
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    repeats: int = 5
    timing_rows: int = 256
    last_exit_rows: int = 64
    providers: tuple[str, ...] = ("cpu",)
    intra_op_threads: int = 0
    sweep_points: int = 21
    eval_batch_size: int = 256
    out: str | None = None
    progress: bool = True


# ----------------------------------------------------------------------------- costs


def fallback_macs(
    fallback: str, thresholds: Sequence[float], segment_macs: Sequence[int], plain_macs: float
) -> float | None:
    """What a row no exit accepts costs when that differs from running every segment (fallback
    "plain": the segments up to the last enabled exit, then the plain graph); else None."""
    if fallback != "plain":
        return None
    ran = int(chain_segments(list(thresholds), fallback))
    return plain_fallback_cost(segment_macs, ran, plain_macs)


def threshold_sweep(
    exit_probs: np.ndarray,
    labels: np.ndarray,
    fallback: str,
    segment_macs: Sequence[int],
    full_macs: int,
    points: int = 21,
    plain_probs: np.ndarray | None = None,
    plain_macs: float | None = None,
) -> list[dict[str, float]]:
    """Accuracy and acceleration with one global threshold t for every exit: `points` evenly
    spaced in [0, 1] plus the high-confidence values trained networks live at (fallback
    "plain": `plain_probs` answer the rows no exit takes, at `plain_macs` each)."""
    grid = np.union1d(np.linspace(0.0, 1.0, max(points, 2)), HIGH_CONFIDENCE_THRESHOLDS)
    out = []
    for t in grid:
        th = [float(t)] * exit_probs.shape[1]
        answers, exits = decide(exit_probs, th, fallback, plain_probs)
        rest = fallback_macs(fallback, th, segment_macs, plain_macs or full_macs)
        out.append(
            {
                "threshold": round(float(t), 6),
                "accuracy": 100.0 * float(np.mean(answers.argmax(axis=1) == labels)),
                "acceleration": acceleration(exits, segment_macs, full_macs, rest),
            }
        )
    return out


# ----------------------------------------------------------------------------- timing


def segment_costs(
    runtime: EarlyExitRuntime,
    x: np.ndarray,
    batch_size: int,
    executed_macs: Sequence[int],
    full_model_seconds_per_row: float,
    passes: int = 2,
) -> list[dict[str, Any]]:
    """Where the dynamic variant's time goes, segment by segment, next to where its MACs go.

    Runs the bundle's thresholds over `x` in batches of `batch_size` (`_dynamic_pass`) `passes`
    times (the last pass counts: its caches are warm from the one before) and reads the
    runtime's own per-segment clock (onnxruntime calls only, not the Python between them). Per
    segment: the rows that entered it, its time
    per row as a share of the single graph's time per image (`time_share`), its executed MACs
    as a share of the single graph's (`mac_share`), and their ratio: above 1 the segment costs
    more per MAC than the single graph does, so leaving before it saves more time than the MAC
    speedup counts, and efficiency can exceed 1; below 1, less.
    """
    for _ in range(passes):
        _, _, seconds, rows = _dynamic_pass(runtime, x, batch_size, progress=False)
    full_macs = runtime.manifest.full_model.macs
    out: list[dict[str, Any]] = []
    for j in range(runtime.manifest.num_exits):
        mac_share = float(executed_macs[j]) / full_macs
        entry: dict[str, Any] = {"segment": j + 1, "rows": int(rows[j]), "mac_share": mac_share}
        if rows[j]:
            per_row = seconds[j] / rows[j]
            time_share = per_row / full_model_seconds_per_row
            entry |= {
                "ms_per_row": 1e3 * per_row,
                "time_share": time_share,
                "time_per_mac_vs_full_model": time_share / mac_share,
            }
        else:  # no row reached it at these thresholds: nothing was timed
            entry |= {"ms_per_row": None, "time_share": None, "time_per_mac_vs_full_model": None}
        out.append(entry)
    return out


def _timing_for_batch_size(
    runtime: EarlyExitRuntime,
    x: np.ndarray,
    exits: np.ndarray,
    batch_size: int,
    repeats: int,
    executed_macs: Sequence[int],
) -> dict[str, Any]:
    """Wall-clock variants at `batch_size`; `executed_macs` are the MACs per segment that the
    dynamic variant really runs (a stage file's where it skips a head), so `efficiency` is
    measured against the arithmetic that was done."""
    m = runtime.manifest
    k = m.num_exits
    disabled = (1.0,) * k
    last_only = (1.0,) * (k - 1) + (0.0,)
    variants: dict[str, Callable[[np.ndarray], Any]] = {
        "dynamic": runtime.classify,
        "chain_all_disabled": lambda b: runtime.classify(b, thresholds=disabled),
        "chain_last_exit": lambda b: runtime.classify(b, thresholds=last_only),
        "full_model": runtime.run_full_model,
    }
    batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    seconds = time_variants(variants, batches, repeats)
    rest = fallback_macs(m.fallback, runtime.thresholds, executed_macs, plain_macs(m))
    mac_speedup = acceleration(exits, executed_macs, m.full_model.macs, rest)
    vs_full = seconds["full_model"] / seconds["dynamic"]
    segments = segment_costs(runtime, x, batch_size, executed_macs, seconds["full_model"] / len(x))
    return {
        "rows": int(len(x)),
        "batches": len(batches),
        "repeats": repeats,
        "seconds": seconds,
        "ms_per_image": {name: 1e3 * s / len(x) for name, s in seconds.items()},
        "speedup_vs_full_model": vs_full,
        "speedup_vs_chain": seconds["chain_all_disabled"] / seconds["dynamic"],
        "chain_last_exit_vs_full_model": seconds["chain_last_exit"] / seconds["full_model"],
        "chain_all_disabled_vs_full_model": seconds["chain_all_disabled"] / seconds["full_model"],
        "mac_speedup": mac_speedup,
        "efficiency": vs_full / mac_speedup,
        "segments": segments,
    }


def _per_call_seconds(
    runtime: EarlyExitRuntime, x: np.ndarray, repeats: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch-1 seconds per call over the rows of `x`: the bundle's thresholds (with the exit
    that answered each call) and the single graph, in the warm blocks of `time_variant_runs`
    (order alternating from repeat to repeat), but timed call by call."""
    rows = [x[i : i + 1] for i in range(len(x))]
    chain: list[float] = []
    answered: list[int] = []
    full: list[float] = []

    def run_chain(row: np.ndarray) -> None:
        start = time.perf_counter()
        result = runtime.classify(row)
        chain.append(time.perf_counter() - start)
        answered.append(int(result.exits[0]))

    def run_full(row: np.ndarray) -> None:
        start = time.perf_counter()
        runtime.run_full_model(row)
        full.append(time.perf_counter() - start)

    time_variant_runs({"chain": run_chain, "full": run_full}, rows, repeats)
    # Each list starts with `time_variant_runs`' warm-up call, which is not kept.
    return np.asarray(chain[1:]), np.asarray(answered[1:], dtype=np.int64), np.asarray(full[1:])


def last_exit_latency(
    runtime: EarlyExitRuntime, x: np.ndarray, repeats: int
) -> dict[str, Any] | None:
    """Batch-1 latency of the rows `x` (those that go all the way: exit K or a fallback that
    runs every segment; with fallback "plain", exit K's rows and the plain graph's rows are
    passed separately) vs the full model, run back to back (their segments' weights stay in
    cache; `latency_by_exit` has them among the other rows)."""
    if len(x) == 0:
        return None
    chain, _, full = _per_call_seconds(runtime, x, repeats)
    chain_ms, full_ms = 1e3 * float(np.median(chain)), 1e3 * float(np.median(full))
    return {
        "rows": len(x),
        "repeats": repeats,
        "chain_ms": chain_ms,
        "full_model_ms": full_ms,
        "ratio": chain_ms / full_ms,
    }


def latency_by_exit(runtime: EarlyExitRuntime, x: np.ndarray, repeats: int) -> dict[str, Any]:
    """Batch-1 latency per answering exit, the rows of `x` in their own order (the mix of exits
    that traffic like them brings), against the single graph's median call on the same rows."""
    chain, answered, full = _per_call_seconds(runtime, x, repeats)
    full_ms = 1e3 * float(np.median(full))
    exits = []
    for e in [*range(1, runtime.manifest.num_exits + 1), FALLBACK_EXIT]:
        calls = chain[answered == e]
        if calls.size:
            ms = 1e3 * float(np.median(calls))
            exits.append(
                {
                    "exit": e if e != FALLBACK_EXIT else "fallback",
                    "rows": int(calls.size) // repeats,
                    "ms": ms,
                    "vs_full_model": ms / full_ms,
                }
            )
    return {"rows": len(x), "repeats": repeats, "full_model_ms": full_ms, "exits": exits}


# ----------------------------------------------------------------------------- benchmark


def _load_rows(config: BenchConfig, runtime: EarlyExitRuntime) -> Any:
    from core.datasets import DEFAULT_SPLIT_SEED, DEFAULT_VAL_SIZE, load_split

    training = runtime.manifest.provenance.get("training_config") or {}
    data = load_split(
        config.dataset,
        config.data_dir,
        config.split,
        val_size=int(training.get("val_size") or DEFAULT_VAL_SIZE),
        split_seed=int(training.get("split_seed") or DEFAULT_SPLIT_SEED),
    )
    if config.limit is not None:
        data = data.subset(np.arange(min(config.limit, len(data))))
    if len(data) == 0:
        raise ValueError(f"{config.dataset} {config.split} split has no rows")
    expected = runtime.manifest.input.shape
    got = data.images.shape[1:] if data.images.ndim == 4 else (*data.images.shape[1:], 1)
    if tuple(got) != (expected[1], expected[2], expected[0]):
        raise ValueError(
            f"dataset images are {list(got)} (H×W×C) but the bundle expects C×H×W {list(expected)}"
        )
    return data


def _dynamic_pass(
    runtime: EarlyExitRuntime, x: np.ndarray, batch_size: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, list[float], list[int]]:
    answers = np.empty((len(x), runtime.manifest.num_classes), dtype=np.float32)
    exits = np.empty(len(x), dtype=np.int64)
    seg_seconds = np.zeros(runtime.manifest.num_exits)
    seg_rows = np.zeros(runtime.manifest.num_exits, dtype=np.int64)
    starts = range(0, len(x), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="dynamic", unit="batch", leave=False)
    for start in starts:
        result = runtime.classify(x[start : start + batch_size])
        answers[start : start + batch_size] = result.probs
        exits[start : start + batch_size] = result.exits
        seg_seconds += result.segment_seconds
        seg_rows += result.rows_per_segment
    return answers, exits, seg_seconds.tolist(), seg_rows.tolist()


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Benchmark a bundle on a dataset split; writes report + plots to `config.out` if set."""
    started = time.perf_counter()
    if not config.batch_sizes or any(b < 1 for b in config.batch_sizes):
        raise ValueError("batch sizes must be positive integers")
    if config.repeats < 1:
        raise ValueError("repeats must be >= 1")
    if config.timing_rows < 1:
        raise ValueError("timing rows must be >= 1")
    runtime = EarlyExitRuntime(
        config.bundle, providers=config.providers, intra_op_threads=config.intra_op_threads
    )
    m = runtime.manifest
    k = m.num_exits
    data = _load_rows(config, runtime)
    labels = data.labels
    x = runtime.preprocess(data.images)
    logger.info("benchmarking %s on %d %s rows", m.name, len(labels), config.split)

    exit_probs, _ = collect_calibration(
        runtime, data.images, labels, config.eval_batch_size, progress=config.progress
    )
    exit_accuracy = [
        100.0 * float(np.mean(exit_probs[:, j].argmax(axis=1) == labels)) for j in range(k)
    ]
    thresholds = runtime.thresholds
    plain = None
    if m.fallback == "plain":  # the rows no exit accepts are the plain graph's
        step = config.eval_batch_size
        plain = np.concatenate(
            [runtime.run_plain(x[i : i + step])[0] for i in range(0, len(x), step)]
        )
    cal_answers, cal_exits = decide(exit_probs, thresholds, m.fallback, plain)
    fallback_answers, _ = decide(exit_probs, (1.0,) * k, m.fallback, plain)

    answers, exits, seg_seconds, seg_rows = _dynamic_pass(
        runtime, x, config.eval_batch_size, config.progress
    )
    predicted = answers.argmax(axis=1)
    cal_predicted = cal_answers.argmax(axis=1)
    agreement = float(np.mean((predicted == cal_predicted) & (exits == cal_exits)))
    if agreement < 1.0:
        logger.warning(
            "runtime and calibration arrays disagree on %.4f%% of rows (ties at a threshold?)",
            100.0 * (1.0 - agreement),
        )
    skips = runtime.stage_skips(thresholds)
    executed = [
        s.stage_macs if skip and s.stage_macs else s.macs
        for s, skip in zip(m.segments, skips, strict=True)
    ]
    dynamic = {
        "thresholds": list(thresholds),
        "accuracy": 100.0 * float(np.mean(predicted == labels)),
        "calibration_accuracy": 100.0 * float(np.mean(cal_predicted == labels)),
        "calibration_agreement": agreement,
        "exit_fractions": exit_fractions(exits, k),
        "acceleration": acceleration(
            exits,
            m.segment_macs(),
            m.full_model.macs,
            fallback_macs(m.fallback, thresholds, m.segment_macs(), plain_macs(m)),
        ),
        "mac_speedup_executed": acceleration(
            exits,
            executed,
            m.full_model.macs,
            fallback_macs(m.fallback, thresholds, executed, plain_macs(m)),
        ),
        "stage_files_used": [bool(s) for s in skips],
        "rows_per_segment": seg_rows,
        "segment_seconds": seg_seconds,
    }
    logger.info(
        "dynamic accuracy %.2f%% (final exit %.2f%%), acceleration %.2fx, agreement %.4f",
        dynamic["accuracy"],
        exit_accuracy[-1],
        dynamic["acceleration"],
        agreement,
    )

    timing_x = x[: config.timing_rows]
    timing_exits = exits[: config.timing_rows]
    timing = {}
    for batch_size in config.batch_sizes:
        logger.info("timing at batch %d", batch_size)
        timing[str(batch_size)] = _timing_for_batch_size(
            runtime, timing_x, timing_exits, batch_size, config.repeats, executed
        )
    # Rows past exit K-1. With fallback "plain" the rows no exit accepts pay the plain graph
    # after the chain, a different cost from exit K's rows: each is measured on its own.
    if m.fallback == "plain":
        deep = np.flatnonzero(exits == k)[: config.last_exit_rows]
        to_plain = np.flatnonzero(exits == 0)[: config.last_exit_rows]
        plain_last = last_exit_latency(runtime, x[to_plain], config.repeats)
    else:
        deep = np.flatnonzero((exits == k) | (exits == 0))[: config.last_exit_rows]
        plain_last = None
    last = last_exit_latency(runtime, x[deep], config.repeats)
    by_exit = latency_by_exit(runtime, timing_x, config.repeats)

    sweep = threshold_sweep(
        exit_probs,
        labels,
        m.fallback,
        m.segment_macs(),
        m.full_model.macs,
        config.sweep_points,
        plain,
        plain_macs(m),
    )
    report: dict[str, Any] = {
        "bundle": {
            "path": str(Path(config.bundle)),
            "name": m.name,
            "version": m.version,
            "num_exits": k,
            "fallback": m.fallback,
            "segment_macs": m.segment_macs(),
            "full_model_macs": m.full_model.macs,
            "tuned": runtime.tuned,
        },
        "data": {"dataset": config.dataset, "split": config.split, "rows": int(len(labels))},
        "providers": runtime.providers,
        "exit_accuracy": exit_accuracy,
        "final_exit_accuracy": exit_accuracy[-1],
        "fallback_accuracy": 100.0 * float(np.mean(fallback_answers.argmax(axis=1) == labels)),
        "dynamic": dynamic,
        "timing": timing,
        "last_exit_latency": last,
        "plain_fallback_latency": plain_last,
        "latency_by_exit": by_exit,
        "sweep": sweep,
    }
    report["seconds"] = time.perf_counter() - started
    if config.out:
        report["files"] = write_report(report, config.out)
    return report


def write_report(report: dict[str, Any], out_dir: str | Path) -> list[str]:
    """bench.json + exit histogram + accuracy-vs-speedup PNGs, each written atomically."""
    from benchmarks import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = report["bundle"]["name"]
    files = [
        plots.exit_histogram(
            report["dynamic"]["exit_fractions"],
            out / HISTOGRAM_FILE,
            title=f"{name}: exits on {report['data']['split']} ({report['data']['rows']} rows)",
        ),
        plots.accuracy_vs_speedup(
            report["sweep"],
            out / SWEEP_FILE,
            point={
                "accuracy": report["dynamic"]["accuracy"],
                "acceleration": report["dynamic"]["acceleration"],
            },
            baseline_accuracy=report["final_exit_accuracy"],
            title=f"{name}: accuracy vs MAC speedup",
        ),
    ]
    paths = [str(out / REPORT_FILE)] + [str(f) for f in files]
    # The report names its files relative to its own folder: no machine path in an artifact.
    atomic_write_json(out / REPORT_FILE, {**report, "files": [Path(p).name for p in paths]})
    return paths
