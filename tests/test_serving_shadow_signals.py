"""The live signals computed from a shadow sample: what /v1/shadow and the gauges report."""

from __future__ import annotations

import numpy as np
import pytest

from core.drift import QuantileReference, TunedAgreement
from serving.shadow import agreement_signals, drift_signal, drop_alert, ks_statistic
from serving.shadow_store import ShadowRows, ShadowStore


def rows_of(exit_probs: np.ndarray) -> ShadowRows:
    n = exit_probs.shape[0]
    return ShadowRows(np.arange(n, dtype=np.float64), np.zeros(n, dtype=np.int64), exit_probs)


def two_exit_sample() -> np.ndarray:
    """4 rows, 2 exits, 2 classes: exit 1 is confident on rows 0-1 (right on 0, wrong on 1)."""
    probs = np.zeros((4, 2, 2), dtype=np.float32)
    probs[:, 1] = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]]  # final: 0, 0, 1, 1
    probs[:, 0] = [[0.95, 0.05], [0.05, 0.95], [0.6, 0.4], [0.45, 0.55]]
    return probs


def test_agreement_per_exit_and_estimated_drop() -> None:
    signals = agreement_signals(rows_of(two_exit_sample()), [0.9, 0.0], "last", confidence=0.0)
    by_exit = {e["exit"]: e for e in signals["per_exit"]}
    assert by_exit["1"]["rows"] == 2 and by_exit["1"]["agreement"] == 50.0
    assert by_exit["2"]["rows"] == 2 and by_exit["2"]["agreement"] == 100.0
    assert by_exit["fallback"]["rows"] == 0 and by_exit["fallback"]["agreement"] is None
    assert signals["agreement"] == 75.0 and signals["estimated_drop"] == 25.0
    assert signals["estimated_drop_upper"] == signals["estimated_drop_lower"] == 25.0  # Z = 0
    bounded = agreement_signals(rows_of(two_exit_sample()), [0.9, 0.0], "last", confidence=2.0)
    # Wald with the variance floored at one disagreement's worth, max(p(1-p), 1/n) = 1/4:
    # 25 ± 2·100·√(1/16) = 25 ± 50 points, clipped at 0.
    assert bounded["estimated_drop_upper"] == pytest.approx(75.0)
    assert bounded["estimated_drop_lower"] == 0.0
    # Full depth agrees with itself; the bound still says 4 rows prove little.
    full = agreement_signals(rows_of(two_exit_sample()), [1.0, 0.0], "last", confidence=1.645)
    assert full["estimated_drop"] == 0.0 and full["estimated_drop_upper"] > 10.0


def test_drop_alert_level_and_bound_by_hand() -> None:
    live = {"estimated_drop_lower": 6.0}
    reference = QuantileReference(np.array([0.0, 1.0]), 10, "val", TunedAgreement((0.9, 0.0), 95.0))
    # Recorded for these thresholds: level = budget 1 + 5 points of tuning-time disagreement.
    assert drop_alert(live, [0.9, 0.0], reference, 1.0) == {
        "tuned_drop": pytest.approx(5.0), "alert_level": pytest.approx(6.0), "over_budget": False
    }  # fmt: skip
    assert drop_alert({"estimated_drop_lower": 6.01}, [0.9, 0.0], reference, 1.0)["over_budget"]
    # Other thresholds, or no record: the budget alone.
    for ref, thresholds in ((reference, [0.8, 0.0]), (None, [0.9, 0.0])):
        alert = drop_alert(live, thresholds, ref, 1.0)
        assert alert["tuned_drop"] is None and alert["alert_level"] == 1.0 and alert["over_budget"]
    # An empty window has no bound: never over budget.
    assert not drop_alert({"estimated_drop_lower": None}, [0.9, 0.0], None, 0.0)["over_budget"]


def test_empty_window_and_drift() -> None:
    empty = rows_of(np.zeros((0, 2, 2), dtype=np.float32))
    assert agreement_signals(empty, [0.5, 0.0], "ensemble", 1.645)["agreement"] is None
    assert ks_statistic(np.array([0.1, 0.2]), np.array([0.1, 0.2])) == 0.0
    assert ks_statistic(np.array([0.1, 0.2]), np.array([0.8, 0.9])) == 1.0
    sample = rows_of(two_exit_sample())
    assert drift_signal(None, sample)["statistic"] is None
    assert drift_signal(sample, sample)["statistic"] == 0.0


def test_store_drops_the_oldest_and_keeps_rows_exact(tmp_path) -> None:
    store = ShadowStore(tmp_path / "s.sqlite", 2, 2, capacity=3, max_bytes=1 << 20)
    probs = two_exit_sample()
    store.append(np.arange(4.0), np.array([1, 2, 0, 2]), probs)
    kept = store.recent(10)
    assert kept.num_rows == 3 and kept.times.tolist() == [1.0, 2.0, 3.0]
    np.testing.assert_array_equal(kept.exit_probs, probs[1:])
    assert kept.served_exits.tolist() == [2, 0, 2]
    assert store.between(2.0, 3.0).num_rows == 2
    with pytest.raises(ValueError):
        store.append(np.arange(1.0), np.array([1]), np.zeros((1, 3, 2), dtype=np.float32))
    store.close()
    # Reopened for another shape: moved aside, never mixed.
    other = ShadowStore(tmp_path / "s.sqlite", 3, 2, capacity=3, max_bytes=1 << 20)
    assert other.count() == 0 and "moved to" in (other.recovered or "")
    assert any(".other-" in p.name for p in tmp_path.iterdir())
    other.close()
