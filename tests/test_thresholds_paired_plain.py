"""The confidence bound paired with the plain model: its answers on the very rows tuned on (the
manifest's baseline graph run by `earlyexit-tune`), counted against the early exits' row by row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import thresholds.calibrate
from core.decision import decide
from core.stats import mcnemar, mcnemar_counts
from tests.data_fixtures import write_tiny_cifar10
from tests.plain_fixtures import with_baseline
from tests.test_thresholds_baseline import LABELS, PROBS
from tests.test_thresholds_cli import FAST
from thresholds.baselines import grid_discordant, grid_tables
from thresholds.cli import main
from thresholds.costs import CostModel
from thresholds.errors import TuningError
from thresholds.evaluate import build_exit_table, evaluate, evaluate_population
from thresholds.synthetic import synthetic_calibration
from thresholds.tuning import TuneOptions, paired_mcnemar, tune

# The final exit is right on rows 0 and 1 of these three; the plain model on rows 1 and 2.
PLAIN_RIGHT = np.array([False, True, True])
COSTS = CostModel((2.0, 3.0), 4.0, "macs")


def test_discordant_rows_and_the_bound_are_counted_against_the_plain_model_by_hand():
    own = build_exit_table(PROBS, LABELS, "last")
    paired = build_exit_table(PROBS, LABELS, "last", PLAIN_RIGHT)
    assert own.baseline_accuracy == pytest.approx(200 / 3)  # the final exit: rows 0, 1
    assert paired.baseline_accuracy == pytest.approx(200 / 3)  # the plain model: rows 1, 2
    # Every row stops at exit 1 (max prob 0.7 > 0.65): answers 0, 0, 2, right on row 0 only.
    early = (0.65, 0.0)
    assert evaluate(own, early, COSTS).discordant_rows == 1  # row 1
    assert evaluate(paired, early, COSTS).discordant_rows == 3  # every row
    # d = (1, -1, -1): mean -1/3, mean |d| = 1, SE = 100 * sqrt((1 - 1/9) / 3).
    objective = TuneOptions(max_drop=50.0, confidence=1.0).objective(paired)
    assert objective.paired and objective.baseline == pytest.approx(200 / 3)
    metrics = evaluate(paired, early, COSTS)
    bound = objective.bound(metrics.accuracy, metrics.discordant_rows)
    assert float(bound.difference) == pytest.approx(-100 / 3)
    assert float(bound.se) == pytest.approx(100 * math.sqrt((1 - 1 / 9) / 3))
    # McNemar from the evaluator's counts: the plain model alone right on rows 1 and 2, the
    # thresholds alone on row 0; n = 3 discordant rows, P(X <= 1) = 1/2, two-sided p = 1.
    test = paired_mcnemar(paired, metrics)
    assert (test.rows, test.only_a, test.only_b, test.p_value) == (3, 2, 1, 1.0)
    assert test == mcnemar(PLAIN_RIGHT, np.array([True, False, False]))


def test_mcnemar_from_counts_matches_the_vectors_and_refuses_impossible_counts():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(size=500) < 0.8, rng.uniform(size=500) < 0.75
    direct = mcnemar(a, b)
    assert mcnemar_counts(500, direct.only_a, direct.only_b) == direct
    assert mcnemar_counts(10, 0, 0).p_value == 1.0
    assert mcnemar_counts(12, 0, 6).p_value == pytest.approx(2 / 64)  # 2 · (1/2)^6
    for counts in [(0, 0, 0), (5, 4, 2), (5, -1, 1)]:
        with pytest.raises(ValueError, match="impossible McNemar counts"):
            mcnemar_counts(*counts)


def test_grid_counts_the_same_discordant_rows_as_the_evaluator():
    probs, labels = synthetic_calibration(rows=400, exits=3, classes=10, seed=3)
    reference = np.random.default_rng(0).uniform(size=400) < 0.8
    table = build_exit_table(probs, labels, "ensemble", reference)
    costs = CostModel((3.0, 2.0, 2.0), 6.0, "macs")
    steps = 5
    grid, _, _ = grid_tables(table, costs, steps)
    points = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), axis=-1).reshape(-1, 3)
    expected = evaluate_population(table, points, costs).discordant_counts
    assert np.array_equal(grid_discordant(table, steps).ravel(), expected)


def test_both_splits_are_paired_with_their_own_plain_answers():
    probs, labels = synthetic_calibration(rows=600, exits=3, classes=10, seed=4)
    rng = np.random.default_rng(1)
    right = [rng.uniform(size=300) < p for p in (0.9, 0.7)]
    table = build_exit_table(probs[:300], labels[:300], "last", right[0])
    test_table = build_exit_table(probs[300:], labels[300:], "last", right[1])
    options = TuneOptions(max_drop=30.0, confidence=1.0, compare=False)
    outcome = tune(table, CostModel((3.0, 2.0, 2.0), 6.0, "macs"), options, test_table)
    for report, plain in ((outcome.tune, right[0]), (outcome.test, right[1])):
        assert report is not None and report.paired_with == "reference"
        assert report.baseline_accuracy == pytest.approx(100 * plain.mean())
    assert outcome.tune.feasible


@pytest.mark.parametrize("reference", [np.ones(2, dtype=bool), np.ones(3, dtype=np.int64)])
def test_reference_of_the_wrong_shape_or_type_is_refused(reference):
    with pytest.raises(TuningError, match="reference correctness must be 3 booleans"):
        build_exit_table(PROBS, LABELS, "last", reference)


def _plain_right(bundle: Path, data_dir: Path, split: str) -> np.ndarray:
    from core.datasets import load_split
    from serving.plain_runtime import PlainModelRuntime

    data = load_split("cifar10", data_dir, split)
    runtime = PlainModelRuntime(bundle, intra_op_threads=1)
    return runtime.run(runtime.preprocess(data.images)).argmax(axis=1) == data.labels


def test_tune_runs_the_plain_graph_on_the_tuned_rows_and_pairs_the_bound(
    tiny_bundle, plain_graph, tmp_path, capsys, monkeypatch
):
    bundle = with_baseline(tiny_bundle, plain_graph, tmp_path / "bundle")
    data_dir = tmp_path / "data"
    write_tiny_cifar10(data_dir, per_batch=1010)  # 5 050 train rows: a 5 000-row val split
    argv = ["--bundle", str(bundle), "--dataset", "cifar10", "--data-dir", str(data_dir),
            "--limit", "3000", "--max-drop", "40", "--confidence", "1", "--threads", "1",
            "--no-baselines", "--json", "-q"] + FAST  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    val, test = _plain_right(bundle, data_dir, "val"), _plain_right(bundle, data_dir, "test")
    block = result["baseline"]
    assert block["source"] == "manifest" and block["paired"] is True
    assert block["accuracy"] == {"val": 10.0, "test": 10.0}  # what the manifest records
    assert block["measured"]["val"] == pytest.approx(100 * val.mean())
    assert block["measured"]["test"] == pytest.approx(100 * test.mean())
    # The tuning rows are the first 3 000 of val: the plain model's accuracy on exactly those.
    assert result["baseline_accuracy"] == pytest.approx(100 * val[:3000].mean())
    assert result["test"]["baseline_accuracy"] == pytest.approx(100 * test.mean())
    # The SE is the paired one, from the tuned thresholds' answers on the cached calibration.
    cached = sorted((bundle / "calibration_cache").glob("calibration-cifar10-val-*.npz"))
    assert len(cached) == 1 and len(list((bundle / "calibration_cache").glob("plain-*.npz"))) == 2
    cal = thresholds.calibrate.read_calibration_file(cached[0])
    answers, _ = decide(cal.exit_probs[:3000], result["thresholds"], "ensemble")
    d = (answers.argmax(axis=1) == cal.labels[:3000]).astype(float) - val[:3000]
    se = 100 * math.sqrt((np.mean(np.abs(d)) - np.mean(d) ** 2) / 3000)
    assert result["margin"]["paired_with"] == "reference"
    assert result["margin"]["se"] == pytest.approx(se)
    assert result["margin"]["lower_bound"] == pytest.approx(100 * np.mean(d) - se)
    # The exact McNemar of the same rows, against the plain model's answers.
    direct = mcnemar(val[:3000], answers.argmax(axis=1) == cal.labels[:3000])
    assert result["mcnemar"] == {
        "rows": 3000,
        "only_baseline": direct.only_a,
        "only_early_exit": direct.only_b,
        "difference_points": pytest.approx(direct.difference_points),
        "p_value": pytest.approx(direct.p_value),
    }
    assert result["test"]["mcnemar"]["rows"] == test.size

    # A second run reads both caches: nothing is run again.
    def no_collecting(*_args, **_kwargs):
        raise AssertionError("calibration was collected again")

    monkeypatch.setattr(thresholds.calibrate, "collect_calibration", no_collecting)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["baseline_accuracy"] == result["baseline_accuracy"]
