"""core.decision and core.costs: the one early-exit rule, its scalar and vector forms agree."""

from __future__ import annotations

import numpy as np

from core.costs import acceleration, exit_fractions, row_macs
from core.decision import FALLBACK_EXIT, accept_mask, accepts, accepts_row, decide, skipped_heads


def test_scalar_rule_agrees_with_accept_mask() -> None:
    rng = np.random.default_rng(0)
    rows = rng.dirichlet(np.ones(5), size=200).astype(np.float32)
    rows[::17, 2] = np.nan
    for t in (0.0, 0.2, 0.5, float(np.float32(0.6)), 0.999, 1.0):
        mask = accept_mask(rows.max(axis=1), t)
        assert [accepts_row(r.tolist(), t) for r in rows] == mask.tolist()
        finite = ~np.isnan(rows).any(axis=1)
        assert [accepts(float(r.max()), t) for r in rows[finite]] == mask[finite].tolist()


def test_row_costs_and_acceleration_follow_decide() -> None:
    probs = np.array(
        [[[0.9, 0.1], [0.6, 0.4]], [[0.5, 0.5], [0.8, 0.2]], [[0.55, 0.45], [0.52, 0.48]]],
        dtype=np.float32,
    )
    _, exits = decide(probs, [0.8, 0.7])
    assert exits.tolist() == [1, 2, FALLBACK_EXIT]
    assert row_macs(exits, [10, 30]).tolist() == [10.0, 40.0, 40.0]
    assert acceleration(exits, [10, 30], 45) == 45 / 30
    assert exit_fractions(exits, 2) == [1 / 3, 1 / 3, 1 / 3]


def test_skipped_heads_only_where_no_row_falls_back_or_fallback_is_last() -> None:
    th = np.array([[1.0, 1.0, 0.0], [1.0, 0.5, 0.9]])
    assert skipped_heads(th, "ensemble", 10).tolist() == [[True, True, False], [False] * 3]
    assert skipped_heads(th, "last", 10).tolist() == [[True, True, False], [True, False, False]]
