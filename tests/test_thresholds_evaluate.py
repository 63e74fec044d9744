"""Evaluation core: decision rule, accuracy, exit fractions, acceleration and fitness."""

from __future__ import annotations

import numpy as np
import pytest

from core.decision import decide
from thresholds.baselines import global_threshold_search, grid_search, grid_tables
from thresholds.costs import CostModel
from thresholds.errors import TuningError
from thresholds.evaluate import build_exit_table, evaluate, evaluate_population
from thresholds.frontier import is_nondominated, nondominated
from thresholds.objectives import Objective
from thresholds.synthetic import synthetic_calibration

# Four rows, two exits, three classes; dyadic values so float32 probabilities compare exactly.
TINY_PROBS = np.array(
    [
        [[0.75, 0.125, 0.125], [0.25, 0.625, 0.125]],  # label 0: exit 1 right, exit 2 wrong
        [[0.5, 0.375, 0.125], [0.125, 0.75, 0.125]],  # label 1: exit 1 max exactly 0.5
        [[0.5, 0.25, 0.25], [0.25, 0.28125, 0.46875]],  # label 2: ensemble says 0, exit 2 says 2
        [[0.25, 0.25, 0.5], [0.125, 0.75, 0.125]],  # label 1
    ],
    dtype=np.float32,
)
TINY_LABELS = np.array([0, 1, 2, 1], dtype=np.int64)
TINY_COSTS = CostModel(segment_costs=(2.0, 3.0), full_model=4.0, unit="macs")


def test_hand_computed_ensemble_fallback():
    table = build_exit_table(TINY_PROBS, TINY_LABELS, "ensemble")
    m = evaluate(table, [0.5, 0.5], TINY_COSTS)
    # row 0 -> exit 1 (0.75 > 0.5); rows 1, 3 -> exit 2 (0.5 is not > 0.5); row 2 -> fallback
    assert m.exit_fractions == (0.25, 0.5, 0.25)
    # ensemble of row 2 is [0.375, 0.265625, 0.359375] -> class 0, wrong
    assert m.accuracy == 75.0
    # costs: exit 1 = 2, exit 2 = 5, fallback = 5 -> mean 17/4; full model 4
    assert m.mean_cost == pytest.approx(17 / 4)
    assert m.acceleration == pytest.approx(16 / 17)
    assert table.final_accuracy == 75.0  # exit 2 gets row 0 wrong
    objective = Objective(baseline=table.final_accuracy, beta=2.0)
    assert float(objective.eq7(m.accuracy, m.acceleration)) == pytest.approx(16 / 17)


def test_hand_computed_last_fallback_counts_fallback_rows():
    table = build_exit_table(TINY_PROBS, TINY_LABELS, "last")
    m = evaluate(table, [0.5, 0.5], TINY_COSTS)
    # row 2 falls back to exit 2's answer (class 2, right) but is still a fallback row
    assert m.exit_fractions == (0.25, 0.5, 0.25)
    assert m.accuracy == 100.0
    objective = Objective(baseline=75.0, beta=2.0)
    assert float(objective.score(m.accuracy, m.acceleration)) == pytest.approx(50 + 16 / 17)


def test_disabled_exits_and_last_exit_threshold():
    table = build_exit_table(TINY_PROBS, TINY_LABELS, "ensemble")
    everything_off = evaluate(table, [1.0, 1.0], TINY_COSTS)
    assert everything_off.exit_fractions == (0.0, 0.0, 1.0)
    assert everything_off.accuracy == 75.0  # ensemble right on rows 0, 1, 3
    assert everything_off.acceleration == pytest.approx(4 / 5)
    last_answers_all = evaluate(table, [1.0, 0.0], TINY_COSTS)
    assert last_answers_all.exit_fractions == (0.0, 1.0, 0.0)
    assert last_answers_all.accuracy == table.final_accuracy
    first_answers_all = evaluate(table, [0.0, 0.0], TINY_COSTS)
    assert first_answers_all.exit_fractions == (1.0, 0.0, 0.0)
    assert first_answers_all.accuracy == 25.0
    assert first_answers_all.acceleration == pytest.approx(2.0)


def test_disabled_exit_runs_its_stage_only_when_the_head_is_unneeded():
    costs = CostModel((2.0, 3.0), 4.0, "macs", stage_costs=(1.5, 3.0))
    ensemble = build_exit_table(TINY_PROBS, TINY_LABELS, "ensemble")
    # t_2 = 0 < 1/3: exit 2 accepts every row, no ensemble needed -> exit 1 runs as its stage
    assert evaluate(ensemble, [1.0, 0.0], costs).acceleration == pytest.approx(4 / 4.5)
    # rows can fall back to the ensemble, which needs exit 1's head
    assert evaluate(ensemble, [1.0, 0.5], costs).acceleration == pytest.approx(4 / 5)
    # an enabled exit always runs its head
    assert evaluate(ensemble, [0.9, 0.0], costs).acceleration == pytest.approx(4 / 5)
    last = build_exit_table(TINY_PROBS, TINY_LABELS, "last")
    assert evaluate(last, [1.0, 0.5], costs).acceleration == pytest.approx(4 / 4.5)


