"""earlyexit-bench on the tiny bundle with a tiny CIFAR-layout dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.bench import segment_costs, threshold_sweep
from benchmarks.cli import MIN_ROWS_TO_QUOTE, main
from core.costs import row_macs
from core.decision import decide
from core.timing import time_variants
from tests.data_fixtures import write_tiny_cifar10


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return write_tiny_cifar10(tmp_path_factory.mktemp("cifar"), per_batch=48)


def test_bench_writes_json_and_plots(tiny_bundle, cifar_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(
        [
            "--bundle",
            str(tiny_bundle),
            "--dataset",
            "cifar10",
            "--data-dir",
            str(cifar_dir),
            "--batch-sizes",
            "1,8",
            "--repeats",
            "1",
            "--timing-rows",
            "16",
            "--last-exit-rows",
            "4",
            "--threads",
            "1",
            "--out",
            str(out),
            "--json",
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    dynamic = report["dynamic"]
    assert report["data"] == {"dataset": "cifar10", "split": "test", "rows": 48}
    assert len(report["exit_accuracy"]) == 3
    # The runtime's answers are exactly those the calibration arrays give for the same rows.
    assert dynamic["calibration_agreement"] == 1.0
    assert dynamic["accuracy"] == dynamic["calibration_accuracy"]
    assert sum(dynamic["exit_fractions"]) == pytest.approx(1.0)
    assert dynamic["rows_per_segment"][0] == 48
    assert set(report["timing"]) == {"1", "8"}
    for timing in report["timing"].values():
        assert set(timing["seconds"]) == {
            "dynamic",
            "chain_all_disabled",
            "chain_last_exit",
            "full_model",
        }
        assert timing["efficiency"] == pytest.approx(
            timing["speedup_vs_full_model"] / timing["mac_speedup"]
        )
        segments = timing["segments"]
        assert [seg["segment"] for seg in segments] == [1, 2, 3]
        assert segments[0]["rows"] == 16  # every timing row enters segment 1
        assert [seg["rows"] for seg in segments] == sorted(
            (seg["rows"] for seg in segments), reverse=True
        )
        for seg in segments:
            if seg["rows"]:
                assert seg["ms_per_row"] > 0
                assert seg["time_per_mac_vs_full_model"] == pytest.approx(
                    seg["time_share"] / seg["mac_share"]
                )
    assert report["last_exit_latency"]["rows"] >= 1
    assert report["plain_fallback_latency"] is None  # fallback "ensemble": one path past K-1
    by_exit = report["latency_by_exit"]
    # every timing row is answered by exactly one exit (or the fallback)
    assert sum(e["rows"] for e in by_exit["exits"]) == 16
    for entry in by_exit["exits"]:
        assert entry["vs_full_model"] == pytest.approx(entry["ms"] / by_exit["full_model_ms"])
    # a row answered at exit e (or the fallback, after all K) entered segments 1..e
    reached = [
        sum(e["rows"] for e in by_exit["exits"] if e["exit"] == "fallback" or e["exit"] > j)
        for j in range(3)
    ]
    assert reached == [seg["rows"] for seg in report["timing"]["1"]["segments"]]
    saved = json.loads((out / "bench.json").read_text())
    assert saved["dynamic"] == dynamic
    # files named relative to the report's folder: no machine path in the artifact
    assert saved["files"] == ["bench.json", "exit_histogram.png", "accuracy_vs_speedup.png"]
    for name in ("exit_histogram.png", "accuracy_vs_speedup.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_efficiency_counts_the_stage_files_the_runtime_ran(
    tiny_bundle, cifar_dir, tmp_path, capsys
):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    # exit 1 disabled and exit K accepting every row: nothing can fall back, so exit 1's head
    # is skipped and its stage file runs
    (bundle / "thresholds.json").write_text(json.dumps({"thresholds": [1.0, 0.5, 0.0]}))
    argv = ["--bundle", str(bundle), "--dataset", "cifar10", "--data-dir", str(cifar_dir)]
    argv += ["--batch-sizes", "1", "--repeats", "1", "--timing-rows", "48", "--threads", "1"]
    assert main(argv + ["--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    dynamic, timing = report["dynamic"], report["timing"]["1"]
    assert dynamic["stage_files_used"] == [True, False, False]
    assert dynamic["mac_speedup_executed"] > dynamic["acceleration"]
    assert timing["mac_speedup"] == pytest.approx(dynamic["mac_speedup_executed"])
    assert timing["efficiency"] == pytest.approx(
        timing["speedup_vs_full_model"] / dynamic["mac_speedup_executed"]
    )


def test_segment_costs_divide_each_segments_time_by_the_rows_that_entered_it():
    from types import SimpleNamespace

    class Runtime:
        manifest = SimpleNamespace(num_exits=3, num_classes=2, full_model=SimpleNamespace(macs=100))
        calls = 0

        def classify(self, _batch):
            self.calls += 1
            # 4 rows in, 2 left after exit 1, none reach segment 3
            return SimpleNamespace(
                probs=np.zeros((4, 2)),
                exits=np.zeros(4, dtype=np.int64),
                segment_seconds=[0.004, 0.002, 0.0],
                rows_per_segment=[4, 2, 0],
            )

    runtime = Runtime()
    x = np.zeros((8, 1))  # two batches of 4
    out = segment_costs(runtime, x, 4, [40, 30, 30], full_model_seconds_per_row=0.002)
    assert runtime.calls == 4  # two passes over two batches; only the last pass is kept
    first, second, third = out
    assert first["rows"] == 8 and second["rows"] == 4 and third["rows"] == 0
    # segment 1: 0.008 s / 8 rows = 1 ms a row = half the single graph's 2 ms, for 40 % of its MACs
    assert first["ms_per_row"] == pytest.approx(1.0)
    assert first["time_share"] == pytest.approx(0.5)
    assert first["mac_share"] == pytest.approx(0.4)
    assert first["time_per_mac_vs_full_model"] == pytest.approx(1.25)
    assert second["time_per_mac_vs_full_model"] == pytest.approx(0.5 / 0.3)
    assert third["ms_per_row"] is None and third["time_per_mac_vs_full_model"] is None
    assert third["mac_share"] == pytest.approx(0.3)


def test_missing_bundle_exits_2(cifar_dir, tmp_path, capsys):
    code = main(
        ["--bundle", str(tmp_path / "nope"), "--dataset", "cifar10", "--data-dir", str(cifar_dir)]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bundle directory not found" in err[0]


def test_missing_data_exits_2(tiny_bundle, tmp_path, capsys):
    code = main(["--bundle", str(tiny_bundle), "--dataset", "cifar10", "--data-dir", str(tmp_path)])
    assert code == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err


def test_bad_batch_sizes_are_usage_errors(tiny_bundle, cifar_dir):
    with pytest.raises(SystemExit) as info:
        main(
            [
                "--bundle",
                str(tiny_bundle),
                "--dataset",
                "cifar10",
                "--data-dir",
                str(cifar_dir),
                "--batch-sizes",
                "0,x",
            ]
        )
    assert info.value.code == 2


def test_sweep_endpoints_are_exit_one_and_full_depth():
    rng = np.random.default_rng(0)
    exit_probs = rng.dirichlet(np.ones(4), size=(30, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 30)
    macs = [10, 20, 30]
    sweep = threshold_sweep(exit_probs, labels, "ensemble", macs, 50, points=5)
    assert [row["threshold"] for row in sweep][:4] == [0.0, 0.25, 0.5, 0.75]
    assert [row["threshold"] for row in sweep][-3:] == [0.995, 0.999, 1.0]
    assert sweep[0]["acceleration"] == pytest.approx(50 / 10)  # every row leaves at exit 1
    assert sweep[-1]["acceleration"] == pytest.approx(50 / 60)  # every row runs all segments
    answers, _ = decide(exit_probs, [1.0, 1.0, 1.0], "ensemble")
    assert sweep[-1]["accuracy"] == pytest.approx(100 * np.mean(answers.argmax(1) == labels))


def test_row_macs_counts_fallback_rows_as_full_chain():
    assert row_macs(np.array([1, 2, 3, 0]), [10, 20, 30]).tolist() == [10, 30, 60, 60]


def test_time_variants_reports_every_variant():
    calls = {"a": 0, "b": 0}

    def count(name):
        def fn(batch):
            calls[name] += len(batch)

        return fn

    batches = [np.zeros(2), np.zeros(3)]
    seconds = time_variants({"a": count("a"), "b": count("b")}, batches, repeats=3)
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
    assert calls == {"a": 2 + 3 * 5, "b": 2 + 3 * 5}  # warm-up on batch 0, then 3 repeats


def test_time_variants_runs_each_variant_in_blocks_in_rotated_order():
    order = []
    variants = {name: (lambda b, name=name: order.append((name, len(b)))) for name in "abc"}
    batches = [np.zeros(1), np.zeros(2)]
    time_variants(variants, batches, repeats=3)
    timed = order[3:]  # after one warm-up call each
    blocks = [timed[i : i + 2] for i in range(0, len(timed), 2)]
    # every variant runs all batches back to back (its own warm loop) ...
    assert all(block == [(block[0][0], 1), (block[0][0], 2)] for block in blocks)
    # ... and who goes first rotates from repeat to repeat
    assert [block[0][0] for block in blocks] == list("abc" + "bca" + "cab")


def test_summary_gives_row_counts_and_flags_ratios_from_too_few_rows(
    tiny_bundle, cifar_dir, tmp_path, capsys
):
    out = tmp_path / "report"
    argv = ["--bundle", str(tiny_bundle), "--dataset", "cifar10", "--data-dir", str(cifar_dir)]
    argv += ["--batch-sizes", "1", "--repeats", "1", "--timing-rows", "48"]
    argv += ["--last-exit-rows", "4", "--threads", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    report = json.loads((out / "bench.json").read_text())

    def shown(line: str, figures: list[tuple[str, int]]) -> None:
        for figure, rows in figures:
            flag = "; too few" if rows < MIN_ROWS_TO_QUOTE else ""
            assert f"{figure} ({rows} rows{flag})" in line, line

    (by_exit,) = [line for line in lines if line.startswith("batch-1 latency by exit")]
    shown(
        by_exit,
        [
            (f"{e['exit']}: {e['vs_full_model']:.2f}x", e["rows"])
            for e in report["latency_by_exit"]["exits"]
        ],
    )
    (per_mac,) = [line for line in lines if "time per MAC" in line]
    segments = report["timing"]["1"]["segments"]
    shown(
        per_mac,
        [
            (
                "-"
                if s["time_per_mac_vs_full_model"] is None
                else f"{s['time_per_mac_vs_full_model']:.2f}",
                s["rows"],
            )
            for s in segments
        ],
    )
    assert segments[0]["rows"] == 48 and "(48 rows)" in per_mac  # enough rows: quoted bare
    (deep,) = [line for line in lines if line.startswith("deep rows")]
    last = report["last_exit_latency"]
    assert last["rows"] <= 4
    shown(deep, [(f"{last['ratio']:.2f}x", last["rows"])])
    # Whoever reads a flagged figure is told what it means and how to get a real one.
    assert lines[-1].startswith(f"too few: under {MIN_ROWS_TO_QUOTE} rows"), lines[-1]
    assert "--timing-rows" in lines[-1]
