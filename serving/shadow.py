"""Shadow sampling off the request path, and the live signals computed from the sample.

The batcher hands every answered row to `ShadowSampler.offer` on the event loop after the
answers are set: a coin flip at `rate` and a non-blocking put into a bounded queue, nothing
else. One background thread, at a lower OS priority where the platform allows, waits while
requests are queued or arriving, then re-runs its rows through every segment (rows that were
already answered with `full=true` are not run twice) and appends them to the store. When the
queue is full the row is dropped and counted: shadow work never delays an answer.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.decision import agrees_with_final
from core.drift import (
    QuantileReference,
    exit1_confidence,
    ks_against_quantiles,
    ks_statistic,
)
from serving.runtime import EarlyExitRuntime
from serving.shadow_store import ShadowRows, ShadowStore

logger = logging.getLogger(__name__)
# A shadow batch: large enough to amortise a session run, small enough to finish between bursts.
SHADOW_BATCH = 16
BUSY_POLL_S = 0.005
# At most this share of wall time goes to shadow runs: after a run of t seconds the thread rests
# t·(1/share − 1). On a CPU-bound host the full chain competes with the answers for the same
# cores (and the session's thread pool) however low its priority, so a busy server fills the
# queue and drops samples rather than slowing down (measured in docs/results/shadow_latency).
SHADOW_TIME_SHARE = 0.2
# Lower than the inference thread, so the OS scheduler prefers answers on a busy CPU.
SHADOW_NICENESS = 10


@dataclass
class _ShadowJob:
    image: np.ndarray | None  # H×W×C uint8, None when exit_probs is known
    exit_probs: np.ndarray | None  # K×C when the row was answered with full=true
    served_exit: int
    answered_at: float


class ShadowSampler:
    """Bounded queue + one worker thread feeding a `ShadowStore`."""

    def __init__(
        self,
        runtime: EarlyExitRuntime,
        store: ShadowStore,
        rate: float,
        queue_size: int,
        busy: Callable[[], bool] = lambda: False,
        on_stored: Callable[[int], None] | None = None,
        on_dropped: Callable[[str], None] | None = None,
        seed: int | None = None,
    ) -> None:
        self._runtime = runtime
        self.store = store
        self.rate = rate
        self._queue: queue.Queue[_ShadowJob | None] = queue.Queue(maxsize=queue_size)
        self._busy = busy
        self._on_stored = on_stored
        self._on_dropped = on_dropped
        self._random = random.Random(seed)
        self._thread = threading.Thread(target=self._work, name="earlyexit-shadow", daemon=True)
        self._closing = False
        self.sampled = 0
        self.dropped = 0
        self.failed = 0

    def start(self) -> None:
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def offer(
        self,
        images: Sequence[np.ndarray],
        served_exits: Sequence[int],
        exit_probs: Sequence[np.ndarray | None],
    ) -> None:
        """Sample answered rows (event loop; never blocks)."""
        if self.rate <= 0.0 or self._closing:
            return
        now = time.time()
        # Fallback "plain": a row answered with full=true still lacks the plain model's answer,
        # so every sampled row is run again from its image.
        rerun = self.store.plain
        for image, served, probs in zip(images, served_exits, exit_probs, strict=True):
            if self.rate < 1.0 and self._random.random() >= self.rate:
                continue
            if rerun:
                probs = None
            job = _ShadowJob(None if probs is not None else image, probs, int(served), now)
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                self.dropped += 1
                if self._on_dropped is not None:
                    self._on_dropped("queue_full")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish what is queued (bounded by the queue size), then stop the thread."""
        self._closing = True
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=timeout_s)
        self.store.close()

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICENESS)
        except (AttributeError, OSError):  # not Linux, or not allowed: still correct, less polite
            pass
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.task_done()
                return
            # Answers first: while requests wait for a batch, shadow work waits for them.
            while self._busy() and not self._closing:
                time.sleep(BUSY_POLL_S)
            jobs = [first]
            stop = False
            while len(jobs) < SHADOW_BATCH:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    self._queue.task_done()
                    break
                jobs.append(job)
            started = time.perf_counter()
            try:
                self._store(jobs)
            except Exception:  # noqa: BLE001 - a failed shadow batch must not stop sampling
                self.failed += len(jobs)
                logger.exception("shadow batch of %d rows failed; rows dropped", len(jobs))
            finally:
                for _ in jobs:
                    self._queue.task_done()
            if stop:
                return
            rest = (time.perf_counter() - started) * (1.0 / SHADOW_TIME_SHARE - 1.0)
            if not self._closing:
                time.sleep(rest)

    def _store(self, jobs: list[_ShadowJob]) -> None:
        manifest = self._runtime.manifest
        probs = np.empty((len(jobs), manifest.num_exits, manifest.num_classes), dtype=np.float32)
        to_run: list[int] = []
        images: list[np.ndarray] = []
        for i, job in enumerate(jobs):
            if job.exit_probs is not None:
                probs[i] = job.exit_probs
            elif job.image is not None:
                to_run.append(i)
                images.append(job.image)
            else:
                raise ValueError("a shadow job carries neither an image nor exit probabilities")
        plain = None
        if to_run:
            batch = self._runtime.preprocess(np.stack(images))
            result = self._runtime.classify(batch, full=True)
            probs[to_run] = np.asarray(result.exit_probs)
            if self.store.plain:  # every row was run (offer), so these are all the rows
                plain = np.asarray(result.plain_probs)
        self.store.append(
            np.array([j.answered_at for j in jobs]),
            np.array([j.served_exit for j in jobs]),
            probs,
            plain,
        )
        self.sampled += len(jobs)
        if self._on_stored is not None:
            self._on_stored(len(jobs))


