"""One tuning run: search (GA or NSGA-II), the grid and global-threshold baselines, and the
chosen thresholds scored on the tuning rows and on held-out rows. Arrays in, results out; no
files, so the CLI, notebooks and tests share it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.stats import McNemar, mcnemar_counts
from thresholds.baselines import (
    DEFAULT_GLOBAL_STEPS,
    DEFAULT_GRID_STEPS,
    BaselineResult,
    global_threshold_search,
    grid_search,
)
from thresholds.ceiling import Ceiling, ConsistencyCeiling, consistency_ceiling, oracle_ceiling
from thresholds.certify import Certification, certify, check_fraction
from thresholds.costs import CostModel
from thresholds.errors import TuningError
from thresholds.evaluate import ExitTable, Metrics, evaluate
from thresholds.objectives import DEFAULT_BETA, AccuracyBound, Objective, check_confidence
from thresholds.pareto import ParetoResult, run_nsga2
from thresholds.search import GAConfig, SearchResult, run_ga

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneOptions:
    beta: float | None = None  # eq. 7; the default mode (β = 1) when max_drop is None
    max_drop: float | None = None  # points below the baseline allowed; excludes beta
    # Z of a one-sided lower confidence bound the max-drop floor applies to; None or 0 = none.
    confidence: float | None = None
    pareto: bool = False  # NSGA-II front; the written point is the front's best for the mode
    # max-drop only: hold this share of the tuning rows back and certify the written vector on
    # them (thresholds.certify); None = choose and bound on the same rows
    certify: float | None = None
    # percent; None = the table's baseline on the same rows (its reference model, else its
    # final exit), paired row by row
    baseline: float | None = None
    ga: GAConfig = field(default_factory=GAConfig)
    grid_steps: int = DEFAULT_GRID_STEPS
    global_steps: int = DEFAULT_GLOBAL_STEPS
    compare: bool = True  # run the grid and global baselines

    def __post_init__(self) -> None:
        if self.beta is not None and self.max_drop is not None:
            raise TuningError("use either --beta or --max-drop, not both")
        if self.confidence is not None and self.max_drop is None:
            raise TuningError("--confidence goes with --max-drop")
        check_confidence(self.confidence, self.max_drop)
        if self.pareto and self.ga.restarts > 1:
            raise TuningError("--restarts applies to the GA, not to --pareto")
        check_fraction(self.certify)
        if self.certify is not None:
            if self.max_drop is None:
                raise TuningError("--certify goes with --max-drop")
            if self.pareto or self.ga.restarts > 1:
                raise TuningError(
                    "--certify searches the NSGA-II front itself: drop --pareto and --restarts"
                )
        if self.grid_steps < 2:
            raise TuningError(f"--grid-steps must be >= 2, got {self.grid_steps}")
        # Validates β / EPS / baseline ranges up front, before any data is read.
        Objective(
            baseline=50.0 if self.baseline is None else self.baseline,
            beta=DEFAULT_BETA if self.beta is None else self.beta,
            max_drop=self.max_drop,
        )

    def objective(self, table: ExitTable) -> Objective:
        baseline = table.baseline_accuracy if self.baseline is None else self.baseline
        beta = DEFAULT_BETA if self.beta is None else self.beta
        return Objective(
            baseline=baseline,
            beta=beta,
            max_drop=self.max_drop,
            confidence=self.confidence or 0.0,
            rows=table.num_rows,
            # The default baseline (the reference model, else the final exit) is measured on
            # these very rows, so the bound is on the paired difference; a given --baseline is a
            # fixed number with no rows to pair with, so the bound falls back to the binomial
            # SE of the dynamic accuracy alone.
            paired=self.baseline is None,
        )


@dataclass(frozen=True)
class SplitReport:
    """The chosen thresholds on one split, against that split's own baseline."""

    rows: int
    metrics: Metrics
    baseline_accuracy: float
    fitness: float
    feasible: bool
    exit_accuracies: list[float]  # each exit alone, then the fallback alone
    final_exit: Metrics  # every row answered by exit K (what serving without early exits does)
    confidence: float  # the Z of `bound`
    paired: bool  # `bound` is on the paired difference to the baseline on these rows
    # What the pairing is with: "final_exit" or "reference" (the plain model on the same rows);
    # None when not paired.
    paired_with: str | None
    bound: AccuracyBound  # accuracy − baseline, its SE and its lower bound (points)
    ceiling: Ceiling  # what an oracle over the same exits reaches at the same accuracy
    # What stopping at the first exit that agrees with the final one reaches (None without
    # per-exit predictions): acceleration at exactly the final exit's accuracy.
    consistency: ConsistencyCeiling | None = None
    # Exact McNemar of the thresholds' answers (B) against the baseline's (A) on these rows;
    # None when the baseline is a number with no rows to pair with.
    mcnemar: McNemar | None = None

    @property
    def drop(self) -> float:
        """Points below this split's baseline (negative when above it)."""
        return self.baseline_accuracy - self.metrics.accuracy

    def margin(self) -> dict[str, Any]:
        """The drop, its SE and the lower bound on accuracy − baseline (points)."""
        return {
            "confidence": self.confidence,
            "paired": self.paired,
            "paired_with": self.paired_with,
            "drop": float(0.0 - self.bound.difference),  # 0.0 - x: no "-0.0" in reports
            "se": float(self.bound.se),
            "lower_bound": float(self.bound.lower_bound),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "final_exit": {
                "accuracy": self.final_exit.accuracy,
                "acceleration": self.final_exit.acceleration,
            },
            "rows": self.rows,
            "accuracy": self.metrics.accuracy,
            "baseline_accuracy": self.baseline_accuracy,
            "accuracy_drop": self.drop,
            "acceleration": self.metrics.acceleration,
            "fitness": self.fitness,
            "exit_fractions": list(self.metrics.exit_fractions),
            "exit_accuracies": self.exit_accuracies,
            "feasible": self.feasible,
            "margin": self.margin(),
            "ceiling": self.ceiling.to_dict(),
            "consistency_ceiling": None if self.consistency is None else self.consistency.to_dict(),
            "mcnemar": mcnemar_dict(self.mcnemar),
        }


