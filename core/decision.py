"""The early-exit decision rule, the one definition every package applies.

Exit k accepts a row when its max probability, compared in float64, is strictly greater than
t_k (t = 1.0 disables an exit: no probability exceeds it); the first accepting exit answers; a
row no exit accepts gets the fallback ("ensemble": mean over ALL K exits' probabilities in
float32, `exit_probs.mean(axis=1)`; "last": exit K's probabilities; "plain": the plain model's
probabilities, a cascade into the model a user would otherwise deploy), reported as exit 0
(`FALLBACK_EXIT`). `decide` is the reference over calibration arrays; the serving runtime applies
the same rule segment by segment (`accept_mask`, `accepts_row`) and the thresholds evaluator
reproduces it vectorised, with tests holding each to `decide`.

Which exit heads a runtime may skip follows from the rule: when exit K accepts every row that
reaches it (t_K below 1/C, with `FALLBACK_MARGIN` for float32 rounding of a near-uniform
softmax) no row falls back, so a disabled exit's probabilities can never matter and, with
fallback "last" or "plain", they never do (`can_fall_back`, `skipped_heads`).

With fallback "plain" a row no exit accepts runs the plain graph on the input (it shares no
features with the chain), so segments after the last enabled exit would compute nothing anyone
reads: the chain stops there (`chain_segments`). With every exit disabled every row goes
straight to the plain model: the bundle then serves exactly the plain model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from core.calibration import CalibrationError

FALLBACK_EXIT = 0
FALLBACKS = ("ensemble", "last", "plain")
# Exit K's max probability is at least 1/C; float32 rounding of a near-uniform softmax can land
# just under it, so "t_K < 1/C accepts every row" is only trusted with this relative margin.
FALLBACK_MARGIN = 1e-3


def accept_mask(max_probs: npt.ArrayLike, threshold: float) -> npt.NDArray[np.bool_]:
    """Rows an exit accepts. Compared in float64 so float32 probabilities and Python-float
    thresholds give the same answer here, in the runtime and in the thresholds evaluator."""
    return np.asarray(max_probs, dtype=np.float64) > float(threshold)


def decide(
    exit_probs: npt.ArrayLike,
    thresholds: Sequence[float],
    fallback: str = "ensemble",
    plain_probs: npt.ArrayLike | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Apply the early-exit rule to N×K×C probabilities (`plain_probs`: the plain model's N×C
    probabilities on the same rows, needed by fallback "plain" once a row falls back).

    Returns (answer probabilities N×C float32, exits int64 N with 1..K or 0 for the fallback).
    """
    probs = np.asarray(exit_probs, dtype=np.float32)
    if probs.ndim != 3:
        raise CalibrationError(f"exit_probs must be N×K×C, got shape {list(probs.shape)}")
    n, k, _ = probs.shape
    if len(thresholds) != k:
        raise CalibrationError(f"expected {k} thresholds, got {len(thresholds)}")
    if fallback not in FALLBACKS:
        raise CalibrationError(f"unknown fallback {fallback!r}")
    plain = None
    if fallback == "plain" and plain_probs is not None:
        plain = np.asarray(plain_probs, dtype=np.float32)
        if plain.shape != (n, probs.shape[2]):
            raise CalibrationError(
                f"plain_probs must be {n}×{probs.shape[2]}, got shape {list(plain.shape)}"
            )
    exits = np.full(n, FALLBACK_EXIT, dtype=np.int64)
    undecided = np.ones(n, dtype=bool)
    max_probs = probs.max(axis=2)
    for j in range(k):
        take = undecided & accept_mask(max_probs[:, j], thresholds[j])
        exits[take] = j + 1
        undecided &= ~take
    answers = np.empty((n, probs.shape[2]), dtype=np.float32)
    decided = exits > 0
    answers[decided] = probs[np.flatnonzero(decided), exits[decided] - 1]
    if undecided.any():
        if fallback == "plain":
            if plain is None:
                raise CalibrationError(
                    "fallback 'plain': rows fall back, but the plain model's probabilities "
                    "were not given"
                )
            answers[undecided] = plain[undecided]
        else:
            rest = probs[undecided]
            answers[undecided] = rest.mean(axis=1) if fallback == "ensemble" else rest[:, -1]
    return answers, exits


