"""Early exit against the plain model over HTTP: two servers of one bundle, side by side.

`earlyexit-bench --http URL --compare-url URL2` benchmarks an early-exit server (URL) and a
`earlyexit-serve --full-model` server of the same bundle (URL2), the model users would deploy
otherwise served the same way. Steps:
1. Check the pair: URL serves the early-exit chain, URL2 the plain model, of the same bundle
   (name, version, labels).
2. Send every image once, alone, to each server: the reference answers, and from them the two
   servers' agreement (same class on the same image) and accuracies.
3. Alternate load passes, early exit then plain (A, B, A, B, …), `pairs` times, at the same
   concurrency and duration. Each pass checks its answers against its server's references.
4. Report every pass, the throughput ratio early exit ÷ plain of each pair and its median, and,
   with a local copy of the bundle, the same ratio measured in-process at the early-exit
   server's mean batch size, so the ratio of ratios says how much of the runtime's own saving
   survives HTTP.

Alternating passes spread slow drifts of a shared machine over both servers; the median over
pairs keeps one disturbed pass from deciding the result.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.httpclient import HttpClient, HttpClientError
from benchmarks.loadtest import (
    LoadTestError,
    encode_png,
    exit_order,
    get_model,
    load_pass,
    read_rss_mb,
    reference_answers,
    run_event_loop,
)

logger = logging.getLogger(__name__)

REPORT_FILE = "bench_http_vs_plain.json"
EARLY, PLAIN = "early_exit", "plain"


class PairingError(LoadTestError):
    """The two servers are not an early-exit server and a plain-model server of one bundle."""


def check_pair(early: dict[str, Any], plain: dict[str, Any], urls: tuple[str, str]) -> None:
    """Refuse a pair that would compare the wrong things (`GET /v1/model` of each server)."""
    early_url, plain_url = urls
    if early.get("mode", "early_exit") != "early_exit":
        raise PairingError(
            f"{early_url} serves the plain model (--full-model); give the early-exit server "
            "as --http and the --full-model server as --compare-url"
        )
    if plain.get("mode") != "full_model":
        raise PairingError(
            f"{plain_url} does not serve the plain model: start it with "
            "earlyexit-serve --full-model on the same bundle"
        )
    for key in ("name", "version", "labels"):
        if early.get(key) != plain.get(key):
            raise PairingError(
                f"the two servers serve different bundles ({key}: "
                f"{_short(early.get(key))} against {_short(plain.get(key))})"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def agreement(
    early: Sequence[dict[str, Any]], plain: Sequence[dict[str, Any]], labels: Sequence[int]
) -> dict[str, Any]:
    """How often the two servers give the same class to the same image (fractions of rows),
    overall and by the early-exit answer's exit, and each one's accuracy (percent)."""
    same = [a.get("class_index") == b.get("class_index") for a, b in zip(early, plain, strict=True)]
    rows = len(same)
    answered: Counter[str] = Counter()
    agreed: Counter[str] = Counter()
    for answer, agrees in zip(early, same, strict=True):
        answered[str(answer.get("exit"))] += 1
        agreed[str(answer.get("exit"))] += int(agrees)

    def accuracy(answers: Sequence[dict[str, Any]]) -> float:
        right = sum(
            1 for a, y in zip(answers, labels, strict=True) if a.get("class_index") == int(y)
        )
        return round(100.0 * right / rows, 3)

    return {
        "rows": rows,
        "agreement": round(sum(same) / rows, 4),
        "disagreements": rows - sum(same),
        "by_exit": {
            key: {"rows": n, "agreement": round(agreed[key] / n, 4)}
            for key, n in sorted(answered.items(), key=exit_order)
        },
        "early_exit_accuracy": accuracy(early),
        "plain_accuracy": accuracy(plain),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(float(np.median(known)), 3) if known else None


def pair_rows(
    early: Sequence[dict[str, Any]], plain: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per pair of passes: both throughputs, early exit ÷ plain for throughput, and plain ÷
    early exit for latency percentiles (> 1: early exit is faster either way)."""
    rows = []
    for i, (a, b) in enumerate(zip(early, plain, strict=True), start=1):
        rows.append(
            {
                "pair": i,
                "early_exit_rps": a["throughput_rps"],
                "plain_rps": b["throughput_rps"],
                "throughput_ratio": _ratio(a["throughput_rps"], b["throughput_rps"]),
                **{
                    f"{q}_latency_speedup": _ratio(b["latency_ms"][q], a["latency_ms"][q])
                    for q in ("p50", "p95", "p99")
                },
            }
        )
    return rows


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The medians over pairs, the servers' mean batch sizes and the accuracy difference."""
    pairs = report["pairs"]
    ratios = [p["throughput_ratio"] for p in pairs]
    known = [r for r in ratios if r is not None]

    def batch_mean(name: str) -> float | None:
        sizes = [p["server_batch_size_mean"] for p in report["passes"][name]]
        return _median(sizes)

    agree = report["agreement"]
    return {
        "throughput_ratio_median": _median(ratios),
        "throughput_ratio_min": min(known) if known else None,
        "throughput_ratio_max": max(known) if known else None,
        **{
            f"{q}_latency_speedup_median": _median([p[f"{q}_latency_speedup"] for p in pairs])
            for q in ("p50", "p95", "p99")
        },
        "early_exit_batch_size_mean": batch_mean(EARLY),
        "plain_batch_size_mean": batch_mean(PLAIN),
        "accuracy_delta": round(agree["early_exit_accuracy"] - agree["plain_accuracy"], 3),
    }


