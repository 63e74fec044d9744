"""The drift reference thresholds.json carries and the KS statistic against it (core.drift), and
how the server's drift signal chooses between a live window and that reference."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from core.drift import (
    REFERENCE_POINTS,
    confidence_reference,
    ks_against_quantiles,
    ks_statistic,
    read_reference,
)
from serving.shadow import drift_signal
from serving.shadow_store import ShadowRows


def probs_with_exit1_confidence(confidence: np.ndarray, classes: int = 3) -> np.ndarray:
    """(N, 2, classes) probabilities whose exit 1 puts `confidence` on class 0."""
    n = confidence.size
    probs = np.zeros((n, 2, classes), dtype=np.float32)
    probs[:, 0, 0] = confidence
    probs[:, 0, 1:] = ((1.0 - confidence) / (classes - 1))[:, None]
    probs[:, 1, 0] = 1.0
    return probs


def rows_of(exit_probs: np.ndarray) -> ShadowRows:
    n = exit_probs.shape[0]
    return ShadowRows(np.arange(n, dtype=np.float64), np.zeros(n, dtype=np.int64), exit_probs)


def test_reference_record_holds_the_quantiles_of_exit_1_confidence() -> None:
    confidence = np.array([0.4, 0.9, 0.6, 1.0, 0.5], dtype=np.float32)
    record = confidence_reference(probs_with_exit1_confidence(confidence), "val", points=5)
    assert record["signal"] == "exit_1_max_probability" and record["source"] == "val"
    assert record["rows"] == 5
    # 5 quantiles of 5 values: the sorted values themselves, rounded to 6 digits.
    assert record["quantiles"] == pytest.approx([0.4, 0.5, 0.6, 0.9, 1.0], abs=1e-6)
    default = confidence_reference(probs_with_exit1_confidence(confidence), "live")
    assert len(default["quantiles"]) == REFERENCE_POINTS
    with pytest.raises(ValueError):
        confidence_reference(probs_with_exit1_confidence(np.zeros(0, np.float32)), "val")
    with pytest.raises(ValueError):
        confidence_reference(probs_with_exit1_confidence(confidence), "val", points=1)


def test_reference_records_the_thresholds_agreement_with_full_depth() -> None:
    confidence = np.array([0.4, 0.9, 0.6, 1.0, 0.5], dtype=np.float32)
    probs = probs_with_exit1_confidence(confidence)
    probs[[1, 2], 1] = [0.0, 1.0, 0.0]  # full depth names class 1 on rows 1 and 2
    # Exit 1 (class 0) takes rows 1, 2, 3 above 0.55; rows 1 and 2 disagree: 3 of 5 agree.
    record = confidence_reference(probs, "val", thresholds=[0.55, 0.0], fallback="last")
    assert record["agreement"] == {"thresholds": [0.55, 0.0], "percent": 60.0}
    agreement = read_reference(record).agreement
    assert agreement.drop_for([0.55, 0.0]) == pytest.approx(40.0)
    # Thresholds changed by hand since: the record says nothing about them.
    assert agreement.drop_for([0.5, 0.0]) is None
    assert "agreement" not in confidence_reference(probs, "val")


@pytest.mark.parametrize(
    "agreement",
    [
        "60",
        {"percent": 60.0},
        {"thresholds": [0.5, "x"], "percent": 60.0},
        {"thresholds": [0.5, 0.0], "percent": 101.0},
        {"thresholds": [0.5, 0.0], "percent": True},
    ],
)
def test_a_malformed_agreement_keeps_drift_and_drops_the_tuned_level(agreement, caplog) -> None:
    record = confidence_reference(probs_with_exit1_confidence(np.full(4, 0.7, np.float32)), "val")
    record["agreement"] = agreement
    with caplog.at_level(logging.WARNING, logger="core.drift"):
        reference = read_reference(record)
    assert reference is not None and reference.agreement is None
    assert sum("agreement ignored" in r.getMessage() for r in caplog.records) == 1


def test_ks_against_quantiles_by_hand() -> None:
    # Reference uniform on [0, 1] (quantiles 0, 0.5, 1 -> CDF(x) = x).
    q = np.array([0.0, 0.5, 1.0])
    assert ks_against_quantiles(q, np.array([0.5])) == pytest.approx(0.5)
    assert ks_against_quantiles(q, np.array([0.25, 0.75])) == pytest.approx(0.25)
    assert ks_against_quantiles(q, np.array([2.0])) == pytest.approx(1.0)
    # A point mass: every reference row at 1.0.
    ones = np.ones(REFERENCE_POINTS)
    assert ks_against_quantiles(ones, np.ones(7)) == 0.0
    assert ks_against_quantiles(ones, np.full(7, 0.5)) == 1.0
    assert ks_against_quantiles(np.full(11, 0.5), np.ones(3)) == 1.0


@pytest.mark.parametrize("saturated", [False, True])
def test_ks_against_quantiles_matches_the_two_sample_statistic(saturated: bool) -> None:
    """101 quantiles lose ~1 % of resolution: the statistic stays within that of the exact
    two-sample one, also when many rows sit at probability 1.0 (a tie the CDF must jump at)."""
    rng = np.random.default_rng(0)
    scale = 1.3 if saturated else 1.0
    reference = np.minimum(1.0, rng.beta(5, 1, 5000) * scale)
    quantiles = np.quantile(reference, np.linspace(0, 1, REFERENCE_POINTS))
    same = np.minimum(1.0, rng.beta(5, 1, 2000) * scale)
    harder = np.minimum(1.0, rng.beta(2, 1, 2000) * scale)
    for recent in (same, harder):
        assert ks_against_quantiles(quantiles, recent) == pytest.approx(
            ks_statistic(reference, recent), abs=0.012
        )
    assert (
        ks_against_quantiles(quantiles, same) < 0.05 < 0.2 < ks_against_quantiles(quantiles, harder)
    )


@pytest.mark.parametrize(
    "record",
    [
        "not an object",
        {"signal": "entropy", "quantiles": [0.1, 0.2]},
        {"signal": "exit_1_max_probability", "quantiles": [0.5]},
        {"signal": "exit_1_max_probability", "quantiles": [0.1, "x"]},
        {"signal": "exit_1_max_probability", "quantiles": [0.1, True]},
        {"signal": "exit_1_max_probability", "quantiles": [0.2, 1.5]},
        {"signal": "exit_1_max_probability", "quantiles": [0.9, 0.2]},
    ],
)
def test_an_unusable_reference_turns_drift_off_with_one_warning(record, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="core.drift"):
        assert read_reference(record) is None
    assert "tuned.reference ignored" in caplog.text
    assert read_reference(None) is None


def test_drift_signal_prefers_the_live_window_then_the_reference() -> None:
    rng = np.random.default_rng(1)
    tuned_rows = rows_of(probs_with_exit1_confidence(rng.uniform(0.5, 1.0, 400).astype("f4")))
    harder = rows_of(probs_with_exit1_confidence(rng.uniform(0.3, 0.8, 300).astype("f4")))
    reference = read_reference(confidence_reference(tuned_rows.exit_probs, "val"))
    assert reference is not None and reference.rows == 400 and reference.source == "val"

    live = drift_signal(tuned_rows, harder, reference)
    assert live["reference"] == "live window" and live["reference_rows"] == 400
    offline = drift_signal(None, harder, reference)
    assert offline["reference"] == "val" and offline["reference_rows"] == 400
    assert offline["statistic"] == pytest.approx(live["statistic"], abs=0.012)
    assert offline["statistic"] > 0.3 and offline["recent_rows"] == 300

    neither = drift_signal(None, harder, None)
    assert neither["statistic"] is None and "retune once" in neither["reason"]
    empty = rows_of(np.zeros((0, 2, 3), dtype=np.float32))
    assert drift_signal(tuned_rows, empty, reference)["reason"] == "no recent rows"
