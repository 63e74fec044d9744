"""The max-drop floor with a statistical margin (`--confidence Z`): the paired lower bound by
hand, Z = 0 unchanged, the bound met by every search on the tuning rows, and bad Z rejected."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from core.bundle import read_thresholds
from tests.test_thresholds_cli import FAST, tune_inputs
from thresholds.baselines import grid_discordant, grid_tables
from thresholds.cli import main
from thresholds.costs import CostModel
from thresholds.errors import TuningError
from thresholds.evaluate import build_exit_table, evaluate, evaluate_population
from thresholds.objectives import Objective, accuracy_bound
from thresholds.search import GAConfig
from thresholds.synthetic import synthetic_calibration
from thresholds.tuning import TuneOptions, tune

COSTS_4 = CostModel((1.0e8, 1.2e8, 1.5e8, 2.0e8), 5.0e8, "macs")
FAST_GA = GAConfig(seed=3, population=40, generations=25, progress=False)
FAST_COMPARE = {"ga": FAST_GA, "grid_steps": 9, "global_steps": 201}

# Ten rows: the final exit (exit 2) is right on 5, exit 1 on 6; they disagree on rows 0, 1, 4.
FINAL_RIGHT = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0, 0], dtype=bool)
EXIT1_RIGHT = np.array([1, 0, 1, 1, 1, 0, 1, 1, 0, 0], dtype=bool)


def _two_exit_table(exit1_right: np.ndarray, final_right: np.ndarray):
    """Label 0 everywhere; an exit is right with [0.75, 0.25] and wrong with [0.25, 0.75]."""
    right, wrong = [0.75, 0.25], [0.25, 0.75]
    pairs = zip(exit1_right, final_right, strict=True)
    probs = np.array([[right if a else wrong, right if b else wrong] for a, b in pairs], np.float32)
    return build_exit_table(probs, np.zeros(len(probs), np.int64), "last")


def test_paired_bound_by_hand():
    table = _two_exit_table(EXIT1_RIGHT, FINAL_RIGHT)
    m = evaluate(table, [0.0, 0.0], CostModel((1.0, 1.0), 2.0, "macs"))  # exit 1 answers all
    assert (m.accuracy, table.final_accuracy, m.discordant_rows) == (60.0, 50.0, 3)
    # d = (+1, -1, 0, 0, +1, 0, …): mean 0.1, mean |d| 0.3, var 0.3 - 0.01 = 0.29
    se = 100 * math.sqrt(0.29 / 10)
    objective = Objective(baseline=50.0, max_drop=5.0, confidence=1.0, rows=10, paired=True)
    bound = objective.bound(m.accuracy, m.discordant_rows)
    assert float(bound.difference) == pytest.approx(10.0)
    assert float(bound.se) == pytest.approx(se) == pytest.approx(17.029386)
    assert float(bound.lower_bound) == pytest.approx(10.0 - se) == pytest.approx(-7.029386)
    # -7.03 is below -5: infeasible, scored by its shortfall; with EPS = 8 it is feasible
    assert not objective.feasible(m.accuracy, m.discordant_rows)
    score = objective.score(m.accuracy, 1.5, m.discordant_rows)
    assert float(score) == pytest.approx(-(7.029386 - 5.0))
    wide = Objective(baseline=50.0, max_drop=8.0, confidence=1.0, rows=10, paired=True)
    assert float(wide.score(m.accuracy, 1.5, m.discordant_rows)) == 1.5
    # The same vector without the margin meets EPS = 0 easily (it is 10 points *above*).
    assert Objective(baseline=50.0, max_drop=0.0, rows=10).feasible(m.accuracy)


def test_binomial_bound_for_a_given_baseline():
    # A fixed baseline has no rows to pair with: SE of the accuracy alone, sqrt(p(1-p)/N).
    bound = accuracy_bound(60.0, 55.0, 10, 1.645)
    se = 100 * math.sqrt(0.6 * 0.4 / 10)
    assert float(bound.se) == pytest.approx(se)
    assert float(bound.lower_bound) == pytest.approx(5.0 - 1.645 * se)
    objective = Objective(baseline=55.0, max_drop=5.0, confidence=1.645, rows=10)
    assert not objective.paired and not objective.needs_discordant
    assert float(objective.bound(60.0).lower_bound) == float(bound.lower_bound)


def test_full_depth_has_zero_paired_se():
    table = _two_exit_table(EXIT1_RIGHT, FINAL_RIGHT)
    m = evaluate(table, [1.0, 0.0], CostModel((1.0, 1.0), 2.0, "macs"))
    objective = Objective(baseline=50.0, max_drop=0.0, confidence=3.0, rows=10, paired=True)
    bound = objective.bound(m.accuracy, m.discordant_rows)
    assert m.discordant_rows == 0 and float(bound.se) == 0.0 and float(bound.lower_bound) == 0.0
    assert objective.feasible(m.accuracy, m.discordant_rows)


def test_discordant_counts_match_rows():
    probs, labels = synthetic_calibration(rows=3000, exits=3, classes=7, seed=3)
    rng = np.random.default_rng(0)
    thresholds = rng.random((30, 3))
    for fallback in ("ensemble", "last"):
        table = build_exit_table(probs, labels, fallback)
        scored = evaluate_population(table, thresholds, CostModel((1.0, 2.0, 3.0), 5.0, "macs"))
        for p in (0, 11, 29):
            first = np.full(3000, 3)
            for j in range(2, -1, -1):
                first[table.max_probs[:, j] > thresholds[p, j]] = j
            right = table.correct[np.arange(3000), first]
            assert scored.discordant_counts[p] == int((right != table.correct[:, 2]).sum())


@pytest.mark.parametrize("fallback", ["ensemble", "last"])
def test_grid_discordant_is_exact(fallback):
    probs, labels = synthetic_calibration(rows=2000, exits=3, classes=5, seed=1)
    table = build_exit_table(probs, labels, fallback)
    costs = CostModel((1.0, 1.5, 2.5), 4.0, "macs")
    grid, _, _ = grid_tables(table, costs, 7)
    discordant = grid_discordant(table, 7)
    index = np.random.default_rng(2).integers(0, 7, size=(60, 3))
    index[:4] = [6, 6, 0]  # full depth: nothing discordant
    scored = evaluate_population(table, grid[index], costs)
    assert np.array_equal(scored.discordant_counts, discordant[tuple(index.T)])
    assert (scored.discordant_counts[:4] == 0).all()


def test_score_at_zero_confidence_is_the_plain_floor():
    rng = np.random.default_rng(5)
    accuracy = np.round(rng.uniform(78.0, 82.0, 500), 2)
    acceleration = rng.uniform(1.0, 3.0, 500)
    floor = 80.0 - 0.5
    plain = np.where(accuracy >= floor - 1e-9, acceleration, -np.maximum(floor - accuracy, 1e-12))
    objective = Objective(baseline=80.0, max_drop=0.5, confidence=0.0, rows=500, paired=True)
    assert np.array_equal(objective.score(accuracy, acceleration), plain)


def _tables(rows: int = 3000):
    probs, labels = synthetic_calibration(rows=rows, exits=4, seed=7)
    test_probs, test_labels = synthetic_calibration(rows=rows, exits=4, seed=8)
    return build_exit_table(probs, labels), build_exit_table(test_probs, test_labels)


def test_zero_confidence_keeps_the_old_thresholds():
    table, test_table = _tables()
    plain = tune(table, COSTS_4, TuneOptions(max_drop=0.5, **FAST_COMPARE), test_table)
    zero = tune(
        table, COSTS_4, TuneOptions(max_drop=0.5, confidence=0.0, **FAST_COMPARE), test_table
    )
    assert zero.thresholds == plain.thresholds
    assert zero.grid.thresholds == plain.grid.thresholds
    assert zero.global_threshold.thresholds == plain.global_threshold.thresholds
    assert zero.tune.margin()["lower_bound"] == pytest.approx(-zero.tune.margin()["drop"])


@pytest.mark.parametrize("max_drop", [0.0, 0.5])
def test_margin_is_met_on_tuning_rows_and_costs_speed(max_drop):
    table, test_table = _tables()
    plain = tune(table, COSTS_4, TuneOptions(max_drop=max_drop, **FAST_COMPARE), test_table)
    options = TuneOptions(max_drop=max_drop, confidence=1.645, **FAST_COMPARE)
    safe = tune(table, COSTS_4, options, test_table)
    objective = safe.objective
    assert objective.paired and objective.confidence == 1.645
    margin = safe.tune.margin()
    assert margin["lower_bound"] >= -max_drop - 1e-9 and safe.tune.feasible
    assert margin["lower_bound"] == pytest.approx(-margin["drop"] - 1.645 * margin["se"])
    # every search answers to the same constraint, so the GA ÷ grid ratio stays comparable
    for found in (safe.grid, safe.global_threshold):
        bound = objective.bound(found.metrics.accuracy, found.metrics.discordant_rows)
        feasible = float(bound.lower_bound) >= -max_drop - 1e-9
        # the global sweep cannot express full depth and may have no feasible point at all
        assert feasible == (found.fitness > 0) and (feasible or found.name == "global")
        if feasible:
            assert found.fitness == found.metrics.acceleration
    assert safe.tune.metrics.acceleration <= plain.tune.metrics.acceleration
    assert safe.grid.fitness <= plain.grid.fitness  # exact on the grid: a smaller feasible set
    assert safe.tune.metrics.acceleration > COSTS_4.full_depth_acceleration
    assert safe.test is not None and "lower_bound" in safe.test.margin()


def test_pareto_choice_meets_the_bound():
    table, _ = _tables(3000)
    options = TuneOptions(max_drop=0.5, confidence=1.0, pareto=True, ga=FAST_GA, compare=False)
    outcome = tune(table, COSTS_4, options)
    assert outcome.method == "nsga2"
    assert outcome.tune.margin()["lower_bound"] >= -0.5 - 1e-9


def test_given_baseline_uses_the_binomial_bound():
    table, _ = _tables(3000)
    baseline = table.final_accuracy - 1.0
    options = TuneOptions(
        max_drop=0.5, confidence=1.0, baseline=baseline, ga=FAST_GA, compare=False
    )
    outcome = tune(table, COSTS_4, options)
    assert not outcome.objective.paired
    m = outcome.tune.metrics
    expected = accuracy_bound(m.accuracy, baseline, table.num_rows, 1.0)
    assert outcome.tune.margin()["se"] == pytest.approx(float(expected.se))
    assert outcome.tune.margin()["lower_bound"] >= -0.5 - 1e-9


@pytest.mark.parametrize(
    ("confidence", "message"),
    [(-1.0, "--confidence must be"), (math.nan, "--confidence must be"), (math.inf, "finite")],
)
def test_bad_confidence_in_the_library(confidence, message):
    with pytest.raises(TuningError, match=message):
        TuneOptions(max_drop=0.5, confidence=confidence)
    with pytest.raises(TuningError, match="goes with --max-drop"):
        TuneOptions(beta=1.0, confidence=1.0)


@pytest.fixture
def cli_setup(tmp_path):
    return tune_inputs(tmp_path)


def test_cli_confidence_is_reported_and_stored(cli_setup, capsys):
    bundle, val, test = cli_setup
    argv = ["--bundle", str(bundle), "--calibration", str(val), "--test-calibration", str(test)]
    assert main(argv + FAST + ["--max-drop", "0.5", "--confidence", "1.645", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["confidence"] == 1.645 and result["paired"] is True
    assert result["margin"]["lower_bound"] >= -0.5 - 1e-9
    margin_keys = {"confidence", "paired", "paired_with", "drop", "se", "lower_bound"}
    assert set(result["test"]["margin"]) == margin_keys
    assert result["test"]["margin"]["paired_with"] == "final_exit"
    tuned = read_thresholds(bundle, 4).tuned
    assert tuned["confidence"] == 1.645 and tuned["max_drop"] == 0.5
    assert tuned["metrics"]["val"]["margin"] == result["margin"]
    assert main(argv + FAST + ["--max-drop", "0.5", "--confidence", "1", "--dry-run", "-q"]) == 0
    assert "lower bound on the difference" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-drop", "0", "--confidence", "-1"], "--confidence must be a finite number >= 0"),
        (["--max-drop", "0", "--confidence", "nan"], "--confidence must be a finite number >= 0"),
        (["--max-drop", "0", "--confidence", "inf"], "--confidence must be a finite number >= 0"),
        (["--confidence", "1.645"], "--confidence goes with --max-drop"),
        (["--beta", "2", "--confidence", "1"], "--confidence goes with --max-drop"),
    ],
)
def test_cli_bad_confidence_exits_2(extra, message, cli_setup, capsys):
    bundle, val, _ = cli_setup
    before = sorted(p.name for p in bundle.iterdir())
    assert main(["--bundle", str(bundle), "--calibration", str(val), "-q"] + FAST + extra) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"earlyexit-tune: error: {message}")
    assert captured.out == ""
    assert sorted(p.name for p in bundle.iterdir()) == before
