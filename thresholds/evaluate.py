"""Vectorised scoring of threshold vectors on calibration arrays (seed 004 Alg. 1).

Decision rule, identical to the runtime: exit k accepts a row when its max probability is
strictly greater than t_k (t = 1.0 disables an exit); the first accepting exit answers; a row no
exit accepts gets the fallback ("ensemble": argmax of the mean of all K exits' probabilities,
"last": exit K's answer, still counted as a fallback row, or "plain": the plain model's answer).
A row answered at exit k ran segments 1..k; a fallback row ran all K, or with "plain" the
segments up to the last enabled exit and the plain graph (what that costs, including disabled
exits run without their heads, is `thresholds.costs`).

Everything that does not depend on the thresholds (max probabilities, per-exit and fallback
correctness) is computed once in `build_exit_table`, so scoring a population of P vectors is a
handful of P×N numpy passes. Besides the correct rows, each vector's *discordant* rows (answer
right where the baseline is wrong, or the reverse) are counted: the paired confidence bound of
`thresholds.objectives` needs them. The baseline is the table's reference model when it has one
(the plain model a user would otherwise deploy, run on the same rows), else its final exit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from core.decision import FALLBACKS
from thresholds.costs import CostModel
from thresholds.errors import TuningError

logger = logging.getLogger(__name__)

# Bound on P×N cells scored at once, so huge populations or splits do not exhaust memory.
_MAX_CELLS = 1 << 24


def _mask_dtype(num_bits: int) -> type[np.unsignedinteger]:
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if num_bits <= np.iinfo(dtype).bits:
            return dtype
    raise TuningError(f"at most 63 exits are supported, got {num_bits - 1}")


@dataclass(frozen=True, eq=False)
class ExitTable:
    """Threshold-independent facts about N calibration rows and K exits."""

    max_probs: np.ndarray  # N×K float32: each exit's max probability
    correct: np.ndarray  # N×(K+1) bool: exit k right (k < K), fallback right (column K)
    fallback: str
    num_classes: int
    # N×K bool: exit k predicts the final exit's class (None when built without predictions);
    # what a label-free "stop once the answer will not change" router needs. With fallback
    # "plain" the class full depth answers is the plain model's (None without its predictions).
    agrees_final: np.ndarray | None = None
    # N bool: whether a reference model (the plain model the early exits are compared with) is
    # right on each row; None = the baseline is the final exit on the same rows.
    reference_correct: np.ndarray | None = None
    # Derived layouts for the hot loop: exit-major float64 max probs, packed correctness bits,
    # and the baseline's correctness in the same dtype (to count discordant rows).
    _max_probs_t: np.ndarray = field(init=False, repr=False)
    _correct_bits: np.ndarray = field(init=False, repr=False)
    _baseline_bits: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        k1 = self.correct.shape[1]
        dtype = _mask_dtype(k1)
        weights = (np.ones(1, dtype=dtype) << np.arange(k1, dtype=dtype)).astype(dtype)
        bits = (self.correct.astype(dtype) * weights).sum(axis=1, dtype=dtype)
        object.__setattr__(self, "_max_probs_t", np.ascontiguousarray(self.max_probs.T, np.float64))
        object.__setattr__(self, "_correct_bits", bits)
        object.__setattr__(self, "_baseline_bits", self.baseline_correct.astype(dtype))

    @property
    def num_rows(self) -> int:
        return int(self.max_probs.shape[0])

    def take(self, rows: np.ndarray) -> ExitTable:
        """The same facts for a subset of the rows (indices or a mask), e.g. to hold some back."""
        return ExitTable(
            self.max_probs[rows],
            self.correct[rows],
            self.fallback,
            self.num_classes,
            None if self.agrees_final is None else self.agrees_final[rows],
            None if self.reference_correct is None else self.reference_correct[rows],
        )

    @property
    def num_exits(self) -> int:
        return int(self.max_probs.shape[1])

    def exit_accuracies(self) -> list[float]:
        """Accuracy (percent) of each exit answering every row, then of the fallback."""
        counts = np.count_nonzero(self.correct, axis=0)
        return [100.0 * int(c) / self.num_rows for c in counts]

    @property
    def final_accuracy(self) -> float:
        """The final exit's accuracy (percent): the default baseline of eq. 7."""
        return 100.0 * int(np.count_nonzero(self.correct[:, self.num_exits - 1])) / self.num_rows

    @property
    def baseline_correct(self) -> np.ndarray:
        """N bool: the baseline's correctness on each row (the reference model's, else the
        final exit's); discordant rows are counted against it."""
        if self.reference_correct is not None:
            return self.reference_correct
        return self.correct[:, self.max_probs.shape[1] - 1]

    @property
    def baseline_accuracy(self) -> float:
        """The baseline's accuracy (percent) on these rows: the reference model's when the
        table has one, else the final exit's."""
        return 100.0 * int(np.count_nonzero(self.baseline_correct)) / self.num_rows


