"""Tuning against a real exported bundle (tests/conftest.py `tiny_bundle`) and the real runtime:
calibration collected and cached, latency profiled, the evaluator agreeing with the runtime row
for row, and thresholds pushed to a running server."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

import thresholds.calibrate
from core.bundle import read_thresholds
from core.calibration import collect_calibration, save_calibration
from core.decision import skipped_heads
from serving.runtime import EarlyExitRuntime
from tests.data_fixtures import write_tiny_cifar10
from tests.serving_helpers import server_process
from thresholds.calibrate import cache_path
from thresholds.cli import main
from thresholds.costs import macs_cost_model
from thresholds.evaluate import build_exit_table, evaluate
from thresholds.synthetic import synthetic_calibration

FAST = ["--generations", "20", "--population", "40", "--grid-steps", "9", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_calibration(tiny_bundle, tiny_images):
    runtime = EarlyExitRuntime(tiny_bundle, intra_op_threads=1)
    exit_probs, labels = collect_calibration(
        runtime, tiny_images.images, tiny_images.labels, batch_size=16, progress=False
    )
    return runtime, exit_probs, labels


def _run_json(capsys, argv):
    code = main(argv + ["--json", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_evaluator_agrees_with_runtime(tiny_calibration, tiny_images):
    runtime, exit_probs, labels = tiny_calibration
    manifest = runtime.manifest
    table = build_exit_table(exit_probs, labels, manifest.fallback)
    costs = macs_cost_model(manifest)
    assert costs.stage_costs is not None  # the tiny bundle has stage files
    batch = runtime.preprocess(tiny_images.images)
    max_probs = exit_probs.max(axis=2)
    candidates = [
        list(runtime.thresholds),
        [1.0, 1.0, 0.0],  # stages run, exit 3 answers all
        [1.0, 1.0, 1.0],  # everything falls back to the ensemble
        [float(np.median(max_probs[:, 0])), 1.0, 0.0],
        [0.0, 0.0, 0.0],
    ]
    for values in candidates:
        result = runtime.classify(batch, thresholds=values)
        metrics = evaluate(table, np.array(values), costs)
        counts = [int((result.exits == k).sum()) for k in (1, 2, 3, 0)]
        assert list(metrics.exit_fractions) == [c / len(labels) for c in counts]
        right = 100.0 * float((result.labels == labels).sum()) / len(labels)
        assert metrics.accuracy == pytest.approx(right)
        skips = runtime.stage_skips(values)
        assert (
            skipped_heads(np.array([values]), manifest.fallback, manifest.num_classes)[0].tolist()
            == skips
        )
        ran = sum(
            rows * (spec.stage_macs if skip else spec.macs)
            for rows, spec, skip in zip(
                result.rows_per_segment, manifest.segments, skips, strict=True
            )
        )
        assert metrics.mean_cost == pytest.approx(ran / len(labels))


def test_tune_from_dataset_collects_and_caches(bundle_copy, tmp_path, capsys, monkeypatch):
    data_dir = tmp_path / "data"
    write_tiny_cifar10(data_dir, per_batch=100)  # test split: 100 rows
    base = ["--bundle", str(bundle_copy), "--dataset", "cifar10", "--data-dir", str(data_dir),
            "--max-drop", "0", "--batch-size", "32"] + FAST  # fmt: skip
    result = _run_json(capsys, base + ["--split", "test"])
    assert result["rows"] == 100 and result["split"] == "test"
    assert result["test"] is None  # tuned on the test split: nothing held out to report
    assert result["accuracy"] >= result["baseline_accuracy"]
    cache_dir = bundle_copy / "calibration_cache"
    assert len(list(cache_dir.glob("*.npz"))) == 1
    stored = read_thresholds(bundle_copy, 3)
    assert list(stored.values) == result["thresholds"]
    assert stored.tuned["data"]["dataset"] == "cifar10"
    runtime = EarlyExitRuntime(bundle_copy, intra_op_threads=1)
    assert list(runtime.thresholds) == result["thresholds"]

    # The validation split (5000 rows) would take long to run here: place its cache entry, as
    # an earlier run would have, and check that tuning on val reports on the cached test split
    # without running the network again.
    probs, labels = synthetic_calibration(rows=500, exits=3, classes=10, seed=0)
    val_path = cache_path(cache_dir, runtime.manifest, "cifar10", "val", data_dir)
    save_calibration(val_path, probs, labels, {"split": "val", "dataset": "cifar10"})

    def no_collecting(*_args, **_kwargs):
        raise AssertionError("calibration should come from the cache")

    monkeypatch.setattr(thresholds.calibrate, "collect_calibration", no_collecting)
    again = _run_json(capsys, base + ["--split", "val", "--dry-run"])
    assert again["rows"] == 500 and again["test"]["rows"] == 100
    assert again["test"]["split"] == "test"


def test_latency_costs_profiled_once(bundle_copy, tiny_calibration, tmp_path, capsys):
    _, exit_probs, labels = tiny_calibration
    calibration = save_calibration(tmp_path / "cal.npz", exit_probs, labels, {"split": "val"})
    argv = ["--bundle", str(bundle_copy), "--calibration", str(calibration), "--cost", "latency",
            "--batch-size", "8", "--latency-repeats", "3"] + FAST  # fmt: skip
    dry = _run_json(capsys, argv + ["--dry-run"])
    assert dry["cost"]["unit"] == "seconds"
    assert not (bundle_copy / "latency_profile.json").exists()
    result = _run_json(capsys, argv)
    profile = json.loads((bundle_copy / "latency_profile.json").read_text())
    assert profile["batch_size"] == 8 and len(profile["segment_seconds"]) == 3
    assert profile["stage_seconds"] is not None
    assert result["cost"]["segments"] == pytest.approx(profile["segment_seconds"])
    assert result["acceleration"] > 0
    _run_json(capsys, argv)
    reused = json.loads((bundle_copy / "latency_profile.json").read_text())
    assert reused["measured_at"] == profile["measured_at"]
    assert reused["segment_seconds"] == profile["segment_seconds"]


def test_notify_real_server(bundle_copy, tiny_calibration, tmp_path, capsys, monkeypatch):
    _, exit_probs, labels = tiny_calibration
    calibration = save_calibration(tmp_path / "cal.npz", exit_probs, labels, {"split": "val"})
    token = "tuning-test-token"
    with server_process(bundle_copy, env={"EARLYEXIT_ADMIN_TOKEN": token}) as server:
        monkeypatch.setenv("EARLYEXIT_ADMIN_TOKEN", token)
        argv = ["--bundle", str(bundle_copy), "--calibration", str(calibration),
                "--notify", server.url] + FAST  # fmt: skip
        dry = _run_json(capsys, argv + ["--dry-run"])
        assert dry["notified"] is None  # a dry run pushes nothing either
        result = _run_json(capsys, argv)
        assert result["notified"] == server.url + "/v1/thresholds"
        model = httpx.get(server.url + "/v1/model", timeout=10).json()
        assert model["thresholds"] == pytest.approx(result["thresholds"])
        assert model["tuned"]["method"] == "ga"