def agrees_with_final(
    exit_probs: npt.ArrayLike,
    thresholds: Sequence[float],
    fallback: str = "ensemble",
    plain_probs: npt.ArrayLike | None = None,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """Per row of N×K×C probabilities: does the rule's answer name the class exit K names (and
    the exit that answered, as `decide`)? The label-free agreement with full depth that the
    server's shadow sample measures and that thresholds.json records for the tuning rows.

    With fallback "plain", full depth is the plain model (every exit disabled serves exactly
    it): the answer is compared with `plain_probs`' class, which is then required."""
    answers, exits = decide(exit_probs, thresholds, fallback, plain_probs)
    if fallback == "plain":
        if plain_probs is None:
            raise CalibrationError("fallback 'plain': agreement needs the plain model's answers")
        final = np.asarray(plain_probs, dtype=np.float32).argmax(axis=1)
    else:
        final = np.asarray(exit_probs, dtype=np.float32)[:, -1, :].argmax(axis=1)
    return np.asarray(answers.argmax(axis=1) == final), exits


def accepts_row(probs: Sequence[float], threshold: float) -> bool:
    """`accept_mask` for one row given as Python floats (`ndarray.tolist()`, exact for
    float32): its max probability is above `threshold`; a NaN anywhere makes numpy's max NaN,
    which accepts nothing, and so it does here."""
    return max(probs) > threshold and not any(v != v for v in probs)


def accepts(confidence: float, threshold: float) -> bool:
    """Whether an exit whose max probability is `confidence` accepts the row."""
    return float(confidence) > float(threshold)


def can_fall_back(thresholds: npt.ArrayLike, num_classes: int) -> npt.NDArray[np.bool_]:
    """Per threshold vector (last axis = exits): can any row reach the fallback? Exit K's max
    probability is at least 1/C, so t_K below 1/C (less the margin) makes exit K accept every
    row."""
    last = np.asarray(thresholds, dtype=np.float64)[..., -1]
    return np.asarray(last >= (1.0 / num_classes) * (1.0 - FALLBACK_MARGIN))


def skipped_heads(
    thresholds: npt.ArrayLike, fallback: str, num_classes: int
) -> npt.NDArray[np.bool_]:
    """…×K: which exits' heads can never matter, so a segment with a stage file runs without
    its head there: a disabled exit (t ≥ 1.0) when fallback is "last" or "plain" or no row can
    fall back (for "ensemble", a fallback row needs every exit's probabilities)."""
    th = np.asarray(thresholds, dtype=np.float64)
    unneeded = np.full(th.shape[:-1], fallback != "ensemble") | ~can_fall_back(th, num_classes)
    return np.asarray((th >= 1.0) & unneeded[..., None])


def chain_segments(thresholds: npt.ArrayLike, fallback: str) -> npt.NDArray[np.int64]:
    """Per threshold vector (last axis = exits): how many segments a row no exit accepts runs.
    K, except with fallback "plain": up to the last enabled exit (t < 1.0), 0 when every exit
    is disabled, because that row's answer comes from the plain graph run on the input."""
    th = np.asarray(thresholds, dtype=np.float64)
    k = th.shape[-1]
    if fallback != "plain":
        return np.full(th.shape[:-1], k, dtype=np.int64)
    enabled = th < 1.0
    # 1 + the index of the last enabled exit; argmax over the reversed axis finds it.
    last = k - np.argmax(enabled[..., ::-1], axis=-1)
    return np.asarray(np.where(enabled.any(axis=-1), last, 0), dtype=np.int64)
