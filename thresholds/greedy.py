"""Export-greedy thresholds: the first thresholds a bundle ships with, picked without a search.

Per exit, in order, the lowest grid threshold whose accepted rows are at least as accurate at
this exit as at the final exit; `earlyexit-export --data-dir` writes them into thresholds.json
(`earlyexit-tune` replaces them with searched ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from core.costs import acceleration, exit_fractions
from core.decision import decide

THRESHOLD_GRID = tuple(round(0.01 * i, 2) for i in range(100))  # candidates for export-greedy


def greedy_thresholds(
    exit_probs: np.ndarray,
    labels: np.ndarray,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> tuple[float, ...]:
    """Per exit, in order, the lowest grid threshold whose accepted rows (among those earlier
    exits left) are at least as accurate at this exit as at the final exit; 1.0 (disabled) if
    none is. The final exit takes every remaining row (t_K = 0), so the chosen rule is never less
    accurate than the final exit on these rows.
    """
    probs = np.asarray(exit_probs, dtype=np.float32)
    num_exits = probs.shape[1]
    predictions = probs.argmax(axis=2)
    right = predictions == np.asarray(labels)[:, None]
    max_probs = probs.max(axis=2).astype(np.float64)
    remaining = np.ones(probs.shape[0], dtype=bool)
    chosen: list[float] = []
    for j in range(num_exits - 1):
        pick = 1.0
        for t in sorted(grid):
            accepted = remaining & (max_probs[:, j] > t)
            if accepted.any() and right[accepted, j].sum() >= right[accepted, -1].sum():
                pick = float(t)
                break
        chosen.append(pick)
        remaining &= ~(max_probs[:, j] > pick)
    chosen.append(0.0)
    return tuple(chosen)


def summarise_thresholds(
    exit_probs: np.ndarray,
    labels: np.ndarray,
    thresholds: Sequence[float],
    fallback: str,
    segment_macs: Sequence[int],
    full_macs: int,
) -> dict[str, Any]:
    """Accuracy (percent), final-exit baseline, MAC acceleration and exit fractions."""
    answers, exits = decide(exit_probs, thresholds, fallback)
    labels = np.asarray(labels)
    return {
        "accuracy": 100.0 * float(np.mean(answers.argmax(axis=1) == labels)),
        "baseline_accuracy": 100.0 * float(np.mean(exit_probs[:, -1].argmax(axis=1) == labels)),
        "acceleration": acceleration(exits, segment_macs, full_macs),
        "exit_fractions": exit_fractions(exits, len(segment_macs)),
    }