# ---------------------------------------------------------------------- live signals


def agreement_signals(
    rows: ShadowRows, thresholds: Sequence[float], fallback: str, confidence: float
) -> dict[str, Any]:
    """What the thresholds would do on these rows, with the final exit as the label: agreement
    overall (percent) and per exit among the rows that exit accepts, the estimated accuracy drop
    vs full depth (points: the disagreement) and its one-sided bounds at `confidence` (Z)."""
    n = rows.num_rows
    num_exits = rows.exit_probs.shape[1] if rows.exit_probs.ndim == 3 else len(thresholds)
    per_exit: list[dict[str, Any]] = []
    if n == 0:
        for label in [*(str(k) for k in range(1, num_exits + 1)), "fallback"]:
            per_exit.append({"exit": label, "rows": 0, "fraction": 0.0, "agreement": None})
        return {"rows": 0, "agreement": None, "estimated_drop": None,
                "estimated_drop_lower": None, "estimated_drop_upper": None,
                "per_exit": per_exit}  # fmt: skip
    agree, exits = agrees_with_final(rows.exit_probs, list(thresholds), fallback, rows.plain_probs)
    for k in [*range(1, num_exits + 1), 0]:
        mask = exits == k
        count = int(mask.sum())
        per_exit.append(
            {
                "exit": "fallback" if k == 0 else str(k),
                "rows": count,
                "fraction": count / n,
                "agreement": 100.0 * float(agree[mask].mean()) if count else None,
            }
        )
    rate = float(agree.mean())
    drop = 100.0 * (1.0 - rate)
    # Wald bound with a floor of one disagreement's worth, so 100 % on few rows is not certain.
    se = math.sqrt(max(rate * (1.0 - rate), 1.0 / n) / n)
    return {
        "rows": n,
        "agreement": 100.0 * rate,
        "estimated_drop": drop,
        "estimated_drop_lower": max(0.0, drop - 100.0 * confidence * se),
        "estimated_drop_upper": min(100.0, drop + 100.0 * confidence * se),
        "per_exit": per_exit,
    }


def drop_alert(
    live: dict[str, Any],
    thresholds: Sequence[float],
    reference: QuantileReference | None,
    budget: float,
) -> dict[str, Any]:
    """The drop alert on `agreement_signals`' answer: `tuned_drop` (the disagreement these
    thresholds had on their tuning rows, when thresholds.json records it for them), the
    `alert_level` (budget above it; the budget alone otherwise) and `over_budget` (the drop's
    lower bound above the level). Measured from the tuning-time level because label-tuned
    thresholds never bounded agreement, so an absolute level fires on clean traffic
    (core.drift); on the lower bound, so a small window's noise alone never alerts."""
    agreement = None if reference is None else reference.agreement
    tuned_drop = None if agreement is None else agreement.drop_for(thresholds)
    level = budget + (tuned_drop or 0.0)
    lower = live["estimated_drop_lower"]
    return {
        "tuned_drop": tuned_drop,
        "alert_level": level,
        "over_budget": bool(lower is not None and lower > level),
    }


def drift_signal(
    reference: ShadowRows | None,
    recent: ShadowRows,
    tuned_reference: QuantileReference | None = None,
) -> dict[str, Any]:
    """KS statistic of exit 1's confidence between the rows the thresholds were tuned on and the
    recent window (core.drift says why this signal). The tuned rows themselves when the
    thresholds were tuned on a live window still in the store; else the quantiles that
    thresholds.json carries (`tuned.reference`); None when neither exists (thresholds tuned
    before references were written: retune once to get one)."""
    base = {"recent_rows": recent.num_rows}
    if recent.num_rows == 0:
        return {"statistic": None, "reference": None, "reference_rows": 0, **base,
                "reason": "no recent rows"}  # fmt: skip
    values = exit1_confidence(recent.exit_probs)
    if reference is not None and reference.num_rows:
        return {
            "statistic": ks_statistic(exit1_confidence(reference.exit_probs), values),
            "reference": "live window",
            "reference_rows": reference.num_rows,
            **base,
            "reason": None,
        }
    if tuned_reference is not None:
        return {
            "statistic": ks_against_quantiles(tuned_reference.quantiles, values),
            "reference": tuned_reference.source,
            "reference_rows": tuned_reference.rows,
            **base,
            "reason": None,
        }
    return {"statistic": None, "reference": None, "reference_rows": 0, **base,
            "reason": "thresholds.json has no tuned.reference and the thresholds were not tuned "
                      "on a live window still in the sample; retune once to get one"}  # fmt: skip
