"""HTTP load benchmark against a running `earlyexit-serve`.

Real images are PNG-encoded once up front, answered one at a time in a reference pass (each
image alone in its batch), then posted by N concurrent workers for a fixed duration. Every
answer under load is compared with that image's reference answer: dynamic batching must not
change what a client gets. With `compare_full=True` a second pass runs at full depth (every
threshold 1.0, set through the admin endpoint and restored afterwards) and the two are reported
side by side. `earlyexit-bench --http URL` (benchmarks/cli.py) drives it and prints the report.

Requests go through benchmarks.httpclient, a lean HTTP/1.1 keep-alive client: each worker owns
one persistent connection, so the client's own CPU cost stays well below the model's inference time
(the benchmark usually shares the machine with the server it measures).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from benchmarks.httpclient import HttpClient, HttpClientError, HttpConnection, parse_base_url

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


class LoadTestError(RuntimeError):
    """The server could not be benchmarked (unreachable, not ready, admin call refused)."""


@dataclass
class PassStats:
    """What one load pass saw, client side."""

    latencies_s: list[float] = field(default_factory=list)
    status_codes: Counter[str] = field(default_factory=Counter)
    exits: Counter[str] = field(default_factory=Counter)
    correct: int = 0
    answered: int = 0
    mismatches: int = 0
    max_confidence_diff: float = 0.0
    errors: int = 0
    elapsed_s: float = 0.0
    batch_size_mean: float | None = None

    def summary(self) -> dict[str, Any]:
        lat_ms = np.asarray(self.latencies_s, dtype=np.float64) * 1000.0
        pct = (
            {f"p{q}": round(float(np.percentile(lat_ms, q)), 3) for q in (50, 95, 99)}
            if lat_ms.size
            else {"p50": None, "p95": None, "p99": None}
        )
        answered = max(self.answered, 1)
        return {
            "requests": int(sum(self.status_codes.values())),
            "answered": self.answered,
            "errors": self.errors,
            "status_codes": dict(sorted(self.status_codes.items())),
            "seconds": round(self.elapsed_s, 3),
            "throughput_rps": round(self.answered / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "latency_ms": {
                **pct,
                "mean": round(float(lat_ms.mean()), 3) if lat_ms.size else None,
                "max": round(float(lat_ms.max()), 3) if lat_ms.size else None,
            },
            "accuracy": round(100.0 * self.correct / answered, 3) if self.answered else None,
            "exit_fractions": {
                k: round(v / answered, 4) for k, v in sorted(self.exits.items(), key=exit_order)
            },
            "mismatches": self.mismatches,
            "max_confidence_diff": self.max_confidence_diff,
            "server_batch_size_mean": self.batch_size_mean,
        }


def exit_order(item: tuple[str, int]) -> tuple[int, str]:
    key = item[0]
    return (int(key), "") if key.isdigit() else (1 << 30, key)


def encode_png(images: np.ndarray) -> list[bytes]:
    """uint8 N×H×W×C → PNG bytes per image (C = 1 is saved as greyscale)."""
    from PIL import Image

    payloads = []
    for image in images:
        array = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
        payloads.append(buf.getvalue())
    return payloads


def read_rss_mb(pid: int | None) -> float | None:
    """Resident memory of a local process (Linux /proc), None when unknown."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _scrape_batch_totals(text: str) -> tuple[float, float]:
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("earlyexit_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("earlyexit_batch_size_count"):
            count = float(line.split()[-1])
    return total, count


async def _batch_totals(client: HttpClient) -> tuple[float, float] | None:
    try:
        response = await client.request("GET", "/metrics")
        return _scrape_batch_totals(response.text) if response.status == 200 else None
    except Exception:  # noqa: BLE001 - metrics are a bonus, never a reason to fail the run
        return None


def _answer_key(answer: dict[str, Any]) -> tuple[Any, Any]:
    return answer.get("class_index"), answer.get("exit")


async def _post(
    client: HttpClient | HttpConnection, payload: bytes
) -> tuple[int, dict[str, Any] | None]:
    # /classify has no side effects, so a POST lost to a stale keep-alive connection may be resent.
    response = await client.request(
        "POST", "/classify", payload, {"Content-Type": "image/png"}, retry_safe=True
    )
    body = (
        response.json()
        if response.headers.get("content-type", "").startswith("application/json")
        else None
    )
    return response.status, body


async def reference_answers(client: HttpClient, payloads: Sequence[bytes]) -> list[dict[str, Any]]:
    """One request at a time, so each image is alone in its batch."""
    answers = []
    for i, payload in enumerate(payloads):
        try:
            status, body = await _post(client, payload)
        except HttpClientError as exc:
            raise LoadTestError(f"reference request for image {i} failed: {exc}") from exc
        if status != 200 or body is None:
            raise LoadTestError(f"reference request for image {i} answered {status}: {body}")
        answers.append(body)
    return answers


async def load_pass(
    client: HttpClient,
    payloads: Sequence[bytes],
    labels: Sequence[int],
    references: Sequence[dict[str, Any]] | None,
    concurrency: int,
    duration_s: float,
) -> PassStats:
    """`concurrency` workers, each on its own keep-alive connection (opened before the clock
    starts), post images round-robin until `duration_s` has passed."""
    stats = PassStats()
    order = itertools.count()
    connections = [client.connection() for _ in range(concurrency)]
    # A failed connect is not fatal here: the worker's first request retries it and counts it.
    await asyncio.gather(*(conn.connect() for conn in connections), return_exceptions=True)
    before = await _batch_totals(client)
    started = time.perf_counter()
    deadline = started + duration_s

    async def worker(conn: HttpConnection) -> None:
        while time.perf_counter() < deadline:
            i = next(order) % len(payloads)
            t0 = time.perf_counter()
            try:
                status, body = await _post(conn, payloads[i])
            except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                stats.errors += 1
                stats.status_codes[type(exc).__name__] += 1
                continue
            stats.latencies_s.append(time.perf_counter() - t0)
            stats.status_codes[str(status)] += 1
            if status != 200 or body is None:
                stats.errors += 1
                continue
            stats.answered += 1
            stats.exits[str(body.get("exit"))] += 1
            stats.correct += int(body.get("class_index") == int(labels[i]))
            if references is not None:
                ref = references[i]
                if _answer_key(body) != _answer_key(ref):
                    stats.mismatches += 1
                diff = abs(float(body.get("confidence", 0.0)) - float(ref.get("confidence", 0.0)))
                stats.max_confidence_diff = max(stats.max_confidence_diff, diff)

    try:
        await asyncio.gather(*(worker(conn) for conn in connections))
        stats.elapsed_s = time.perf_counter() - started
    finally:
        await asyncio.gather(*(conn.aclose() for conn in connections))
    after = await _batch_totals(client)
    if before is not None and after is not None and after[1] > before[1]:
        stats.batch_size_mean = round((after[0] - before[0]) / (after[1] - before[1]), 3)
    return stats


async def get_model(client: HttpClient) -> dict[str, Any]:
    response = await client.request("GET", "/v1/model")
    if response.status != 200:
        raise LoadTestError(f"GET /v1/model answered {response.status}: {response.text}")
    model = response.json()
    if not isinstance(model, dict):
        raise LoadTestError(f"GET /v1/model answered {type(model).__name__}, not an object")
    return model


async def _put_thresholds(
    client: HttpClient, token: str | None, values: Sequence[float], tuned: dict[str, Any] | None
) -> None:
    if not token:
        raise LoadTestError("compare_full needs the admin token (EARLYEXIT_ADMIN_TOKEN)")
    body = json.dumps({"thresholds": list(values), "tuned": tuned}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    try:
        response = await client.request("PUT", "/v1/thresholds", body, headers)
    except HttpClientError as exc:
        raise LoadTestError(f"PUT /v1/thresholds failed: {exc}") from exc
    if response.status != 200:
        raise LoadTestError(f"PUT /v1/thresholds answered {response.status}: {response.text}")


async def _one_pass(
    client: HttpClient,
    payloads: Sequence[bytes],
    labels: Sequence[int],
    concurrency: int,
    duration_s: float,
    check_answers: bool,
) -> dict[str, Any]:
    references = await reference_answers(client, payloads) if check_answers else None
    stats = await load_pass(client, payloads, labels, references, concurrency, duration_s)
    return stats.summary()


async def _run(
    url: str,
    payloads: Sequence[bytes],
    labels: Sequence[int],
    concurrency: int,
    duration_s: float,
    admin_token: str | None,
    server_pid: int | None,
    compare_full: bool,
    check_answers: bool,
    timeout_s: float,
) -> dict[str, Any]:
    async with HttpClient(url, timeout_s=timeout_s) as client:
        try:
            model = await get_model(client)
        except HttpClientError as exc:
            raise LoadTestError(f"cannot reach {url}: {exc}") from exc
        if compare_full and model.get("mode") == "full_model":
            raise LoadTestError(
                f"{url} serves the plain model (--full-model), which has no thresholds to set: "
                "--compare-full needs the early-exit server; compare against a --full-model "
                "server with --compare-url"
            )
        report: dict[str, Any] = {
            "url": url,
            "client": "asyncio-http11",
            "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            "model": {"name": model["name"], "version": model["version"]},
            "mode": model.get("mode", "early_exit"),
            "num_exits": model["num_exits"],
            "thresholds": model["thresholds"],
            "images": len(payloads),
            "concurrency": concurrency,
            "duration_s": duration_s,
            "rss_mb_before": read_rss_mb(server_pid),
        }
        report["early_exit"] = await _one_pass(
            client, payloads, labels, concurrency, duration_s, check_answers
        )
        if compare_full:
            original, tuned = list(model["thresholds"]), model.get("tuned") or None
            await _put_thresholds(client, admin_token, [1.0] * model["num_exits"], None)
            try:
                report["full_depth"] = await _one_pass(
                    client, payloads, labels, concurrency, duration_s, check_answers
                )
            finally:
                await _put_thresholds(client, admin_token, original, tuned)
            report["comparison"] = compare_passes(report["early_exit"], report["full_depth"])
        report["rss_mb_after"] = read_rss_mb(server_pid)
    return report


def compare_passes(early: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """Early-exit vs full-depth: speedups > 1 mean early exit is faster."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    return {
        "throughput_speedup": ratio(early["throughput_rps"], full["throughput_rps"]),
        "p50_latency_speedup": ratio(full["latency_ms"]["p50"], early["latency_ms"]["p50"]),
        "p95_latency_speedup": ratio(full["latency_ms"]["p95"], early["latency_ms"]["p95"]),
        "p99_latency_speedup": ratio(full["latency_ms"]["p99"], early["latency_ms"]["p99"]),
        "accuracy_delta": None
        if early["accuracy"] is None or full["accuracy"] is None
        else round(early["accuracy"] - full["accuracy"], 3),
    }


def in_process_speedup(
    runtime: Any, x: np.ndarray, thresholds: Sequence[float], batch_size: int, repeats: int = 5
) -> dict[str, Any]:
    """Early-exit speedup of the runtime itself on preprocessed rows `x`: `thresholds` against
    full depth (every threshold 1.0, what --compare-full sets on the server), batches of
    `batch_size`, timed in turns (`core.timing.time_variants`)."""
    from core.timing import time_variants

    tuned = tuple(float(t) for t in thresholds)
    full = (1.0,) * runtime.manifest.num_exits
    batch_size = max(1, int(batch_size))
    batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    seconds = time_variants(
        {
            "early_exit": lambda b: runtime.classify(b, thresholds=tuned),
            "full_depth": lambda b: runtime.classify(b, thresholds=full),
        },
        batches,
        repeats,
    )
    return {
        "batch_size": batch_size,
        "rows": int(len(x)),
        "seconds": seconds,
        "speedup": seconds["full_depth"] / seconds["early_exit"],
    }


def in_process_latency_p50_ms(
    runtime: Any, images: np.ndarray, thresholds: Sequence[float], repeats: int = 3
) -> float:
    """Median batch-1 latency of preprocess + classify over `images`: the in-process side of
    the serving-overhead target (the server adds HTTP, decoding, batching and JSON)."""
    tuned = tuple(float(t) for t in thresholds)
    runtime.classify(runtime.preprocess(images[:1]), thresholds=tuned)  # warm-up
    times = []
    for _ in range(repeats):
        for i in range(len(images)):
            start = time.perf_counter()
            runtime.classify(runtime.preprocess(images[i : i + 1]), thresholds=tuned)
            times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def add_in_process_reference(
    report: dict[str, Any],
    bundle: str | os.PathLike[str],
    images: np.ndarray,
    threads: int = 0,
    rows: int = 256,
) -> None:
    """Time the served thresholds in-process on the same images and add what the serving
    targets are stated in: HTTP p50 − in-process batch-1 p50 (serving overhead), and HTTP
    throughput speedup ÷ in-process speedup at the early-exit pass's mean server batch size
    (≥ 0.8 means HTTP keeps at least 80 % of what early exit saves in-process)."""
    from serving.runtime import EarlyExitRuntime

    runtime = EarlyExitRuntime(bundle, intra_op_threads=threads, inter_op_threads=1)
    images = np.asarray(images)[:rows]
    thresholds = report["thresholds"]
    early = report["early_exit"]
    reference: dict[str, Any] = {"bundle": str(bundle), "threads": threads}
    p50 = in_process_latency_p50_ms(runtime, images, thresholds)
    reference["latency_ms_p50_batch1"] = round(p50, 4)
    if report["concurrency"] == 1:  # under load, HTTP p50 is mostly queueing, not overhead
        reference["serving_overhead_ms"] = round(early["latency_ms"]["p50"] - p50, 4)
    batch = round(early.get("server_batch_size_mean") or 1.0)
    reference.update(in_process_speedup(runtime, runtime.preprocess(images), thresholds, batch))
    report["in_process"] = reference
    comparison = report.get("comparison")
    if comparison and comparison.get("throughput_speedup"):
        comparison["in_process_speedup"] = round(reference["speedup"], 3)
        comparison["throughput_vs_in_process"] = round(
            comparison["throughput_speedup"] / reference["speedup"], 3
        )


def run_event_loop(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run the load generator on uvloop when it is installed (it is with the serve extra): the
    client shares the machine with the server it measures, so its own per-request cost should
    be as small as a Python client's can be."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_http_bench(
    url: str,
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    concurrency: int = 8,
    duration_s: float = 10.0,
    *,
    admin_token: str | None = None,
    server_pid: int | None = None,
    compare_full: bool = False,
    check_answers: bool = True,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Benchmark a running server with real images (uint8 N×H×W×C) and their labels.

    Returns a JSON-able report: per pass requests, errors, throughput (answers/s), latency
    percentiles (ms, client side), accuracy (%), exit fractions, mismatches against the
    single-image reference answers; RSS of `server_pid` before and after; with `compare_full`
    a full-depth pass and the speedups. Raises LoadTestError when the server cannot be used,
    ValueError (benchmarks.httpclient.InvalidURL for a URL that is not http://) for bad arguments.
    """
    if concurrency < 1 or duration_s <= 0:
        raise ValueError("concurrency must be ≥ 1 and duration_s > 0")
    parse_base_url(url)  # fail before encoding images
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError("need as many labels as images, at least one")
    payloads = encode_png(np.asarray(images))
    return run_event_loop(
        _run(
            url.rstrip("/"),
            payloads,
            [int(v) for v in labels],
            concurrency,
            duration_s,
            admin_token,
            server_pid,
            compare_full,
            check_answers,
            timeout_s,
        )
    )


# ----------------------------------------------------------------------------- CLI glue


def _plot_latency(report: dict[str, Any], path: Path) -> None:
    from core.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [k for k in ("early_exit", "full_depth") if k in report]
    values = [[report[k]["latency_ms"][p] or 0 for p in ("p50", "p95", "p99")] for k in names]
    width = 0.8 / max(len(names), 1)
    for j, (name, vals) in enumerate(zip(names, values, strict=True)):
        ax.bar(np.arange(3) + j * width, vals, width, label=name.replace("_", " "))
    ax.set_xticks(np.arange(3) + width * (len(names) - 1) / 2, ["p50", "p95", "p99"])
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{report['model']['name']}: HTTP latency, concurrency {report['concurrency']}")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, tight=False)


def write_report(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """bench_http.json (atomic) and, when matplotlib is present, latency.png."""
    from core.atomic import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_http.json"
    atomic_write_json(path, report)
    try:
        _plot_latency(report, out / "bench_http_latency.png")
    except ImportError:
        logger.info("matplotlib not installed: no latency plot")
    return path


def format_report(report: dict[str, Any]) -> str:
    """A few human lines (the JSON has everything)."""
    lines = [f"{report['url']} — {report['model']['name']} {report['model']['version']}, "
             f"{report['images']} images, concurrency {report['concurrency']}"]  # fmt: skip
    for name in ("early_exit", "full_depth"):
        if name not in report:
            continue
        p = report[name]
        lat = p["latency_ms"]
        lines.append(
            f"  {name:10s} {p['throughput_rps']:8.1f} req/s  p50 {lat['p50']} ms  "
            f"p95 {lat['p95']} ms  p99 {lat['p99']} ms  acc {p['accuracy']}%  "
            f"errors {p['errors']}  mismatches {p['mismatches']}  exits {p['exit_fractions']}"
        )
    if "comparison" in report:
        lines.append(f"  speedups   {report['comparison']}")
    if "in_process" in report:
        ref = report["in_process"]
        overhead = ref.get("serving_overhead_ms")
        lines.append(
            f"  in-process batch-1 p50 {ref['latency_ms_p50_batch1']} ms"
            + ("" if overhead is None else f" → serving overhead {overhead} ms")
            + f"; early-exit speedup at batch {ref['batch_size']}: {ref['speedup']:.3f}"
        )
    if report.get("rss_mb_before") is not None:
        lines.append(f"  server RSS {report['rss_mb_before']} → {report['rss_mb_after']} MiB")
    return "\n".join(lines)
