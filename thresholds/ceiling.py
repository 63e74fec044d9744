"""How much acceleration the exits themselves allow: an oracle ceiling for any exit rule.

Confidence thresholds decide without the label. An oracle that knows it sends each row to the
earliest exit that answers it correctly, and a row no exit answers correctly to the cheapest
exit, where being wrong costs least. To reach an accuracy floor it needs only that many correct
rows, so it keeps the rows whose earliest correct exit is cheapest and sends the rest to the
cheapest exit. It may also switch exits off for every row, as thresholds of 1.0 do: each set of
enabled exits is tried with its own costs (disabled exits run as stage files when the cost
model has them), and with all exits enabled the fallback may answer too. No rule over these
exits, however it scores confidence, accelerates more at that accuracy on these rows; the gap
to the tuned thresholds is what a better confidence signal could still win.

The consistency ceiling asks less of its oracle: it stops each row at the first enabled exit that
predicts what the final exit would, so every answer, and the accuracy, is the final exit's. It
is the most a rule can accelerate without ever changing an answer of the full model, the fair
target for "no accuracy loss". With fallback "plain" full depth is the plain model: a row stops
at the first enabled exit predicting the plain model's class, else the plain model answers it,
so the accuracy is the plain model's; every set of enabled exits is tried, exit K included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from thresholds.costs import CostModel
from thresholds.evaluate import ExitTable


@dataclass(frozen=True)
class Ceiling:
    at_accuracy: float  # percent: the floor the oracle had to meet
    acceleration: float | None  # at that floor; None when no exit answers enough rows right
    max_accuracy: float  # percent of rows some exit (or the fallback) answers correctly
    acceleration_at_max_accuracy: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "at_accuracy": self.at_accuracy,
            "acceleration": self.acceleration,
            "max_accuracy": self.max_accuracy,
            "acceleration_at_max_accuracy": self.acceleration_at_max_accuracy,
        }


# Beyond this many optional exits only the all-enabled configuration is tried (2^(K-1) sets).
_MAX_SUBSET_EXITS = 10


def _configurations(table: ExitTable, costs: CostModel) -> list[tuple[np.ndarray, np.ndarray]]:
    """(allowed K+1 columns, their K+1 costs) for every set of enabled exits."""
    k = table.num_exits
    everything = (
        np.ones(k + 1, dtype=bool),
        costs.exit_costs(table.fallback),
    )  # fallback allowed too
    if k - 1 > _MAX_SUBSET_EXITS:
        return [everything]
    configurations = [everything]
    for subset in range(1 << (k - 1)):
        enabled = [bool(subset >> i & 1) for i in range(k - 1)]
        # t_K = 0: exit K takes every row it sees, so no fallback and no head kept for it.
        thresholds = np.array([[0.5 if on else 1.0 for on in enabled] + [0.0]])
        row_costs = costs.exit_cost_matrix(thresholds, table.fallback, table.num_classes)[0]
        configurations.append((np.array([*enabled, True, False]), row_costs))
    if table.fallback == "plain" and k <= _MAX_SUBSET_EXITS:
        # The plain model may answer with any set of exits on, exit K's included: the chain
        # then stops at the last enabled exit, which makes the plain model's rows cheaper.
        for subset in range(1 << k):
            on = np.array([bool(subset >> i & 1) for i in range(k)])
            thresholds = np.where(on, 0.5, 1.0)[None, :]
            row_costs = costs.exit_cost_matrix(thresholds, "plain", table.num_classes)[0]
            configurations.append((np.append(on, True), row_costs))
    return configurations


def _mean_cost(
    correct: np.ndarray, allowed: np.ndarray, exit_costs: np.ndarray, needed: int
) -> float | None:
    """Mean cost per row of the oracle limited to `allowed` columns that answers at least
    `needed` rows correctly; None when those columns answer fewer rows correctly."""
    usable = correct & allowed
    answered = usable.any(axis=1)
    if int(np.count_nonzero(answered)) < needed:
        return None
    cheapest = float(exit_costs[np.flatnonzero(allowed)[0]])  # costs grow along the chain
    earliest = usable.argmax(axis=1)
    extra = np.sort(exit_costs[earliest[answered]] - cheapest)[:needed]
    return cheapest + float(extra.sum()) / int(correct.shape[0])


def oracle_ceiling(table: ExitTable, costs: CostModel, accuracy: float) -> Ceiling:
    """The oracle's acceleration at `accuracy` percent or more on `table`'s rows."""
    rows = table.num_rows
    # Percent → rows, with float slack so 79.72 % of 10 000 rows is 7 972, not 7 973.
    needed = max(0, math.ceil(accuracy * rows / 100.0 - 1e-6))
    at_floor = [
        cost
        for allowed, exit_costs in _configurations(table, costs)
        if (cost := _mean_cost(table.correct, allowed, exit_costs, needed)) is not None
    ]
    # Every row any column answers correctly, all exits enabled: the most accurate oracle.
    answered = table.correct.any(axis=1)
    earliest = np.where(answered, table.correct.argmax(axis=1), 0)
    return Ceiling(
        at_accuracy=accuracy,
        acceleration=costs.full_model / min(at_floor) if at_floor else None,
        max_accuracy=100.0 * int(np.count_nonzero(answered)) / rows,
        acceleration_at_max_accuracy=costs.full_model
        / float(costs.exit_costs(table.fallback)[earliest].mean()),
    )


@dataclass(frozen=True)
class ConsistencyCeiling:
    accuracy: float  # percent: full depth's (final exit or plain model), which it never changes
    acceleration: float
    enabled_exits: tuple[int, ...]  # 1-based exits of the best configuration
    agrees_with: str = "final exit"  # full depth: the final exit, or "plain model"

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "acceleration": self.acceleration,
            "enabled_exits": list(self.enabled_exits),
            "agrees_with": self.agrees_with,
        }


def consistency_ceiling(table: ExitTable, costs: CostModel) -> ConsistencyCeiling | None:
    """Acceleration of the router that stops each row at the first enabled exit agreeing with
    the final exit's prediction, for the best set of enabled exits (None without predictions)."""
    if table.agrees_final is None:
        return None
    if table.fallback == "plain":
        return _plain_consistency_ceiling(table, table.agrees_final, costs)
    k = table.num_exits
    best_cost = math.inf
    best_enabled: tuple[int, ...] = (k,)
    for allowed, exit_costs in _configurations(table, costs):
        if allowed[k]:  # the configuration that also lets the fallback answer: not this router
            continue
        usable = table.agrees_final & allowed[:k]  # exit K always agrees with itself
        mean_cost = float(exit_costs[usable.argmax(axis=1)].mean())
        if mean_cost < best_cost:
            best_cost = mean_cost
            best_enabled = tuple(int(i) + 1 for i in np.flatnonzero(allowed[:k]))
    return ConsistencyCeiling(
        accuracy=table.final_accuracy,
        acceleration=costs.full_model / best_cost,
        enabled_exits=best_enabled,
    )


