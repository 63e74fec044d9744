"""Drift of the traffic's difficulty: exit 1's top-class probability on recent rows against the
rows the thresholds were tuned on.

Exit 1 answers first and sees every row, so its confidence is the earliest, label-free sign
that traffic got harder (noise, blur, a new camera) — it moves before agreement with full depth
can be measured on enough rows. The statistic is the two-sample Kolmogorov–Smirnov distance
(0 = same distribution, 1 = disjoint).

The reference travels in `thresholds.json` (`tuned.reference`) as REFERENCE_POINTS quantiles of
the tuning rows, so a server can compute drift from its first sampled rows, whether the
thresholds were tuned offline (`earlyexit-tune`) or on a live window that has since left the
shadow store. 101 quantiles are ~1 KB and resolve the CDF to 1 %: finer than the KS noise of
any window a server keeps (≈ 1.36/√n, 4 % at 1 000 rows).

The record also carries the thresholds' agreement with full depth on those rows (`agreement`:
the thresholds it holds for, and the percent). Thresholds tuned on labels do not bound
agreement (the shipped ones agree with full depth on ~95 % of clean rows while losing 0.6
points of accuracy), so the server's drop alert measures how far live disagreement has risen
*above the disagreement at tuning time*, and clean traffic does not trip it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

from core.decision import agrees_with_final

logger = logging.getLogger(__name__)

REFERENCE_SIGNAL = "exit_1_max_probability"
REFERENCE_POINTS = 101


def exit1_confidence(exit_probs: np.ndarray) -> np.ndarray:
    """Exit 1's top-class probability per row of an (N, K, C) array of exit probabilities."""
    return np.asarray(exit_probs[:, 0].max(axis=1), dtype=np.float64)


def confidence_reference(
    exit_probs: np.ndarray,
    source: str,
    points: int = REFERENCE_POINTS,
    *,
    thresholds: Sequence[float] | None = None,
    fallback: str = "ensemble",
    plain_probs: np.ndarray | None = None,
) -> dict[str, Any]:
    """The `tuned.reference` record for these tuning rows: `points` evenly spaced quantiles of
    exit 1's confidence (rounded to 6 digits: far below the KS resolution), the row count and
    where the rows came from (a split name, or "live"); with `thresholds`, also their agreement
    with full depth on these rows."""
    if points < 2:
        raise ValueError(f"a reference needs at least 2 quantiles, not {points}")
    values = exit1_confidence(exit_probs)
    if values.size == 0:
        raise ValueError("a reference needs at least one row")
    quantiles = np.quantile(values, np.linspace(0.0, 1.0, points))
    record: dict[str, Any] = {
        "signal": REFERENCE_SIGNAL,
        "source": source,
        "rows": int(values.size),
        "quantiles": [round(float(q), 6) for q in quantiles],
    }
    if thresholds is not None:
        agree, _ = agrees_with_final(exit_probs, list(thresholds), fallback, plain_probs)
        record["agreement"] = {
            "thresholds": [float(t) for t in thresholds],
            "percent": round(100.0 * float(agree.mean()), 4),
        }
    return record


@dataclass(frozen=True)
class TunedAgreement:
    """Agreement with full depth (percent) that `thresholds` had on the tuning rows."""

    thresholds: tuple[float, ...]
    percent: float

    def drop_for(self, thresholds: Sequence[float]) -> float | None:
        """Disagreement at tuning time (points) when `thresholds` are the ones it was measured
        for; None otherwise (thresholds set by hand since: the record says nothing of them)."""
        if tuple(float(t) for t in thresholds) != self.thresholds:
            return None
        return 100.0 - self.percent


@dataclass(frozen=True)
class QuantileReference:
    """A `tuned.reference` record, read: quantiles of exit 1's confidence on `rows` tuning rows
    from `source`."""

    quantiles: np.ndarray
    rows: int
    source: str
    agreement: TunedAgreement | None = None


