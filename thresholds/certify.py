"""Certified thresholds: choose on some tuning rows, certify on the others (`--certify F`).

`--max-drop EPS --confidence Z` alone applies its bound to the rows the search chose on, and
the search picks the vector those rows favour most, so the bound covers less than its nominal
level on new rows (docs/tuning.md). Here the tuning rows are split once, at random. The search
part (1 − F) gives the candidates: the NSGA-II front of accuracy × acceleration and the two
vectors that may answer like the baseline (every exit disabled; only the final exit), ordered
on the search rows, the likeliest to pass first: one that reproduces the baseline there, then by
the lower bound there. The check part (F), which the search
never sees, then tests them in that order: a candidate passes when its one-sided lower bound at Z
on the check rows (paired with the baseline there) stays above −EPS, and the first failure ends
the sequence. Every candidate that passed is certified at once (fixed-sequence testing controls
the chance that any of them is wrong, with no correction for how many were tested: "Learn then
Test", Angelopoulos, Bates, Candès, Jordan and Lei, 2021), so the fastest of them is written: its
true drop exceeds EPS with probability at most α = 1 − Φ(Z), up to the normal approximation of
the bound. The price is power: the bound comes from F of the rows, so it is wider, and the search
sees fewer.

A vector that answers exactly like the baseline (the plain model with fallback "plain", the
final exit when that is the baseline) has no discordant row and always passes; against a
baseline no vector reproduces, nothing may pass, which is reported like an infeasible floor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from thresholds.costs import CostModel
from thresholds.errors import TuningError
from thresholds.evaluate import ExitTable, Metrics, evaluate_population
from thresholds.objectives import AccuracyBound, Objective
from thresholds.pareto import ParetoResult, run_nsga2

if TYPE_CHECKING:
    from thresholds.tuning import TuneOptions

logger = logging.getLogger(__name__)

# Fewer check rows than this cannot hold a meaningful bound (nor search rows a front).
MIN_PART_ROWS = 100


@dataclass(frozen=True)
class Certification:
    """How the written thresholds were certified."""

    fraction: float  # F: the share of the tuning rows held back for the check
    search_rows: int
    check_rows: int
    candidates: int  # front points and the two baseline-like vectors, in the order tested
    passed: int  # candidates that passed before the first failure (the fastest is written)
    check: Metrics  # the written thresholds on the check rows
    check_baseline: float  # the baseline's accuracy on the check rows (percent)
    bound: AccuracyBound  # accuracy − baseline on the check rows, its SE and lower bound
    confidence: float  # the Z of `bound`

    def to_dict(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "search_rows": self.search_rows,
            "check_rows": self.check_rows,
            "candidates": self.candidates,
            "passed": self.passed,
            "confidence": self.confidence,
            "check": {
                "accuracy": self.check.accuracy,
                "acceleration": self.check.acceleration,
                "baseline_accuracy": self.check_baseline,
                "drop": float(0.0 - self.bound.difference),
                "se": float(self.bound.se),
                "lower_bound": float(self.bound.lower_bound),
            },
        }


def check_fraction(fraction: float | None) -> None:
    """TuningError unless `fraction` is None or strictly between 0 and 1."""
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise TuningError(f"--certify must be a fraction strictly between 0 and 1, got {fraction}")


def split_rows(rows: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(search rows, check rows): a random split, `fraction` of the rows to the check."""
    check = round(rows * fraction)
    if min(check, rows - check) < MIN_PART_ROWS:
        raise TuningError(
            f"--certify {fraction:g} of {rows} rows leaves {check} check and {rows - check} "
            f"search rows; each part needs at least {MIN_PART_ROWS}"
        )
    order = np.random.default_rng(seed).permutation(rows)
    return np.sort(order[check:]), np.sort(order[:check])


def certify(
    table: ExitTable, costs: CostModel, options: TuneOptions
) -> tuple[tuple[float, ...], Certification, ParetoResult]:
    """The certified thresholds for `options` (max-drop with `certify` set), how they were
    certified, and the search part's front."""
    fraction = options.certify
    if fraction is None:  # TuneOptions has checked the rest: --max-drop given, F in (0, 1)
        raise TuningError("certify() needs options.certify")
    search_rows, check_rows = split_rows(table.num_rows, fraction, options.ga.seed)
    search, check = table.take(search_rows), table.take(check_rows)
    pareto = run_nsga2(search, costs, options.ga)
    k = table.num_exits
    anchors = np.array([[1.0] * k, [1.0] * (k - 1) + [0.0]])  # exits off; final exit only
    front = np.array([m.thresholds for m in pareto.front])
    front = front[~(front[:, None, :] == anchors[None, :, :]).all(axis=2).any(axis=1)]
    vectors = np.concatenate([anchors, front])
    # The order is fixed by the search rows alone: a vector that answers exactly like the
    # baseline there (no discordant row) first, then by the lower bound there (highest first;
    # ties: the faster first), so that the vectors likeliest to pass come before the first
    # failure.
    on_search = evaluate_population(search, vectors, costs)
    search_bound = options.objective(search).bound(on_search.accuracy, on_search.discordant_counts)
    order = np.lexsort(
        (-on_search.acceleration, -search_bound.lower_bound, on_search.discordant_counts > 0)
    )
    scored = evaluate_population(check, vectors[order], costs)
    objective: Objective = options.objective(check)
    passes = np.asarray(objective.feasible(scored.accuracy, scored.discordant_counts), bool)
    passed = int(np.argmin(passes)) if not passes.all() else len(passes)
    if passed == 0:
        raise TuningError(
            f"no candidate passes {objective.floor_text()} on the {check.num_rows} check rows "
            "(--certify): not even the vector the search rows rank safest"
        )
    fastest = int(np.argmax(scored.acceleration[:passed]))
    chosen = scored.row(fastest)
    bound = objective.bound(chosen.accuracy, chosen.discordant_rows)
    logger.info(
        "certified on %d held-back rows: %d of %d candidates passed in sequence; the fastest "
        "of them drops %.2f points there (lower bound %.2f at Z = %g), %.3fx",
        check.num_rows,
        passed,
        len(order),
        float(0.0 - bound.difference),
        float(bound.lower_bound),
        objective.confidence,
        chosen.acceleration,
    )
    certification = Certification(
        fraction=fraction,
        search_rows=search.num_rows,
        check_rows=check.num_rows,
        candidates=len(order),
        passed=passed,
        check=chosen,
        check_baseline=objective.baseline,
        bound=bound,
        confidence=objective.confidence,
    )
    return chosen.thresholds, certification, pareto