def mcnemar_dict(test: McNemar | None) -> dict[str, Any] | None:
    """A split report's `mcnemar` object (None when unpaired)."""
    if test is None:
        return None
    return {
        "rows": test.rows,
        "only_baseline": test.only_a,  # rows the baseline gets right and the thresholds wrong
        "only_early_exit": test.only_b,
        "difference_points": test.difference_points,
        "p_value": test.p_value,
    }


def paired_mcnemar(table: ExitTable, metrics: Metrics) -> McNemar:
    """McNemar of `metrics`' answers against the table's baseline on the same rows, from the
    counts the evaluator keeps: correct rows C and discordant rows D of the thresholds, correct
    rows C0 of the baseline. Right for the thresholds alone minus right for the baseline alone is
    C − C0, and the two add up to D."""
    gain = metrics.correct_rows - int(np.count_nonzero(table.baseline_correct))
    discordant = metrics.discordant_rows
    return mcnemar_counts(table.num_rows, (discordant - gain) // 2, (discordant + gain) // 2)


def split_report(
    table: ExitTable, thresholds: tuple[float, ...], costs: CostModel, options: TuneOptions
) -> SplitReport:
    objective = options.objective(table)
    metrics = evaluate(table, np.asarray(thresholds), costs)
    # Reported in every mode, so users see the noise on the drop even without a margin.
    bound = objective.bound(metrics.accuracy, metrics.discordant_rows)
    return SplitReport(
        rows=table.num_rows,
        metrics=metrics,
        baseline_accuracy=objective.baseline,
        # The mode's objective; in max-drop mode plain acceleration, with `feasible` beside it.
        fitness=float(
            objective.eq7(metrics.accuracy, metrics.acceleration)
            if objective.max_drop is None
            else metrics.acceleration
        ),
        feasible=bool(objective.feasible(metrics.accuracy, metrics.discordant_rows)),
        exit_accuracies=table.exit_accuracies(),
        final_exit=evaluate(table, full_depth_thresholds(table.num_exits), costs),
        confidence=objective.confidence,
        paired=objective.paired,
        paired_with=None
        if not objective.paired
        else ("reference" if table.reference_correct is not None else "final_exit"),
        bound=bound,
        ceiling=oracle_ceiling(table, costs, metrics.accuracy),
        consistency=consistency_ceiling(table, costs),
        mcnemar=paired_mcnemar(table, metrics) if objective.paired else None,
    )


def full_depth_thresholds(num_exits: int) -> np.ndarray:
    """Every exit but the last disabled, the last accepting every row."""
    return np.array([1.0] * (num_exits - 1) + [0.0])


@dataclass(frozen=True)
class TuneOutcome:
    objective: Objective
    method: str  # "ga", "nsga2" or "nsga2_certified"
    thresholds: tuple[float, ...]
    tune: SplitReport
    seconds: float  # the search itself
    search: SearchResult | None = None
    pareto: ParetoResult | None = None
    grid: BaselineResult | None = None
    global_threshold: BaselineResult | None = None
    test: SplitReport | None = None
    certification: Certification | None = None

    @property
    def fitness(self) -> float:
        return self.tune.fitness

    def ratio_to(self, baseline: BaselineResult | None) -> float | None:
        """Search fitness ÷ a baseline's; None when undefined (no baseline, or it is <= 0)."""
        if baseline is None or baseline.fitness <= 0:
            return None
        return self.fitness / baseline.fitness


def tune(
    table: ExitTable,
    costs: CostModel,
    options: TuneOptions | None = None,
    test_table: ExitTable | None = None,
    test_options: TuneOptions | None = None,
) -> TuneOutcome:
    """Search thresholds on `table`, compare with the baselines, score on `test_table` too
    (with `test_options`, e.g. the plain model's accuracy on that split, when given)."""
    options = options or TuneOptions()
    objective = options.objective(table)
    logger.info(
        "tuning on %d rows, %d exits: %s; final-exit accuracy %.2f%%, full-depth acceleration "
        "%.3fx",
        table.num_rows,
        table.num_exits,
        objective.describe(),
        table.final_accuracy,
        costs.full_depth_acceleration,
    )
    search: SearchResult | None = None
    pareto: ParetoResult | None = None
    certification: Certification | None = None
    start = time.perf_counter()
    if options.certify is not None:
        thresholds, certification, pareto = certify(table, costs, options)
        method = "nsga2_certified"
    elif options.pareto:
        pareto = run_nsga2(table, costs, options.ga)
        chosen, _ = pareto.choose(objective)
        if not bool(objective.feasible(chosen.accuracy, chosen.discordant_rows)):
            raise TuningError(f"no point of the Pareto front reaches {objective.floor_text()}")
        thresholds, method = chosen.thresholds, "nsga2"
    else:
        search = run_ga(table, costs, objective, options.ga)
        thresholds, method = search.thresholds, "ga"
    seconds = time.perf_counter() - start
    grid = global_best = None
    if options.compare:
        grid = grid_search(table, costs, objective, options.grid_steps)
        global_best = global_threshold_search(table, costs, objective, options.global_steps)
    outcome = TuneOutcome(
        objective=objective,
        method=method,
        thresholds=thresholds,
        tune=split_report(table, thresholds, costs, options),
        seconds=seconds,
        search=search,
        pareto=pareto,
        grid=grid,
        global_threshold=global_best,
        test=None
        if test_table is None
        else split_report(test_table, thresholds, costs, test_options or options),
        certification=certification,
    )
    ratio = outcome.ratio_to(grid)
    if grid is not None and ratio is not None:
        logger.info(
            "%s fitness %.4f = %.2f%% of the grid optimum %.4f (%.2fs vs %.2fs)",
            method,
            outcome.fitness,
            100 * ratio,
            grid.fitness,
            seconds,
            grid.seconds,
        )
    return outcome
