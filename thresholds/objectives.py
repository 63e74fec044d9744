"""What the search maximises: eq. 7 (β mode) or acceleration under an accuracy floor (max-drop).

- β mode (seed 004 eq. 7): fitness = acceleration + β·(accuracy − baseline).
- max-drop mode: maximise acceleration subject to accuracy ≥ baseline − EPS (points). The floor is
  hard: every infeasible vector scores below every feasible one (feasible scores are
  accelerations, always > 0; infeasible ones are minus the shortfall in points).
- max-drop with a confidence Z > 0: the floor applies to a one-sided lower confidence bound on
  the accuracy difference instead of the difference measured on the tuning rows, so that the
  chosen thresholds keep their margin on new rows. With d_i = correct_dynamic_i −
  correct_final_i ∈ {−1, 0, 1} on the same N rows, mean(d) = (accuracy − baseline) / 100,
  var(d) = mean(|d|) − mean(d)² (|d| = 1 on discordant rows), SE = sqrt(var(d) / N) and the
  constraint is 100·(mean(d) − Z·SE) ≥ −EPS. Z = 0 is exactly the plain floor.
Accuracy and baseline are in percent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from thresholds.errors import TuningError
from thresholds.evaluate import Metrics, PopulationMetrics

DEFAULT_BETA = 1.0
# Accuracies are ratios of integer counts; this absorbs float rounding, never a whole row.
_FEASIBLE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class AccuracyBound:
    """The accuracy difference to the baseline, its standard error and its lower bound (points).

    Arrays of P values, or floats for one vector; `difference` < 0 is a drop.
    """

    difference: np.ndarray
    se: np.ndarray
    lower_bound: np.ndarray  # difference − Z·se


def accuracy_bound(
    accuracy: np.ndarray | float,
    baseline: float,
    rows: int,
    confidence: float,
    discordant: np.ndarray | float | None = None,
) -> AccuracyBound:
    """Lower confidence bound on accuracy − baseline (points) over `rows` rows.

    With `discordant` (rows whose correctness differs from the baseline exit's on the same rows)
    the SE is the paired one of the module docstring; without it, the baseline is a fixed number
    and the SE is the binomial one of the accuracy alone, sqrt(p·(1 − p) / N).
    """
    if rows < 1:
        raise TuningError(f"a confidence bound needs at least 1 row, got {rows}")
    accuracy = np.asarray(accuracy, dtype=np.float64)
    difference = accuracy - baseline
    if discordant is None:
        share = accuracy / 100.0
        variance = share * (1.0 - share)
    else:
        mean_d = difference / 100.0
        variance = np.asarray(discordant, dtype=np.float64) / rows - mean_d * mean_d
    se = 100.0 * np.sqrt(np.maximum(variance, 0.0) / rows)  # max: float rounding near 0
    return AccuracyBound(difference=difference, se=se, lower_bound=difference - confidence * se)


@dataclass(frozen=True)
class Objective:
    baseline: float  # percent
    beta: float = DEFAULT_BETA
    max_drop: float | None = None  # points; None = β mode
    confidence: float = 0.0  # Z of the lower bound in max-drop mode; 0 = the plain floor
    rows: int = 1  # rows every scored accuracy was measured on (for the bound's SE)
    # The baseline is the final exit's accuracy on the same rows: the bound is paired and scoring
    # needs each vector's discordant-row count. False for a given baseline number.
    paired: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.baseline) or not 0.0 <= self.baseline <= 100.0:
            raise TuningError(f"baseline accuracy must be in [0, 100] percent, got {self.baseline}")
        if not math.isfinite(self.beta) or self.beta < 0:
            raise TuningError(f"--beta must be a finite number >= 0, got {self.beta}")
        if self.max_drop is not None and (
            not math.isfinite(self.max_drop) or not 0.0 <= self.max_drop <= 100.0
        ):
            raise TuningError(f"--max-drop must be in [0, 100] points, got {self.max_drop}")
        check_confidence(self.confidence, self.max_drop)
        if self.rows < 1:
            raise TuningError(f"rows must be >= 1, got {self.rows}")

    @property
    def mode(self) -> str:
        return "beta" if self.max_drop is None else "max_drop"

    @property
    def min_accuracy(self) -> float:
        """The accuracy floor in max-drop mode (-inf in β mode), before any confidence margin."""
        return -math.inf if self.max_drop is None else self.baseline - self.max_drop

    @property
    def min_difference(self) -> float:
        """The floor on accuracy − baseline in points: −EPS (-inf in β mode)."""
        return -math.inf if self.max_drop is None else -self.max_drop

    @property
    def uses_bound(self) -> bool:
        """Whether feasibility is judged on the lower confidence bound (max-drop with Z > 0)."""
        return self.max_drop is not None and self.confidence > 0.0

    @property
    def needs_discordant(self) -> bool:
        """Whether `score`/`feasible` need each vector's discordant-row count."""
        return self.uses_bound and self.paired

    def bound(
        self, accuracy: np.ndarray | float, discordant: np.ndarray | float | None = None
    ) -> AccuracyBound:
        """The lower confidence bound at this objective's Z (paired when `paired`)."""
        if self.paired and discordant is None:
            raise TuningError("a paired confidence bound needs the discordant-row counts")
        return accuracy_bound(
            accuracy,
            self.baseline,
            self.rows,
            self.confidence,
            discordant if self.paired else None,
        )

    def _gap(
        self, accuracy: np.ndarray, discordant: np.ndarray | float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(feasible, shortfall in points) for each vector."""
        if not self.uses_bound:
            # Literally the floor before the margin existed, so Z = 0 picks the same vectors.
            feasible = accuracy >= self.min_accuracy - _FEASIBLE_TOLERANCE
            return feasible, self.min_accuracy - accuracy
        lower = self.bound(accuracy, discordant).lower_bound
        feasible = lower >= self.min_difference - _FEASIBLE_TOLERANCE
        return feasible, self.min_difference - lower

    def feasible(
        self, accuracy: np.ndarray | float, discordant: np.ndarray | float | None = None
    ) -> np.ndarray:
        """Whether each vector meets the floor; `discordant` is needed when `needs_discordant`."""
        return self._gap(np.asarray(accuracy, dtype=np.float64), discordant)[0]

    def eq7(self, accuracy: np.ndarray | float, acceleration: np.ndarray | float) -> np.ndarray:
        """Seed 004 eq. 7 with this objective's β and baseline."""
        return np.asarray(acceleration) + self.beta * (np.asarray(accuracy) - self.baseline)

    def score(
        self,
        accuracy: np.ndarray | float,
        acceleration: np.ndarray | float,
        discordant: np.ndarray | float | None = None,
    ) -> np.ndarray:
        """The value the search maximises (higher is better)."""
        accuracy = np.asarray(accuracy, dtype=np.float64)
        acceleration = np.asarray(acceleration, dtype=np.float64)
        if self.max_drop is None:
            return self.eq7(accuracy, acceleration)
        feasible, shortfall = self._gap(accuracy, discordant)
        return np.where(feasible, acceleration, -np.maximum(shortfall, 1e-12))

    def score_of(self, metrics: Metrics) -> float:
        """`score` of one evaluated threshold vector."""
        return float(self.score(metrics.accuracy, metrics.acceleration, metrics.discordant_rows))

    def score_population(self, scored: PopulationMetrics) -> np.ndarray:
        """`score` of every vector of an evaluated population."""
        return self.score(scored.accuracy, scored.acceleration, scored.discordant_counts)

    def floor_text(self) -> str:
        """The max-drop floor in words, for error messages."""
        text = f"the accuracy floor {self.min_accuracy:.2f}%"
        return text + (f" with a Z = {self.confidence:g} margin" if self.uses_bound else "")

    def describe(self) -> dict[str, Any]:
        if self.max_drop is None:
            return {"mode": "beta", "beta": self.beta, "baseline_accuracy": self.baseline}
        return {
            "mode": "max_drop",
            "max_drop": self.max_drop,
            "confidence": self.confidence,
            "baseline_accuracy": self.baseline,
            "min_accuracy": self.min_accuracy,
        }


def check_confidence(confidence: float | None, max_drop: float | None) -> None:
    """TuningError unless `confidence` is a finite Z >= 0, and only > 0 with a max-drop floor."""
    if confidence is None:
        return
    if not math.isfinite(confidence) or confidence < 0:
        raise TuningError(f"--confidence must be a finite number >= 0, got {confidence}")
    if confidence > 0 and max_drop is None:
        raise TuningError("--confidence goes with --max-drop")
