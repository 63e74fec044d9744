"""`earlyexit-bench --http URL --compare-url URL2`: an early-exit server and a `--full-model`
server of the same bundle (real uvicorn processes on 127.0.0.1), alternating short passes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.cli import main as bench_main
from benchmarks.http_compare import run_http_comparison
from benchmarks.loadtest import LoadTestError
from tests.data_fixtures import write_tiny_cifar10
from tests.plain_fixtures import with_baseline
from tests.serving_helpers import server_process

# Short passes: the tests check what is reported, not how fast the machine is.
PASS_S = 0.5


@pytest.fixture(scope="module")
def bundle(tiny_bundle, plain_graph, tmp_path_factory):
    return with_baseline(tiny_bundle, plain_graph, tmp_path_factory.mktemp("compare") / "bundle")


@pytest.fixture(scope="module")
def servers(bundle, tmp_path_factory):
    early_logs, plain_logs = tmp_path_factory.mktemp("early"), tmp_path_factory.mktemp("plain")
    with (
        server_process(bundle, log_dir=early_logs) as early,
        server_process(bundle, args=["--full-model"], log_dir=plain_logs) as plain,
    ):
        yield early, plain


def _in_process_answers(bundle, images):
    """(early-exit classes and exits, plain classes) computed in-process on the same images."""
    from serving.plain_runtime import PlainModelRuntime
    from serving.runtime import EarlyExitRuntime

    early = EarlyExitRuntime(bundle, intra_op_threads=1)
    plain = PlainModelRuntime(bundle, intra_op_threads=1)
    result = early.classify(early.preprocess(images))
    return result.labels, result.exits, plain.run(plain.preprocess(images)).argmax(axis=1)


def test_two_servers_alternate_and_agreement_is_measured(servers, bundle, tiny_images) -> None:
    early, plain = servers
    images, labels = tiny_images.images[:12], tiny_images.labels[:12]
    report = run_http_comparison(
        early.url, plain.url, images, labels, concurrency=2, duration_s=PASS_S, pairs=2,
        server_pid=early.pid, timeout_s=300,
    )  # fmt: skip
    passes = report["passes"]
    # A, B, A, B: the passes alternate between the two servers.
    assert [p["pass"] for p in passes["early_exit"]] == [1, 3]
    assert [p["pass"] for p in passes["plain"]] == [2, 4]
    for name, runs in passes.items():
        for p in runs:
            assert p["answered"] >= 1 and p["errors"] == 0 and p["mismatches"] == 0, (name, p)
            assert p["throughput_rps"] > 0 and p["latency_ms"]["p50"] > 0
            assert p["server_batch_size_mean"] >= 1.0
    for p in passes["plain"]:
        assert p["exit_fractions"] == {"full": 1.0}
    for p in passes["early_exit"]:
        assert set(p["exit_fractions"]) <= {"1", "2", "3", "fallback"}
    pairs = report["pairs"]
    assert [p["pair"] for p in pairs] == [1, 2]
    for pair, a, b in zip(pairs, passes["early_exit"], passes["plain"], strict=True):
        assert pair["throughput_ratio"] == pytest.approx(
            a["throughput_rps"] / b["throughput_rps"], rel=1e-2
        )
    comparison = report["comparison"]
    assert comparison["throughput_ratio_median"] == pytest.approx(
        float(np.median([p["throughput_ratio"] for p in pairs])), abs=1e-3
    )
    # Agreement: the same as the two graphs in-process on the same images.
    classes, exits, plain_classes = _in_process_answers(bundle, images)
    agreement = report["agreement"]
    assert agreement["rows"] == 12
    assert agreement["agreement"] == pytest.approx(np.mean(classes == plain_classes), abs=1e-4)
    assert agreement["disagreements"] == int(np.sum(classes != plain_classes))
    by_exit = agreement["by_exit"]
    assert sum(e["rows"] for e in by_exit.values()) == 12
    for key, entry in by_exit.items():
        rows = exits == (0 if key == "fallback" else int(key))
        assert entry["rows"] == int(rows.sum())
        assert entry["agreement"] == pytest.approx(
            np.mean(classes[rows] == plain_classes[rows]), abs=1e-4
        )
    assert agreement["plain_accuracy"] == pytest.approx(100 * np.mean(plain_classes == labels))
    assert comparison["accuracy_delta"] == pytest.approx(
        agreement["early_exit_accuracy"] - agreement["plain_accuracy"], abs=1e-3
    )
    assert report["plain_graph"]["file"] == "baseline.onnx"
    assert report["rss_mb_before"] > 10


def test_a_wrong_pair_is_refused(servers, tiny_images) -> None:
    early, plain = servers
    images, labels = tiny_images.images[:2], tiny_images.labels[:2]
    with pytest.raises(LoadTestError, match="give the early-exit server as --http"):
        run_http_comparison(plain.url, early.url, images, labels, 1, PASS_S, 1, timeout_s=300)
    with pytest.raises(LoadTestError, match="does not serve the plain model"):
        run_http_comparison(early.url, early.url, images, labels, 1, PASS_S, 1, timeout_s=300)


def test_earlyexit_bench_compare_url(servers, bundle, tmp_path, capsys) -> None:
    early, plain = servers
    data_dir = write_tiny_cifar10(tmp_path / "data", per_batch=10)
    common = ["--dataset", "cifar10", "--data-dir", str(data_dir), "--concurrency", "2",
              "--duration", str(PASS_S)]  # fmt: skip
    argv = ["--http", early.url, "--compare-url", plain.url, "--pairs", "1", *common,
            "--local-bundle", str(bundle), "--threads", "1", "--json",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert bench_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 10 and report["dataset"] == "cifar10"
    assert len(report["pairs"]) == 1
    ref, comparison = report["in_process"], report["comparison"]
    assert ref["batch_size"] == max(1, round(comparison["early_exit_batch_size_mean"]))
    assert ref["speedup"] == pytest.approx(
        ref["seconds"]["plain"] / ref["seconds"]["early_exit"], rel=1e-3
    )
    assert comparison["throughput_vs_in_process"] == pytest.approx(
        comparison["throughput_ratio_median"] / comparison["in_process_speedup"], rel=1e-2
    )
    saved = json.loads((tmp_path / "out" / "bench_http_vs_plain.json").read_text())
    assert saved == report
    # The human summary names both servers and the median ratio.
    assert bench_main(["--http", early.url, "--compare-url", plain.url, "--pairs", "1",
                       *common]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "median throughput ratio" in out and plain.url in out and "agreement" in out

    # The servers swapped: one line, exit code 2, nothing measured.
    assert bench_main(["--http", plain.url, "--compare-url", early.url, *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--full-model" in err[0]
    # Two ways to compare at once, or the same server twice: usage errors.
    both = ["--http", early.url, "--compare-url", plain.url, "--compare-full", *common]
    assert bench_main(both) == 2
    assert "pick one" in capsys.readouterr().err
    assert bench_main(["--http", early.url, "--compare-url", early.url + "/", *common]) == 2
    assert "another server" in capsys.readouterr().err
    # --compare-full against the plain server says why it cannot work.
    argv = ["--http", plain.url, "--compare-full", "--admin-token", "x", *common]
    assert bench_main(argv) == 1
    assert "--compare-url" in capsys.readouterr().err


def test_sighup_on_the_plain_server_is_ignored_with_one_line(servers) -> None:
    import signal
    import time

    import httpx

    _, plain = servers
    plain.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while "SIGHUP ignored" not in plain.logs():
        assert time.monotonic() < deadline, plain.logs()[-2000:]
        time.sleep(0.05)
    assert plain.logs().count("SIGHUP ignored") == 1
    assert httpx.get(f"{plain.url}/readyz", timeout=60).status_code == 200
