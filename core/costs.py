"""What a row costs and what early exit saves, in MACs (or any per-segment cost).

A row answered at exit k ran segments 1..k; a fallback row (exit 0) ran all K, or, with
fallback "plain", what `fallback_cost` says (the segments up to the last enabled exit plus the
plain graph: `plain_fallback_costs`). Acceleration is the full model's cost divided by the mean
cost per row (CONTRACT.md, "Units").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def row_macs(
    exits: npt.ArrayLike, segment_costs: Sequence[float], fallback_cost: float | None = None
) -> npt.NDArray[np.float64]:
    """Per-row cost: the segments 1..k a row answered at exit k ran; a fallback row (0) ran all,
    or costs `fallback_cost` when given."""
    path = np.cumsum(np.asarray(segment_costs, dtype=np.float64))
    taken = np.asarray(exits)
    rest = path[-1] if fallback_cost is None else float(fallback_cost)
    return np.asarray(np.where(taken > 0, path[np.maximum(taken, 1) - 1], rest))


def plain_fallback_costs(
    segment_costs: npt.ArrayLike, chain_segments: npt.ArrayLike, plain_cost: float
) -> npt.NDArray[np.float64]:
    """What a row no exit accepts costs with fallback "plain": the first `chain_segments`
    segments (`core.decision.chain_segments`) and then the whole plain graph. Vectorised over
    leading axes: `segment_costs` is (…, K) (per threshold vector when disabled exits run as
    stage files), `chain_segments` broadcasts against its leading axes."""
    costs = np.asarray(segment_costs, dtype=np.float64)
    padded = np.concatenate([np.zeros((*costs.shape[:-1], 1)), np.cumsum(costs, axis=-1)], axis=-1)
    ran = np.broadcast_to(np.asarray(chain_segments, dtype=np.int64), costs.shape[:-1])
    return np.asarray(np.take_along_axis(padded, ran[..., None], axis=-1)[..., 0] + plain_cost)


def plain_fallback_cost(
    segment_costs: Sequence[float], chain_segments: int, plain_cost: float
) -> float:
    """`plain_fallback_costs` for one segment cost vector."""
    return float(plain_fallback_costs(segment_costs, chain_segments, plain_cost))


def acceleration(
    exits: npt.ArrayLike,
    segment_costs: Sequence[float],
    full_model_cost: float,
    fallback_cost: float | None = None,
) -> float:
    """The full model's cost ÷ the mean, over rows, of what each row ran."""
    return float(full_model_cost / row_macs(exits, segment_costs, fallback_cost).mean())


def exit_fractions(exits: npt.ArrayLike, num_exits: int) -> list[float]:
    """Fraction of rows answered at exit 1..K, then the fallback."""
    counts = np.bincount(np.asarray(exits), minlength=num_exits + 1)
    total = max(int(counts.sum()), 1)
    return [float(c) / total for c in [*counts[1:], counts[0]]]
