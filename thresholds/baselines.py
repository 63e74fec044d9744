"""Reference searches the GA is compared with, in the same run.

- `grid_search`: every combination of a coarse per-exit grid, scored exactly. Rows are binned
  once by which grid values their max probability exceeds; cumulative sums of the binned counts
  then give, for every grid point at once, how many rows each exit answers and how many of those
  are right. Cost O(N + steps^K) instead of O(N · steps^K).
- `global_threshold_search`: one threshold shared by every exit (as Shallow-Deep Networks do),
  swept finely.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.decision import can_fall_back
from thresholds.costs import CostModel
from thresholds.errors import TuningError
from thresholds.evaluate import ExitTable, Metrics, evaluate, evaluate_population
from thresholds.frontier import nondominated
from thresholds.objectives import Objective

logger = logging.getLogger(__name__)

DEFAULT_GRID_STEPS = 21
DEFAULT_GLOBAL_STEPS = 1001
MAX_GRID_POINTS = 2_000_000
_CHUNK_CELLS = 1 << 20


@dataclass(frozen=True)
class BaselineResult:
    name: str  # "grid" or "global"
    thresholds: tuple[float, ...]
    metrics: Metrics
    fitness: float
    seconds: float
    steps: int
    points: int
    # (accuracy, acceleration) pairs to draw: the non-dominated grid points, or the global sweep.
    curve: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    def summary(self) -> dict[str, Any]:
        return {
            "thresholds": list(self.thresholds),
            "fitness": self.fitness,
            "accuracy": self.metrics.accuracy,
            "acceleration": self.metrics.acceleration,
            "exit_fractions": list(self.metrics.exit_fractions),
            "steps": self.steps,
            "points": self.points,
            "seconds": self.seconds,
        }


def _best_index(score: np.ndarray, accuracy: np.ndarray) -> int:
    """Highest score; among equal scores, the most accurate (as the GA's tie-break)."""
    candidates = np.flatnonzero(score == score.max())
    return int(candidates[np.argmax(accuracy[candidates])])


def grid_steps_within(num_exits: int, steps: int, max_points: int = MAX_GRID_POINTS) -> int:
    """`steps`, reduced until steps**K fits in `max_points`."""
    while steps > 2 and steps**num_exits > max_points:
        steps -= 1
    return steps


def _exit_part(hist: np.ndarray, k: int, steps: int) -> np.ndarray:
    """Rows answered by exit k (0-based) at every grid point of exits 1..k, broadcastable to K."""
    num_exits = hist.ndim
    part = hist.sum(axis=tuple(range(k + 1, num_exits))) if k + 1 < num_exits else hist
    for j in range(k):  # earlier exits decline: bin <= grid index
        part = np.cumsum(part, axis=j)
    # exit k accepts: bin > grid index
    part = part.sum(axis=k, keepdims=True) - np.cumsum(part, axis=k)
    part = part[(slice(0, steps),) * (k + 1)]
    shaped: np.ndarray = part.reshape(part.shape + (1,) * (num_exits - k - 1))
    return shaped


def _fallback_part(hist: np.ndarray, steps: int) -> np.ndarray:
    part = hist
    for j in range(hist.ndim):
        part = np.cumsum(part, axis=j)
    return part[(slice(0, steps),) * hist.ndim]


def _take(array: np.ndarray, rows: slice) -> np.ndarray:
    """Rows of exit 1's grid axis, for an array that may only broadcast along it."""
    return array if array.shape[0] == 1 else array[rows]


def _grid_bins(table: ExitTable, steps: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Grid values, each row's flat histogram cell, and the histogram's shape ((steps+1)^K)."""
    grid = np.linspace(0.0, 1.0, steps)
    # bins[n, j] = how many grid values row n's max probability strictly exceeds.
    bins = np.searchsorted(grid, table.max_probs.astype(np.float64), side="left")
    shape = (steps + 1,) * table.num_exits
    return grid, np.ravel_multi_index(tuple(bins.T), shape), shape


def _histogram(flat: np.ndarray, shape: tuple[int, ...], weights: np.ndarray | None) -> np.ndarray:
    cells = int(np.prod(shape))
    return np.bincount(flat, weights=weights, minlength=cells).astype(np.float64).reshape(shape)


def _chunk_rows(num_exits: int, steps: int) -> int:
    """Slices of exit 1's grid axis combined at once, so temporaries stay bounded."""
    return max(1, _CHUNK_CELLS // math.prod([steps] * (num_exits - 1)))


def _flagged_answers(
    flat: np.ndarray, shape: tuple[int, ...], steps: int, flags: np.ndarray
) -> np.ndarray:
    """At every grid point, how many rows are answered by an exit (or the fallback, column K)
    whose `flags[row, column]` is set: correct rows, or discordant ones."""
    k = len(shape)
    parts = [_exit_part(_histogram(flat, shape, flags[:, j]), j, steps) for j in range(k)]
    parts.append(_fallback_part(_histogram(flat, shape, flags[:, k]), steps))
    total = np.zeros((steps,) * k)
    chunk = _chunk_rows(k, steps)
    for start in range(0, steps, chunk):
        rows = slice(start, start + chunk)
        for part in parts:
            total[rows] += _take(part, rows)
    return total


def grid_tables(
    table: ExitTable, costs: CostModel, steps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid values, plus correct-row counts and total cost at every grid point (steps^K each)."""
    k = table.num_exits
    grid, flat, shape = _grid_bins(table, steps)
    counts = _histogram(flat, shape, None)
    answered = [_exit_part(counts, j, steps) for j in range(k)]
    correct = _flagged_answers(flat, shape, steps, table.correct.astype(np.float64))
    # Cost = sum over segments j of (rows reaching j) × (what j costs at this grid point); a
    # disabled exit's segment costs its stage when the head is unneeded (see skipped_heads).
    unneeded = (table.fallback != "ensemble") | ~can_fall_back(grid[:, None], table.num_classes)
    segment_cost: list[np.ndarray] = []
    for j in range(k):
        cost = np.full((1,) * k, costs.segment_costs[j])
        if costs.stage_costs is not None and costs.stage_costs[j] != costs.segment_costs[j]:
            disabled = np.expand_dims(grid >= 1.0, tuple(a for a in range(k) if a != j))
            skip = disabled & np.expand_dims(unneeded, tuple(range(k - 1)))
            cost = cost - (costs.segment_costs[j] - costs.stage_costs[j]) * skip
        if table.fallback == "plain":
            # chain_segments: segment j runs only when some exit from j on is enabled.
            runs = np.zeros((1,) * k, dtype=bool)
            for i in range(j, k):
                runs = runs | np.expand_dims(grid < 1.0, tuple(a for a in range(k) if a != i))
            cost = cost * runs
        segment_cost.append(cost)
    total_cost = np.zeros((steps,) * k)
    n = float(table.num_rows)
    chunk = _chunk_rows(k, steps)
    for start in range(0, steps, chunk):
        rows = slice(start, start + chunk)
        reaching = np.full((1,) * k, n)
        for j in range(k):
            total_cost[rows] += reaching * _take(segment_cost[j], rows)
            reaching = reaching - _take(answered[j], rows)
        if table.fallback == "plain":  # the rows no exit took run the plain graph
            total_cost[rows] += reaching * costs.plain_cost
    return grid, correct, total_cost


def grid_discordant(table: ExitTable, steps: int) -> np.ndarray:
    """Discordant rows (answer right where the baseline is wrong, or the reverse) at every
    grid point (steps^K), for the paired confidence bound."""
    flags = (table.correct != table.baseline_correct[:, None]).astype(np.float64)
    _, flat, shape = _grid_bins(table, steps)
    return _flagged_answers(flat, shape, steps, flags)


def grid_search(
    table: ExitTable,
    costs: CostModel,
    objective: Objective,
    steps: int = DEFAULT_GRID_STEPS,
    max_points: int = MAX_GRID_POINTS,
) -> BaselineResult | None:
    """Exhaustive search over `steps` evenly spaced thresholds in [0, 1] per exit.

    `steps` is reduced when steps**K would exceed `max_points`; None when even 2 steps would.
    """
    if steps < 2:
        raise TuningError(f"--grid-steps must be >= 2, got {steps}")
    start = time.perf_counter()
    k = table.num_exits
    used = grid_steps_within(k, steps, max_points)
    if used**k > max_points:
        logger.warning("grid search skipped: 2^%d points exceed the limit of %d", k, max_points)
        return None
    if used != steps:
        logger.warning(
            "grid search uses %d steps per exit (%d^%d points would be too many)", used, steps, k
        )
    grid, correct, total_cost = grid_tables(table, costs, used)
    n = table.num_rows
    accuracy = (100.0 * correct / n).ravel()
    acceleration = (costs.full_model / (total_cost / n)).ravel()
    # The GA's constraint exactly, margin included, so the GA ÷ grid ratio compares like with like.
    discordant = grid_discordant(table, used).ravel() if objective.needs_discordant else None
    score = objective.score(accuracy, acceleration, discordant)
    best = _best_index(score, accuracy)
    thresholds = grid[np.array(np.unravel_index(best, (used,) * k))]
    metrics = evaluate(table, thresholds, costs)  # exact re-scoring of the winner
    fitness = objective.score_of(metrics)
    front = nondominated(accuracy, acceleration)
    seconds = time.perf_counter() - start
    logger.info("grid (%d^%d points): fitness %.4f in %.2fs", used, k, fitness, seconds)
    return BaselineResult(
        name="grid",
        thresholds=tuple(float(t) for t in thresholds),
        metrics=metrics,
        fitness=fitness,
        seconds=seconds,
        steps=used,
        points=used**k,
        curve=np.column_stack([accuracy[front], acceleration[front]]),
    )


def global_threshold_search(
    table: ExitTable, costs: CostModel, objective: Objective, steps: int = DEFAULT_GLOBAL_STEPS
) -> BaselineResult:
    """The best single threshold applied to every exit, over `steps` values in [0, 1]."""
    if steps < 2:
        raise TuningError(f"global threshold steps must be >= 2, got {steps}")
    start = time.perf_counter()
    values = np.linspace(0.0, 1.0, steps)
    matrix = np.repeat(values[:, None], table.num_exits, axis=1)
    scored = evaluate_population(table, matrix, costs)
    score = objective.score_population(scored)
    best = _best_index(score, scored.accuracy)
    metrics = scored.row(best)
    seconds = time.perf_counter() - start
    logger.info("global threshold %.3f: fitness %.4f in %.2fs", values[best], score[best], seconds)
    return BaselineResult(
        name="global",
        thresholds=metrics.thresholds,
        metrics=metrics,
        fitness=float(score[best]),
        seconds=seconds,
        steps=steps,
        points=steps,
        curve=np.column_stack([scored.accuracy, scored.acceleration]),
    )