def test_population_matches_single_vectors_and_runtime_rule():
    probs, labels = synthetic_calibration(rows=3000, exits=3, classes=7, seed=3)
    rng = np.random.default_rng(0)
    thresholds = rng.random((40, 3))
    thresholds[:5] = 1.0  # disabled exits
    costs = CostModel((1.0, 2.0, 3.0), 5.0, "macs")
    for fallback in ("ensemble", "last"):
        table = build_exit_table(probs, labels, fallback)
        scored = evaluate_population(table, thresholds, costs)
        for p in (0, 7, 39):
            answers, exits = decide(probs, list(thresholds[p]), fallback)
            right = answers.argmax(axis=1) == labels
            assert scored.correct_counts[p] == int(right.sum())
            counts = [int((exits == k).sum()) for k in (1, 2, 3, 0)]  # fallback is exit 0
            assert scored.exit_counts[p].tolist() == counts
            single = evaluate(table, thresholds[p], costs)
            assert single.accuracy == scored.accuracy[p]
            assert single.acceleration == pytest.approx(scored.acceleration[p])


@pytest.mark.parametrize("fallback", ["ensemble", "last"])
@pytest.mark.parametrize("stages", [None, (0.75, 1.0, 2.5)])
def test_grid_tables_are_exact(fallback, stages):
    probs, labels = synthetic_calibration(rows=2000, exits=3, classes=5, seed=1)
    table = build_exit_table(probs, labels, fallback)
    costs = CostModel((1.0, 1.5, 2.5), 4.0, "macs", stage_costs=stages)
    grid, correct, total_cost = grid_tables(table, costs, 7)
    rng = np.random.default_rng(2)
    index = rng.integers(0, 7, size=(60, 3))
    index[:8, :2] = 6  # exits 1 and 2 disabled (t = 1.0) ...
    index[:4, 2] = 0  # ... with exit 3 accepting every row
    scored = evaluate_population(table, grid[index], costs)
    assert np.array_equal(scored.correct_counts, correct[tuple(index.T)])
    assert np.allclose(scored.mean_cost * table.num_rows, total_cost[tuple(index.T)])


def test_grid_and_global_search_pick_the_best_of_their_sets():
    probs, labels = synthetic_calibration(rows=2000, exits=2, classes=5, seed=4)
    table = build_exit_table(probs, labels)
    costs = CostModel((1.0, 2.0), 2.5, "macs")
    objective = Objective(baseline=table.final_accuracy, beta=0.5)
    grid = grid_search(table, costs, objective, steps=11)
    values = np.linspace(0, 1, 11)
    every = np.array([[a, b] for a in values for b in values])
    scored = evaluate_population(table, every, costs)
    best = objective.score(scored.accuracy, scored.acceleration).max()
    assert grid.fitness == pytest.approx(best)
    glob = global_threshold_search(table, costs, objective, steps=11)
    assert len(set(glob.thresholds)) == 1
    diagonal = evaluate_population(table, np.repeat(values[:, None], 2, axis=1), costs)
    assert glob.fitness == pytest.approx(
        objective.score(diagonal.accuracy, diagonal.acceleration).max()
    )
    assert glob.fitness <= grid.fitness + 1e-12  # the diagonal is part of the grid


def test_max_drop_objective_is_a_hard_floor():
    objective = Objective(baseline=80.0, max_drop=1.0)
    accuracy = np.array([79.0, 78.99, 85.0])
    acceleration = np.array([1.5, 9.0, 1.1])
    score = objective.score(accuracy, acceleration)
    assert score[0] == 1.5 and score[2] == 1.1
    assert score[1] < 0 < score[2]  # infeasible below every feasible vector


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        (np.zeros((0, 2, 3), np.float32), np.zeros(0, np.int64), "empty"),
        (np.zeros((4, 3), np.float32), np.zeros(4, np.int64), "N×K×C"),
        (TINY_PROBS, np.array([0, 1, 2]), "labels must have shape"),
        (TINY_PROBS, np.array([0, 1, 3, 1]), "labels must lie"),
        (np.full((4, 2, 3), np.nan, np.float32), TINY_LABELS, "NaN"),
    ],
)
def test_bad_calibration_arrays(probs, labels, message):
    with pytest.raises(TuningError, match=message):
        build_exit_table(probs, labels)


def test_bad_thresholds_and_costs():
    table = build_exit_table(TINY_PROBS, TINY_LABELS)
    with pytest.raises(TuningError):
        evaluate(table, [0.5], TINY_COSTS)
    with pytest.raises(TuningError):
        evaluate(table, [0.5, 1.5], TINY_COSTS)
    with pytest.raises(TuningError):
        CostModel((1.0, 0.0), 2.0, "macs")
    with pytest.raises(TuningError):
        Objective(baseline=80.0, beta=-1.0)
    with pytest.raises(TuningError):
        Objective(baseline=80.0, max_drop=101.0)


def test_nondominated_filter():
    accuracy = np.array([90.0, 85.0, 85.0, 80.0, 70.0, 90.0])
    acceleration = np.array([1.0, 1.5, 1.2, 1.4, 2.0, 1.0])
    keep = set(nondominated(accuracy, acceleration).tolist())
    assert keep in ({0, 1, 4}, {5, 1, 4})
    assert is_nondominated(accuracy[list(keep)], acceleration[list(keep)])
    assert not is_nondominated(accuracy, acceleration)
