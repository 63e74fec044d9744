"""Synthetic calibration arrays that behave like a self-distilled multi-exit network.

Deeper exits are more accurate, confidence tracks correctness, and the exits' errors are
correlated (they share a backbone), so the ensemble is only slightly better than the last exit.
Used by tests, the documentation's examples and benchmarks of the search; never by tuning itself.
"""

from __future__ import annotations

import numpy as np


def synthetic_calibration(
    rows: int = 10_000,
    exits: int = 4,
    classes: int = 10,
    seed: int = 0,
    signal: float = 14.0,
    shared: float = 0.7,
) -> tuple[np.ndarray, np.ndarray]:
    """(exit_probs float32 rows×exits×classes, labels int64 rows).

    `signal` scales how separable the true class is (higher: more accurate exits); `shared`
    in [0, 1) is how much of each exit's noise is common to all exits.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows).astype(np.int64)
    difficulty = rng.random(rows)  # per row, the same for every exit
    common = rng.normal(0.0, 1.0, (rows, classes))
    probs = np.empty((rows, exits, classes), dtype=np.float32)
    for k in range(exits):
        skill = 0.6 + 0.4 * k / max(exits - 1, 1)
        own = rng.normal(0.0, 1.0, (rows, classes))
        logits = 2.0 * (shared * common + np.sqrt(1.0 - shared**2) * own)
        logits[np.arange(rows), labels] += signal * skill * (1.1 - difficulty)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        probs[:, k] = e / e.sum(axis=1, keepdims=True)
    return probs, labels