def _check_rows(name: str, values: np.ndarray | None, n: int) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values)
    if array.shape != (n,) or array.dtype != np.bool_:
        raise TuningError(
            f"{name} must be {n} booleans, got {array.dtype} of shape {list(array.shape)}"
        )
    return array


def build_exit_table(
    exit_probs: np.ndarray,
    labels: np.ndarray,
    fallback: str = "ensemble",
    reference_correct: np.ndarray | None = None,
    plain_correct: np.ndarray | None = None,
    plain_predictions: np.ndarray | None = None,
) -> ExitTable:
    """Precompute max probabilities and correctness from N×K×C probabilities and N labels;
    `reference_correct` (N bool) is a reference model's correctness on the same rows, and
    `plain_correct` (N bool) the bundle's own plain graph's, which fallback "plain" answers with
    (or its `plain_predictions`, N classes, which also give the agreement with full depth).

    Raises TuningError on empty data, wrong shapes, labels outside [0, C) or non-finite values.
    """
    if fallback not in FALLBACKS:
        raise TuningError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    probs = np.asarray(exit_probs)
    labels = np.asarray(labels)
    if probs.ndim != 3:
        raise TuningError(f"exit_probs must be N×K×C, got shape {list(probs.shape)}")
    n, k, c = probs.shape
    if n == 0:
        raise TuningError("calibration data is empty (0 rows)")
    if k == 0 or c < 2:
        raise TuningError(f"exit_probs needs at least 1 exit and 2 classes, got K={k}, C={c}")
    if labels.shape != (n,):
        raise TuningError(f"labels must have shape [{n}], got {list(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TuningError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= c:
        raise TuningError(f"labels must lie in [0, {c}), got [{labels.min()}, {labels.max()}]")
    if not np.isfinite(probs).all():
        raise TuningError("exit_probs contains NaN or infinite values")
    probs = probs.astype(np.float32, copy=False)
    predictions = probs.argmax(axis=2)  # N×K
    correct = np.empty((n, k + 1), dtype=bool)
    correct[:, :k] = predictions == labels[:, None]
    reference = _check_rows("reference correctness", reference_correct, n)
    plain_pred = None
    if plain_predictions is not None:
        plain_pred = np.asarray(plain_predictions)
        if plain_pred.shape != (n,) or not np.issubdtype(plain_pred.dtype, np.integer):
            raise TuningError(f"plain-model predictions must be {n} class indices")
        if plain_correct is None:
            plain_correct = plain_pred == labels
    plain = _check_rows("plain-model correctness", plain_correct, n)
    if fallback == "ensemble":
        correct[:, k] = probs.mean(axis=1).argmax(axis=1) == labels
    elif fallback == "plain":
        if plain is None:
            raise TuningError(
                "fallback 'plain' needs the plain model's answers on the same rows: tune on a "
                "dataset split (not a saved calibration file) of a bundle with its plain graph"
            )
        correct[:, k] = plain
    else:
        correct[:, k] = correct[:, k - 1]
    agrees: np.ndarray | None = predictions == predictions[:, k - 1 : k]
    if fallback == "plain":
        agrees = None if plain_pred is None else predictions == plain_pred[:, None]
    return ExitTable(probs.max(axis=2), correct, fallback, c, agrees, reference)


@dataclass(frozen=True)
class Metrics:
    """One threshold vector scored on one table; accuracy in percent."""

    thresholds: tuple[float, ...]
    accuracy: float
    acceleration: float
    mean_cost: float
    exit_fractions: tuple[float, ...]  # K exits, then the fallback
    # Rows whose answer is right where the baseline's is wrong, or wrong where it is right.
    discordant_rows: int
    correct_rows: int  # rows answered right (accuracy = 100 · correct_rows / rows)

    def to_dict(self) -> dict[str, object]:
        return {
            "thresholds": list(self.thresholds),
            "accuracy": self.accuracy,
            "acceleration": self.acceleration,
            "mean_cost": self.mean_cost,
            "exit_fractions": list(self.exit_fractions),
        }


@dataclass(frozen=True, eq=False)
class PopulationMetrics:
    """P threshold vectors scored at once; row p of every array belongs to vector p."""

    thresholds: np.ndarray  # P×K
    correct_counts: np.ndarray  # P
    discordant_counts: np.ndarray  # P: rows right/wrong where the baseline is wrong/right
    exit_counts: np.ndarray  # P×(K+1)
    accuracy: np.ndarray  # P, percent
    mean_cost: np.ndarray  # P, cost units per row
    acceleration: np.ndarray  # P

    def __len__(self) -> int:
        return int(self.accuracy.shape[0])

    @property
    def exit_fractions(self) -> np.ndarray:
        fractions: np.ndarray = self.exit_counts / self.exit_counts.sum(axis=1, keepdims=True)
        return fractions

    def row(self, p: int) -> Metrics:
        return Metrics(
            thresholds=tuple(float(t) for t in self.thresholds[p]),
            accuracy=float(self.accuracy[p]),
            acceleration=float(self.acceleration[p]),
            mean_cost=float(self.mean_cost[p]),
            exit_fractions=tuple(float(f) for f in self.exit_fractions[p]),
            discordant_rows=int(self.discordant_counts[p]),
            correct_rows=int(self.correct_counts[p]),
        )


def check_thresholds(thresholds: np.ndarray, num_exits: int) -> np.ndarray:
    """Return thresholds as a float64 P×K matrix; TuningError on a bad shape or range."""
    matrix = np.asarray(thresholds, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[1] != num_exits:
        raise TuningError(
            f"expected thresholds of shape [P, {num_exits}], got {list(matrix.shape)}"
        )
    if not np.isfinite(matrix).all() or matrix.min(initial=0.0) < 0 or matrix.max(initial=0) > 1:
        raise TuningError("thresholds must be finite numbers in [0, 1]")
    return matrix


def _exit_counts_chunk(
    table: ExitTable, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correct rows (P), discordant rows (P) and rows per exit then fallback (P×(K+1))."""
    p, n, k = thresholds.shape[0], table.num_rows, table.num_exits
    # first[p, n] = index of the first accepting exit (0-based), K for the fallback.
    first = np.full((p, n), k, dtype=np.uint8)
    accept = np.empty((p, n), dtype=bool)
    step = np.empty((p, n), dtype=np.uint8)
    for j in range(k - 1, -1, -1):
        np.greater(table._max_probs_t[j][None, :], thresholds[:, j, None], out=accept)
        # first = j where exit j accepts, else unchanged; branch-free arithmetic is ~7× faster
        # than a masked copy (np.copyto(first, j, where=accept)). first ≥ j, so no underflow.
        np.subtract(first, j, out=step)
        step *= accept
        first -= step
    right = np.right_shift(table._correct_bits[None, :], first.astype(table._correct_bits.dtype))
    right &= 1
    correct_counts = right.sum(axis=1, dtype=np.int64)
    right ^= table._baseline_bits[None, :]  # now 1 where the answer and the baseline disagree
    discordant_counts = right.sum(axis=1, dtype=np.int64)
    exit_counts = np.stack([np.count_nonzero(first == j, axis=1) for j in range(k + 1)], axis=1)
    return correct_counts, discordant_counts, exit_counts


def evaluate_population(
    table: ExitTable, thresholds: np.ndarray, costs: CostModel
) -> PopulationMetrics:
    """Score a P×K matrix (or one K-vector) of thresholds: accuracy, exit counts, acceleration."""
    matrix = check_thresholds(thresholds, table.num_exits)
    if costs.num_exits != table.num_exits:
        raise TuningError(
            f"cost model has {costs.num_exits} segments but the data has {table.num_exits} exits"
        )
    if table.num_exits > 254:
        raise TuningError("at most 254 exits are supported")
    chunk = max(1, _MAX_CELLS // table.num_rows)
    corrects, discords, counts = [], [], []
    for start in range(0, matrix.shape[0], chunk):
        c, d, e = _exit_counts_chunk(table, matrix[start : start + chunk])
        corrects.append(c)
        discords.append(d)
        counts.append(e)
    correct_counts = np.concatenate(corrects)
    exit_counts = np.concatenate(counts)
    n = table.num_rows
    if costs.stage_costs is None and table.fallback != "plain":
        mean_cost = exit_counts @ costs.exit_costs() / n
    else:
        per_exit = costs.exit_cost_matrix(matrix, table.fallback, table.num_classes)
        mean_cost = (exit_counts * per_exit).sum(axis=1) / n
    return PopulationMetrics(
        thresholds=matrix,
        correct_counts=correct_counts,
        discordant_counts=np.concatenate(discords),
        exit_counts=exit_counts,
        accuracy=100.0 * correct_counts / n,
        mean_cost=mean_cost,
        acceleration=costs.full_model / mean_cost,
    )


def evaluate(table: ExitTable, thresholds: np.ndarray, costs: CostModel) -> Metrics:
    """Score one threshold vector."""
    return evaluate_population(table, np.asarray(thresholds, dtype=np.float64), costs).row(0)
