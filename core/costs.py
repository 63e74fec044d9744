"""What a row costs and what early exit saves, in MACs (or any per-segment cost).

A row answered at exit k ran segments 1..k; a fallback row (exit 0) ran all K. Acceleration is
the full model's cost divided by the mean cost per row (CONTRACT.md, "Units").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def row_macs(exits: npt.ArrayLike, segment_costs: Sequence[float]) -> npt.NDArray[np.float64]:
    """Per-row cost: the segments 1..k a row answered at exit k ran; a fallback row (0) ran all."""
    path = np.cumsum(np.asarray(segment_costs, dtype=np.float64))
    taken = np.asarray(exits)
    return np.asarray(np.where(taken > 0, path[np.maximum(taken, 1) - 1], path[-1]))


def acceleration(
    exits: npt.ArrayLike, segment_costs: Sequence[float], full_model_cost: float
) -> float:
    """The full model's cost ÷ the mean, over rows, of what each row ran."""
    return float(full_model_cost / row_macs(exits, segment_costs).mean())


def exit_fractions(exits: npt.ArrayLike, num_exits: int) -> list[float]:
    """Fraction of rows answered at exit 1..K, then the fallback."""
    counts = np.bincount(np.asarray(exits), minlength=num_exits + 1)
    total = max(int(counts.sum()), 1)
    return [float(c) / total for c in [*counts[1:], counts[0]]]
