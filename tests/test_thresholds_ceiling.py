"""The oracle ceiling: the most acceleration any exit rule gets at an accuracy floor."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_thresholds_evaluate import TINY_COSTS, TINY_LABELS, TINY_PROBS
from thresholds.ceiling import oracle_ceiling
from thresholds.costs import CostModel
from thresholds.evaluate import build_exit_table, evaluate_population
from thresholds.synthetic import synthetic_calibration


def test_hand_computed_ceiling_on_the_tiny_table():
    # Earliest correct exit per row: exit 1 (cost 2), then exit 2 (cost 5) for the other three.
    # Full model 4. Rows not needed for the floor go to exit 1.
    table = build_exit_table(TINY_PROBS, TINY_LABELS, "ensemble")
    cases = {0.0: 4 / 2, 50.0: 4 / (11 / 4), 75.0: 4 / (14 / 4), 100.0: 4 / (17 / 4)}
    for accuracy, expected in cases.items():
        ceiling = oracle_ceiling(table, TINY_COSTS, accuracy)
        assert ceiling.acceleration == pytest.approx(expected), accuracy
    ceiling = oracle_ceiling(table, TINY_COSTS, 75.0)
    assert ceiling.max_accuracy == 100.0
    assert ceiling.acceleration_at_max_accuracy == pytest.approx(16 / 17)
    assert ceiling.to_dict()["at_accuracy"] == 75.0


def test_a_row_only_the_fallback_answers_costs_every_segment():
    # Exit 1 says class 1, exit 2 class 2, their mean class 0: the label.
    row = np.array([[[0.375, 0.5, 0.125], [0.375, 0.125, 0.5]]], dtype=np.float32)
    probs = np.concatenate([TINY_PROBS, row])
    labels = np.append(TINY_LABELS, 0)
    table = build_exit_table(probs, labels, "ensemble")
    ceiling = oracle_ceiling(table, TINY_COSTS, 100.0)
    assert ceiling.max_accuracy == 100.0
    # costs 2 + 5 + 5 + 5 + 5 (the fallback runs both segments) over five rows
    assert ceiling.acceleration == pytest.approx(4 / (22 / 5))
    # with the last exit as fallback that row is lost, and 100 % is out of reach
    last = build_exit_table(probs, labels, "last")
    assert oracle_ceiling(last, TINY_COSTS, 100.0).acceleration is None
    assert oracle_ceiling(last, TINY_COSTS, 100.0).max_accuracy == 80.0


@pytest.mark.parametrize("fallback", ["ensemble", "last"])
def test_no_threshold_vector_beats_the_ceiling_at_its_own_accuracy(fallback):
    """Disabled exits included: with stage files a vector can skip heads, and the oracle's
    per-set configurations must still bound it."""
    probs, labels = synthetic_calibration(rows=2000, exits=3, classes=10, seed=4)
    table = build_exit_table(probs, labels, fallback)
    # exit 1's head costs four times its stage: switching exit 1 off often pays
    costs = CostModel((5.0, 2.0, 2.0), 6.0, "macs", stage_costs=(1.0, 1.5, 2.0))
    rng = np.random.default_rng(0)
    population = rng.uniform(0.0, 1.0, size=(300, 3))
    population[rng.uniform(size=population.shape) < 0.3] = 1.0  # switch some exits off
    scored = evaluate_population(table, population, costs)
    for accuracy, acceleration in zip(scored.accuracy, scored.acceleration, strict=True):
        ceiling = oracle_ceiling(table, costs, float(accuracy))
        assert ceiling.acceleration is not None
        assert ceiling.acceleration >= acceleration - 1e-9
