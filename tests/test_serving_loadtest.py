"""The HTTP load benchmark against a real server (short passes: about a second each)."""

from __future__ import annotations

import json

import httpx
import pytest

from benchmarks.loadtest import run_http_bench
from core.bundle import THRESHOLDS_FILE, read_thresholds
from tests.conftest import copy_bundle
from tests.data_fixtures import write_tiny_cifar10
from tests.serving_helpers import server_process

TOKEN = "loadtest-token"


@pytest.fixture(scope="module")
def bundle(tiny_bundle, tmp_path_factory):
    return copy_bundle(tiny_bundle, tmp_path_factory.mktemp("loadtest") / "bundle")


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    env = {"EARLYEXIT_ADMIN_TOKEN": TOKEN}
    with server_process(bundle, env=env, log_dir=tmp_path_factory.mktemp("log")) as proc:
        yield proc


def test_bench_with_full_depth_comparison(server, bundle, tiny_images) -> None:
    original_file = (bundle / THRESHOLDS_FILE).read_text()
    original = list(read_thresholds(bundle, 3).values)
    images, labels = tiny_images.images[:24], tiny_images.labels[:24]
    report = run_http_bench(
        server.url, images, labels, concurrency=6, duration_s=1.0,
        admin_token=TOKEN, server_pid=server.pid, compare_full=True, timeout_s=300,
    )  # fmt: skip
    early, full = report["early_exit"], report["full_depth"]
    for p in (early, full):
        # How many answers fit in a second depends on the machine; all of them must be right.
        assert p["answered"] >= 1 and p["errors"] == 0 and p["mismatches"] == 0
        assert p["status_codes"] == {"200": p["answered"]}
        assert p["throughput_rps"] > 0
        assert 0 < p["latency_ms"]["p50"] <= p["latency_ms"]["p95"] <= p["latency_ms"]["p99"]
        assert 0.0 <= p["accuracy"] <= 100.0
        assert sum(p["exit_fractions"].values()) == pytest.approx(1.0, abs=1e-3)
        assert p["server_batch_size_mean"] >= 1.0
    # Full depth: every threshold 1.0, so every answer is the fallback; early exit uses exits.
    assert full["exit_fractions"] == {"fallback": 1.0}
    assert set(early["exit_fractions"]) <= {"1", "2", "3", "fallback"}
    assert report["comparison"]["throughput_speedup"] == pytest.approx(
        early["throughput_rps"] / full["throughput_rps"], rel=1e-2
    )
    assert report["rss_mb_before"] > 10 and report["rss_mb_after"] > 10
    # The original thresholds are back, in the server and on disk.
    model = httpx.get(f"{server.url}/v1/model", timeout=60).json()
    assert model["thresholds"] == pytest.approx(original)
    assert json.loads((bundle / THRESHOLDS_FILE).read_text())["thresholds"] == pytest.approx(
        json.loads(original_file)["thresholds"]
    )


def test_earlyexit_bench_http(server, bundle, tmp_path, capsys, monkeypatch) -> None:
    from benchmarks.cli import main as bench_main

    monkeypatch.delenv("EARLYEXIT_ADMIN_TOKEN", raising=False)
    data_dir = write_tiny_cifar10(tmp_path / "data", per_batch=10)
    common = ["--dataset", "cifar10", "--data-dir", str(data_dir), "--concurrency", "4",
              "--duration", "0.5"]  # fmt: skip
    argv = ["--http", server.url, *common, "--json", "--out", str(tmp_path / "out"),
            "--server-pid", str(server.pid)]  # fmt: skip
    assert bench_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 10 and report["early_exit"]["errors"] == 0
    assert report["early_exit"]["mismatches"] == 0 and report["dataset"] == "cifar10"
    assert report["rss_mb_before"] > 10
    assert json.loads((tmp_path / "out" / "bench_http.json").read_text()) == report
    assert (tmp_path / "out" / "bench_http_latency.png").stat().st_size > 1000

    # --compare-full without the admin token: one line, exit code 1, thresholds untouched.
    assert bench_main(["--http", server.url, *common, "--compare-full"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert any("admin token" in line for line in err)
    monkeypatch.setenv("EARLYEXIT_ADMIN_TOKEN", TOKEN)
    assert bench_main(["--http", server.url, *common, "--compare-full", "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert "full_depth" in out and "speedups" in out
    # --local-bundle: the served thresholds timed in-process on the same images.
    argv = ["--http", server.url, *common, "--compare-full", "--json", "--local-bundle",
            str(bundle), "--threads", "1"]  # fmt: skip
    assert bench_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    ref, comparison = report["in_process"], report["comparison"]
    assert ref["latency_ms_p50_batch1"] > 0 and ref["speedup"] > 0
    assert ref["batch_size"] == max(1, round(report["early_exit"]["server_batch_size_mean"]))
    assert "serving_overhead_ms" not in ref  # only meaningful at concurrency 1
    single = ["--http", server.url, *common[:4], "--concurrency", "1", "--duration", "0.5",
              "--json", "--local-bundle", str(bundle), "--threads", "1"]  # fmt: skip
    assert bench_main(single) == 0
    ref1 = json.loads(capsys.readouterr().out)
    assert ref1["in_process"]["serving_overhead_ms"] == pytest.approx(
        ref1["early_exit"]["latency_ms"]["p50"] - ref1["in_process"]["latency_ms_p50_batch1"],
        abs=1e-3,
    )
    assert comparison["throughput_vs_in_process"] == pytest.approx(
        comparison["throughput_speedup"] / ref["speedup"], rel=1e-2
    )
    bad = ["--http", server.url, *common, "--local-bundle", str(tmp_path / "nope")]
    assert bench_main(bad) == 2
    assert "--local-bundle" in capsys.readouterr().err
    # Nothing listens on the discard port.
    assert bench_main(["--http", "http://127.0.0.1:9", *common]) == 1
    assert "cannot reach" in capsys.readouterr().err
    assert bench_main(["--http", server.url, *common[:2], "--data-dir", str(tmp_path)]) == 2
