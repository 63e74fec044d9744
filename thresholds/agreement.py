"""Label-free tuning on live traffic: thresholds whose answers agree with the full model.

A shadow sample holds, for rows the server answered, every exit's probabilities from a full run
of the chain. With the final exit's prediction as the label, "accuracy" becomes agreement with
full depth and the final exit scores 100 %, so `--max-drop EPS` with a confidence Z asks for
agreement ≥ 100 − EPS points at that confidence: the same search and modes as `earlyexit-tune`.
A guarded retune tunes on one part of the sample and accepts the thresholds only if the guard
(the agreement's one-sided lower bound ≥ 100 − EPS) also holds on the part it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from thresholds.costs import CostModel
from thresholds.errors import TuningError
from thresholds.evaluate import ExitTable, build_exit_table, evaluate
from thresholds.objectives import accuracy_bound
from thresholds.search import GAConfig
from thresholds.tuning import TuneOptions, tune

# Below this many rows per part the binomial bound on agreement is too loose to guard anything.
MIN_ROWS_PER_PART = 200


class SampleTooSmall(TuningError):
    """The live sample cannot support a guarded retune yet (the caller answers 409)."""

    def __init__(self, rows: int, needed: int) -> None:
        super().__init__(f"the live sample has {rows} rows; a guarded retune needs {needed}")
        self.rows, self.needed = rows, needed


def agreement_table(
    exit_probs: np.ndarray, fallback: str, plain_probs: np.ndarray | None = None
) -> ExitTable:
    """Exit table whose label is full depth's own prediction (agreement with full depth): the
    final exit's, or with fallback "plain" the plain model's (`plain_probs`, N×C), which then
    answers every row that falls back in agreement with itself."""
    probs = np.asarray(exit_probs)
    if probs.ndim != 3 or probs.shape[0] == 0:
        raise TuningError(f"exit_probs must be a non-empty N×K×C array, got {list(probs.shape)}")
    if fallback != "plain":
        return build_exit_table(probs, probs[:, -1, :].argmax(axis=1), fallback)
    if plain_probs is None or np.shape(plain_probs) != (probs.shape[0], probs.shape[2]):
        raise TuningError("fallback 'plain': the sample needs the plain model's N×C answers")
    labels = np.asarray(plain_probs).argmax(axis=1)
    itself = np.ones(len(labels), dtype=bool)  # the plain model agrees with itself
    return build_exit_table(probs, labels, fallback, itself, plain_predictions=labels)


@dataclass(frozen=True)
class GuardedRetune:
    thresholds: tuple[float, ...]
    eps: float  # points of agreement the thresholds may give up
    confidence: float  # one-sided Z of the guard
    tune_rows: int
    held_out_rows: int
    tune_agreement: float  # percent
    held_out_agreement: float
    held_out_lower_bound: float  # percent: agreement − Z·SE on the held-out part
    acceleration: float  # on the held-out part
    guard_holds: bool

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def split_sample(rows: int, held_out_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic random split of row indices into (tune, held out)."""
    if not 0.0 < held_out_fraction < 1.0:
        raise TuningError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    order = np.random.default_rng(seed).permutation(rows)
    cut = rows - max(1, int(round(rows * held_out_fraction)))
    return np.sort(order[:cut]), np.sort(order[cut:])


def guarded_retune(
    exit_probs: np.ndarray,
    fallback: str,
    costs: CostModel,
    eps: float,
    confidence: float,
    held_out_fraction: float = 0.3,
    seed: int = 0,
    ga: GAConfig | None = None,
    plain_probs: np.ndarray | None = None,
) -> GuardedRetune:
    """Tune on part of a shadow sample for agreement ≥ 100 − `eps` at one-sided `confidence`,
    then check that guard on the held-out rest. Raises SampleTooSmall / TuningError."""
    if not 0.0 <= eps <= 100.0:
        raise TuningError(f"eps must be in [0, 100] points, got {eps}")
    if not 0.0 <= confidence <= 10.0:
        raise TuningError(f"confidence (Z) must be in [0, 10], got {confidence}")
    probs = np.asarray(exit_probs)
    needed = int(np.ceil(MIN_ROWS_PER_PART / min(held_out_fraction, 1 - held_out_fraction)))
    if probs.ndim != 3 or probs.shape[0] < needed:
        raise SampleTooSmall(int(probs.shape[0]) if probs.ndim else 0, needed)
    tune_idx, held_idx = split_sample(probs.shape[0], held_out_fraction, seed)
    plain = None if plain_probs is None else np.asarray(plain_probs)
    tune_table = agreement_table(
        probs[tune_idx], fallback, None if plain is None else plain[tune_idx]
    )
    held_table = agreement_table(
        probs[held_idx], fallback, None if plain is None else plain[held_idx]
    )
    options = TuneOptions(max_drop=eps, confidence=confidence or None, compare=False)
    if ga is not None:
        options = replace(options, ga=ga)
    outcome = tune(tune_table, costs, options)
    held = evaluate(held_table, np.asarray(outcome.thresholds), costs)
    bound = accuracy_bound(held.accuracy, 100.0, held_table.num_rows, confidence, None)
    lower = 100.0 + float(bound.lower_bound)
    return GuardedRetune(
        thresholds=tuple(float(t) for t in outcome.thresholds),
        eps=eps,
        confidence=confidence,
        tune_rows=tune_table.num_rows,
        held_out_rows=held_table.num_rows,
        tune_agreement=float(outcome.tune.metrics.accuracy),
        held_out_agreement=float(held.accuracy),
        held_out_lower_bound=lower,
        acceleration=float(held.acceleration),
        guard_holds=bool(lower >= 100.0 - eps - 1e-9),
    )
