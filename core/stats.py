"""Paired significance for accuracy differences on the same rows: training comparisons and
tuning against the plain model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class McNemar:
    """Exact two-sided McNemar test of model A vs model B on the same rows.

    `only_a` rows A got right and B wrong, `only_b` the reverse; the p-value is the exact
    binomial probability, under "both err equally often on discordant rows", of a split at
    least as uneven as the one observed."""

    rows: int
    only_a: int
    only_b: int
    p_value: float

    @property
    def difference_points(self) -> float:
        """Accuracy of B minus accuracy of A, in percentage points."""
        return 100.0 * (self.only_b - self.only_a) / self.rows

    def to_dict(self) -> dict[str, float | int]:
        data: dict[str, float | int] = asdict(self)
        data["difference_points"] = self.difference_points
        return data


def _log_binom_tail(n: int, k: int) -> float:
    """log P(X ≤ k) for X ~ Binomial(n, 1/2), summed in log space (n up to millions)."""
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(k + 1)
    ]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> McNemar:
    """Exact McNemar test on two boolean vectors of per-row correctness (same rows, same order)."""
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError("mcnemar needs two non-empty 1-D correctness vectors of one length")
    return mcnemar_counts(int(a.size), int(np.sum(a & ~b)), int(np.sum(~a & b)))


def mcnemar_counts(rows: int, only_a: int, only_b: int) -> McNemar:
    """The same test from its counts: `rows` compared, `only_a` right for A alone, `only_b` for B."""
    if rows < 1 or only_a < 0 or only_b < 0 or only_a + only_b > rows:
        raise ValueError(f"impossible McNemar counts: {only_a} + {only_b} of {rows} rows")
    n = only_a + only_b
    p = 1.0 if n == 0 else min(1.0, 2.0 * math.exp(_log_binom_tail(n, min(only_a, only_b))))
    return McNemar(rows=rows, only_a=only_a, only_b=only_b, p_value=p)


@dataclass(frozen=True)
class PooledDifference:
    """B − A over several replicates (training seeds) scored on the same rows.

    Per row, d = the mean over replicates of (B right) − (A right); the report is mean(d), its
    standard error over rows and a two-sided normal p-value. The row is the sampling unit: a
    test image scored in every seed counts once. Adding up the seeds' McNemar counts instead
    would count it once per seed, as if the seeds had been tested on fresh images, and
    overstate the evidence. What it does not cover is the spread between training seeds
    beyond the ones run: it asks whether B beats A on these rows, averaged over these seeds."""

    rows: int
    replicates: int
    difference_points: float
    se_points: float
    p_value: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def pooled_difference(
    a_correct: Sequence[np.ndarray], b_correct: Sequence[np.ndarray]
) -> PooledDifference:
    """`PooledDifference` of per-replicate boolean correctness vectors (replicate r of A is
    paired with replicate r of B; every vector covers the same rows in the same order)."""
    if len(a_correct) != len(b_correct) or not a_correct:
        raise ValueError(
            "pooled_difference needs the same, non-zero number of replicates of A and B"
        )
    a = np.asarray([np.asarray(x, dtype=bool) for x in a_correct])
    b = np.asarray([np.asarray(x, dtype=bool) for x in b_correct])
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] < 2:
        raise ValueError(
            "pooled_difference needs correctness vectors of one length, 2 rows or more"
        )
    d = (b.astype(np.float64) - a.astype(np.float64)).mean(axis=0)
    mean = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    if se == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
    else:
        p = math.erfc(abs(mean) / se / math.sqrt(2.0))
    return PooledDifference(
        rows=int(d.size),
        replicates=int(a.shape[0]),
        difference_points=100.0 * mean,
        se_points=100.0 * se,
        p_value=p,
    )