async def _models(
    early: HttpClient, plain: HttpClient, urls: tuple[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    models = []
    for client, url in zip((early, plain), urls, strict=True):
        try:
            models.append(await get_model(client))
        except HttpClientError as exc:
            raise LoadTestError(f"cannot reach {url}: {exc}") from exc
    return models[0], models[1]


async def _run_pair(
    urls: tuple[str, str],
    payloads: Sequence[bytes],
    labels: Sequence[int],
    concurrency: int,
    duration_s: float,
    pairs: int,
    server_pid: int | None,
    timeout_s: float,
) -> dict[str, Any]:
    async with (
        HttpClient(urls[0], timeout_s=timeout_s) as early,
        HttpClient(urls[1], timeout_s=timeout_s) as plain,
    ):
        early_model, plain_model = await _models(early, plain, urls)
        check_pair(early_model, plain_model, urls)
        report: dict[str, Any] = {
            "url": urls[0],
            "compare_url": urls[1],
            "client": "asyncio-http11",
            "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            "model": {"name": early_model["name"], "version": early_model["version"]},
            "num_exits": early_model["num_exits"],
            "thresholds": early_model["thresholds"],
            "plain_graph": plain_model.get("served_graph"),
            "images": len(payloads),
            "concurrency": concurrency,
            "duration_s": duration_s,
            "pairs_run": pairs,
            "order": "alternating: early_exit, plain, early_exit, plain, ...",
            "rss_mb_before": read_rss_mb(server_pid),
        }
        references = {
            EARLY: await reference_answers(early, payloads),
            PLAIN: await reference_answers(plain, payloads),
        }
        report["agreement"] = agreement(references[EARLY], references[PLAIN], labels)
        passes: dict[str, list[dict[str, Any]]] = {EARLY: [], PLAIN: []}
        number = 0
        for _ in range(pairs):
            for name, client in ((EARLY, early), (PLAIN, plain)):
                number += 1
                logger.info("pass %d of %d: %s", number, 2 * pairs, name)
                stats = await load_pass(
                    client, payloads, labels, references[name], concurrency, duration_s
                )
                passes[name].append({"pass": number, **stats.summary()})
        report["passes"] = passes
        report["pairs"] = pair_rows(passes[EARLY], passes[PLAIN])
        report["comparison"] = summarize(report)
        report["rss_mb_after"] = read_rss_mb(server_pid)
    return report


def run_http_comparison(
    url: str,
    compare_url: str,
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    concurrency: int = 8,
    duration_s: float = 10.0,
    pairs: int = 3,
    *,
    server_pid: int | None = None,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Benchmark an early-exit server (`url`) against a `--full-model` server of the same
    bundle (`compare_url`) with real images (uint8 N×H×W×C) and labels; see the module
    docstring. `server_pid` (the early-exit server's) adds its RSS. Raises PairingError for a
    wrong pair, LoadTestError when a server cannot be used, ValueError for bad arguments."""
    if concurrency < 1 or duration_s <= 0 or pairs < 1:
        raise ValueError("concurrency and pairs must be ≥ 1 and duration_s > 0")
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError("need as many labels as images, at least one")
    payloads = encode_png(np.asarray(images))
    urls = (url.rstrip("/"), compare_url.rstrip("/"))
    return run_event_loop(
        _run_pair(
            urls,
            payloads,
            [int(v) for v in labels],
            concurrency,
            duration_s,
            pairs,
            server_pid,
            timeout_s,
        )
    )


def add_in_process_reference(
    report: dict[str, Any],
    bundle: str | os.PathLike[str],
    images: np.ndarray,
    threads: int = 0,
    rows: int = 256,
    repeats: int = 5,
) -> None:
    """The same comparison in-process on a local copy of the bundle: the served thresholds
    against the plain graph, on the same images, in batches of the early-exit server's mean
    batch size, timed in turns (`core.timing.time_variants`). Adds `in_process` and, in
    `comparison`, `in_process_speedup` and `throughput_vs_in_process` (the HTTP median ratio ÷
    the in-process one; 1.0 = HTTP keeps all of it). BundleError when the local plain graph is
    not the one the plain server serves."""
    from core.bundle import BundleError
    from core.timing import time_variants
    from serving.plain_runtime import PlainModelRuntime
    from serving.runtime import EarlyExitRuntime

    early = EarlyExitRuntime(bundle, intra_op_threads=threads, inter_op_threads=1)
    plain = PlainModelRuntime(bundle, intra_op_threads=threads, inter_op_threads=1)
    served = report.get("plain_graph") or {}
    if served.get("sha256") and served["sha256"] != plain.graph.sha256:
        raise BundleError(
            f"its plain graph {plain.graph.file} is not the one {report['compare_url']} serves "
            f"({served.get('file')}, sha256 {str(served['sha256'])[:12]}…)"
        )
    comparison = report["comparison"]
    batch = max(1, round(comparison.get("early_exit_batch_size_mean") or 1.0))
    x = early.preprocess(np.asarray(images)[:rows])
    tuned = tuple(float(t) for t in report["thresholds"])
    batches = [x[i : i + batch] for i in range(0, len(x), batch)]
    seconds = time_variants(
        {EARLY: lambda b: early.classify(b, thresholds=tuned), PLAIN: plain.run},
        batches,
        repeats,
    )
    speedup = seconds[PLAIN] / seconds[EARLY]
    report["in_process"] = {
        "bundle": Path(bundle).name,
        "threads": threads,
        "batch_size": batch,
        "rows": int(len(x)),
        "repeats": repeats,
        "seconds": seconds,
        "speedup": round(speedup, 4),
    }
    comparison["in_process_speedup"] = round(speedup, 3)
    median = comparison.get("throughput_ratio_median")
    comparison["throughput_vs_in_process"] = round(median / speedup, 3) if median else None


def format_comparison(report: dict[str, Any]) -> str:
    """A few human lines (the JSON has everything)."""
    model = report["model"]
    graph = report.get("plain_graph") or {}
    lines = [
        f"{report['url']} (early exit) vs {report['compare_url']} (plain model "
        f"{graph.get('file')}) — {model['name']} {model['version']}, {report['images']} images, "
        f"concurrency {report['concurrency']}, {report['duration_s']} s a pass"
    ]
    for pair in report["pairs"]:
        lines.append(
            f"  pair {pair['pair']}: early exit {pair['early_exit_rps']:.1f} req/s, plain "
            f"{pair['plain_rps']:.1f} req/s, ratio {pair['throughput_ratio']}, p50 speedup "
            f"{pair['p50_latency_speedup']}"
        )
    c, agree = report["comparison"], report["agreement"]
    errors = sum(p["errors"] + p["mismatches"] for ps in report["passes"].values() for p in ps)
    lines.append(
        f"  median throughput ratio {c['throughput_ratio_median']} (min "
        f"{c['throughput_ratio_min']}, max {c['throughput_ratio_max']}); errors and mismatches "
        f"{errors}"
    )
    lines.append(
        f"  agreement {100 * agree['agreement']:.2f}% of {agree['rows']} images; accuracy "
        f"{agree['early_exit_accuracy']}% vs {agree['plain_accuracy']}%"
    )
    if "in_process" in report:
        ref = report["in_process"]
        lines.append(
            f"  in-process at batch {ref['batch_size']}: {ref['speedup']:.3f}x; HTTP keeps "
            f"{c['throughput_vs_in_process']} of it"
        )
    return "\n".join(lines)