def _plain_consistency_ceiling(
    table: ExitTable, agrees: np.ndarray, costs: CostModel
) -> ConsistencyCeiling:
    """`consistency_ceiling` for fallback "plain" (`agrees`: N×K, exit k predicts the plain
    model's class): rows no enabled exit agrees on go to the plain model, after the segments up
    to the last enabled exit (`CostModel.exit_cost_matrix`)."""
    k, n = table.num_exits, table.num_rows
    subsets = range(1 << k) if k <= _MAX_SUBSET_EXITS else [(1 << k) - 1]
    best_cost, best_enabled = math.inf, tuple(range(1, k + 1))
    rest = np.ones((n, 1), dtype=bool)  # the plain model agrees with itself
    for subset in subsets:
        enabled = np.array([bool(subset >> i & 1) for i in range(k)])
        thresholds = np.where(enabled, 0.5, 1.0)[None, :]  # t < 1 enabled, t = 1 disabled
        exit_costs = costs.exit_cost_matrix(thresholds, "plain", table.num_classes)[0]
        usable = np.concatenate([agrees & enabled, rest], axis=1)
        mean_cost = float(exit_costs[usable.argmax(axis=1)].mean())
        if mean_cost < best_cost:
            best_cost = mean_cost
            best_enabled = tuple(int(i) + 1 for i in np.flatnonzero(enabled))
    return ConsistencyCeiling(
        accuracy=100.0 * int(np.count_nonzero(table.correct[:, k])) / n,
        acceleration=costs.full_model / best_cost,
        enabled_exits=best_enabled,
        agrees_with="plain model",
    )
