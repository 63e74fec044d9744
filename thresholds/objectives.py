"""What the search maximises: eq. 7 (β mode) or acceleration under an accuracy floor (max-drop).

- β mode (seed 004 eq. 7): fitness = acceleration + β·(accuracy − baseline).
- max-drop mode: maximise acceleration subject to accuracy ≥ baseline − EPS (points). The floor is
  hard: every infeasible vector scores below every feasible one (feasible scores are
  accelerations, always > 0; infeasible ones are minus the shortfall in points).
Accuracy and baseline are in percent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from thresholds.errors import TuningError

DEFAULT_BETA = 1.0
# Accuracies are ratios of integer counts; this absorbs float rounding, never a whole row.
_FEASIBLE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Objective:
    baseline: float  # percent
    beta: float = DEFAULT_BETA
    max_drop: float | None = None  # points; None = β mode

    def __post_init__(self) -> None:
        if not math.isfinite(self.baseline) or not 0.0 <= self.baseline <= 100.0:
            raise TuningError(f"baseline accuracy must be in [0, 100] percent, got {self.baseline}")
        if not math.isfinite(self.beta) or self.beta < 0:
            raise TuningError(f"--beta must be a finite number >= 0, got {self.beta}")
        if self.max_drop is not None and (
            not math.isfinite(self.max_drop) or not 0.0 <= self.max_drop <= 100.0
        ):
            raise TuningError(f"--max-drop must be in [0, 100] points, got {self.max_drop}")

    @property
    def mode(self) -> str:
        return "beta" if self.max_drop is None else "max_drop"

    @property
    def min_accuracy(self) -> float:
        """The accuracy floor in max-drop mode (-inf in β mode)."""
        return -math.inf if self.max_drop is None else self.baseline - self.max_drop

    def feasible(self, accuracy: np.ndarray | float) -> np.ndarray:
        return np.asarray(accuracy) >= self.min_accuracy - _FEASIBLE_TOLERANCE

    def eq7(self, accuracy: np.ndarray | float, acceleration: np.ndarray | float) -> np.ndarray:
        """Seed 004 eq. 7 with this objective's β and baseline."""
        return np.asarray(acceleration) + self.beta * (np.asarray(accuracy) - self.baseline)

    def score(self, accuracy: np.ndarray | float, acceleration: np.ndarray | float) -> np.ndarray:
        """The value the search maximises (higher is better)."""
        accuracy = np.asarray(accuracy, dtype=np.float64)
        acceleration = np.asarray(acceleration, dtype=np.float64)
        if self.max_drop is None:
            return self.eq7(accuracy, acceleration)
        shortfall = self.min_accuracy - accuracy
        return np.where(self.feasible(accuracy), acceleration, -np.maximum(shortfall, 1e-12))

    def describe(self) -> dict[str, Any]:
        if self.max_drop is None:
            return {"mode": "beta", "beta": self.beta, "baseline_accuracy": self.baseline}
        return {
            "mode": "max_drop",
            "max_drop": self.max_drop,
            "baseline_accuracy": self.baseline,
            "min_accuracy": self.min_accuracy,
        }
