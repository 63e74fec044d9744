"""Non-dominated filtering for (accuracy, acceleration) pairs, both maximised."""

from __future__ import annotations

import numpy as np


def nondominated(accuracy: np.ndarray, acceleration: np.ndarray) -> np.ndarray:
    """Indices of the points no other point dominates, by falling acceleration; ties kept once.

    A point dominates another when it is at least as good in both and better in one.
    """
    accuracy = np.asarray(accuracy, dtype=np.float64)
    acceleration = np.asarray(acceleration, dtype=np.float64)
    if accuracy.size == 0:
        return np.zeros(0, dtype=np.int64)
    # Fastest first, most accurate first among equally fast: a point survives when it is more
    # accurate than every faster (or equally fast, earlier) point.
    order = np.lexsort((-accuracy, -acceleration))
    sorted_accuracy = accuracy[order]
    best_before = np.maximum.accumulate(np.concatenate([[-np.inf], sorted_accuracy[:-1]]))
    return order[sorted_accuracy > best_before]


def is_nondominated(accuracy: np.ndarray, acceleration: np.ndarray) -> bool:
    """True when no point of the set dominates another (O(n²), for checks and tests)."""
    acc = np.asarray(accuracy, dtype=np.float64)
    acl = np.asarray(acceleration, dtype=np.float64)
    geq = (acc[:, None] >= acc[None, :]) & (acl[:, None] >= acl[None, :])
    gt = (acc[:, None] > acc[None, :]) | (acl[:, None] > acl[None, :])
    return not bool((geq & gt).any())