def read_reference(record: Any) -> QuantileReference | None:
    """A `tuned.reference` record, or None when there is none or it is not usable (another
    signal, not numbers in [0, 1], decreasing): a hand-edited thresholds.json turns the drift
    statistic off, it never stops the server."""
    if record is None:
        return None
    problem = _reference_problem(record)
    if problem is not None:
        logger.warning("thresholds.json: tuned.reference ignored (%s); drift is off", problem)
        return None
    rows = record.get("rows")
    return QuantileReference(
        quantiles=np.asarray(record["quantiles"], dtype=np.float64),
        rows=rows if isinstance(rows, int) and not isinstance(rows, bool) else 0,
        source=str(record.get("source") or "thresholds.json"),
        agreement=_read_agreement(record.get("agreement")),
    )


def _read_agreement(record: Any) -> TunedAgreement | None:
    """`reference.agreement`, or None when absent or malformed (the drop alert then falls back
    to an absolute budget; drift is unaffected)."""
    if record is None:
        return None
    fields = record if isinstance(record, dict) else {}
    thresholds, percent = fields.get("thresholds"), fields.get("percent")
    if (
        isinstance(thresholds, list)
        and all(_finite_number(t) for t in thresholds)
        and _finite_number(percent)
        and 0.0 <= percent <= 100.0
    ):
        return TunedAgreement(tuple(float(t) for t in thresholds), float(percent))
    logger.warning(
        "thresholds.json: tuned.reference.agreement ignored (needs a list of thresholds and a "
        "percent in [0, 100]); the drop alert uses the absolute budget"
    )
    return None


def _finite_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _reference_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("signal") != REFERENCE_SIGNAL:
        return f"signal is {record.get('signal')!r}, expected {REFERENCE_SIGNAL!r}"
    quantiles = record.get("quantiles")
    if not isinstance(quantiles, list) or len(quantiles) < 2:
        return "quantiles must be a list of at least 2 numbers"
    if not all(_finite_number(q) for q in quantiles):
        return "quantiles must be finite numbers"
    values = np.asarray(quantiles, dtype=np.float64)
    if values.min() < 0.0 or values.max() > 1.0:
        return "quantiles must lie in [0, 1]"
    if np.any(np.diff(values) < 0):
        return "quantiles must not decrease"
    return None


def ks_statistic(reference: np.ndarray, recent: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic between two samples."""
    a, b = np.sort(reference), np.sort(recent)
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / a.size
    cdf_b = np.searchsorted(b, grid, side="right") / b.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


def _quantile_cdf(quantiles: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference CDF at x and its left limit, from evenly spaced quantiles. A value that
    several quantiles share (many rows at probability 1.0) is a point mass: the CDF jumps there
    from the lowest to the highest probability of the tie. Between distinct values it is
    linear."""
    probs = np.linspace(0.0, 1.0, quantiles.size)
    values, first, counts = np.unique(quantiles, return_index=True, return_counts=True)
    p_low, p_high = probs[first], probs[first + counts - 1]
    at = np.searchsorted(values, x, side="right") - 1  # largest distinct value <= x
    inside = at >= 0
    i = np.clip(at, 0, values.size - 1)
    j = np.minimum(i + 1, values.size - 1)
    span = values[j] - values[i]
    slope = np.divide(p_low[j] - p_high[i], span, out=np.zeros_like(span), where=span > 0)
    between = p_high[i] + slope * (x - values[i])
    exact = inside & (x == values[i])
    cdf = np.where(inside, np.where(exact, p_high[i], between), 0.0)
    left = np.where(inside, np.where(exact, p_low[i], between), 0.0)
    return cdf, left


def ks_against_quantiles(quantiles: np.ndarray, recent: np.ndarray) -> float:
    """KS statistic between a sample and a reference given by evenly spaced quantiles: both
    CDFs are compared at every quantile and sample value, from the right and from the left."""
    q = np.sort(np.asarray(quantiles, dtype=np.float64))
    b = np.sort(np.asarray(recent, dtype=np.float64))
    grid = np.concatenate([q, b])
    reference, reference_left = _quantile_cdf(q, grid)
    sample = np.searchsorted(b, grid, side="right") / b.size
    sample_left = np.searchsorted(b, grid, side="left") / b.size
    return float(
        max(np.max(np.abs(reference - sample)), np.max(np.abs(reference_left - sample_left)))
    )
