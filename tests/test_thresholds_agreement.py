"""Label-free guarded retuning: agreement with the final exit as the label."""

from __future__ import annotations

import numpy as np
import pytest

from thresholds.agreement import (
    SampleTooSmall,
    agreement_table,
    guarded_retune,
    split_sample,
)
from thresholds.costs import CostModel
from thresholds.errors import TuningError
from thresholds.evaluate import evaluate
from thresholds.search import GAConfig
from thresholds.synthetic import synthetic_calibration

COSTS = CostModel((2.0, 2.0, 2.0), 6.0, "macs")
FAST = GAConfig(population=40, generations=25, seed=0)


def test_the_final_exit_agrees_with_itself():
    probs, _ = synthetic_calibration(rows=300, exits=3, classes=10, seed=0)
    table = agreement_table(probs, "last")
    assert table.final_accuracy == 100.0
    preds = probs.argmax(axis=2)
    assert np.array_equal(table.correct[:, 0], preds[:, 0] == preds[:, -1])


def test_split_is_deterministic_and_disjoint():
    a, b = split_sample(1000, 0.3, seed=4)
    assert len(b) == 300 and len(set(a) | set(b)) == 1000 and not set(a) & set(b)
    assert np.array_equal(split_sample(1000, 0.3, seed=4)[1], b)


def test_guarded_retune_keeps_agreement_and_accelerates():
    probs, _ = synthetic_calibration(rows=3000, exits=3, classes=10, seed=1)
    result = guarded_retune(probs, "last", COSTS, eps=2.0, confidence=1.0, ga=FAST)
    assert result.tune_rows + result.held_out_rows == 3000
    assert result.acceleration > 1.0
    # The guard is exactly the held-out agreement's lower bound against 100 − EPS.
    assert result.guard_holds == (result.held_out_lower_bound >= 98.0 - 1e-9)
    held = agreement_table(probs, "last")
    full = evaluate(held, np.asarray(result.thresholds), COSTS)
    assert full.accuracy >= 95.0  # agreement over the whole sample stays near the promise


def test_zero_eps_at_high_confidence_fails_the_guard_on_noisy_exits():
    probs, _ = synthetic_calibration(rows=1000, exits=3, classes=10, seed=2)
    result = guarded_retune(probs, "last", COSTS, eps=0.0, confidence=3.0, ga=FAST)
    # With no room at all, the guard holds only where the held-out rows agree to the last one
    # (any disagreement leaves a binomial SE > 0 under a 100 % floor).
    assert result.guard_holds == (result.held_out_agreement == 100.0)
    assert result.held_out_lower_bound <= result.held_out_agreement


def test_too_small_a_sample_says_how_many_rows_are_needed():
    probs, _ = synthetic_calibration(rows=100, exits=3, classes=10, seed=0)
    with pytest.raises(SampleTooSmall, match="100 rows; a guarded retune needs 667"):
        guarded_retune(probs, "last", COSTS, eps=1.0, confidence=1.0)


@pytest.mark.parametrize(("eps", "z"), [(-1.0, 1.0), (101.0, 1.0), (1.0, -0.5), (1.0, 11.0)])
def test_eps_and_z_out_of_range_are_refused(eps, z):
    probs, _ = synthetic_calibration(rows=1000, exits=3, classes=10, seed=0)
    with pytest.raises(TuningError):
        guarded_retune(probs, "last", COSTS, eps=eps, confidence=z)
