"""Dynamic batching: requests wait in a bounded queue; one worker groups them into batches.

A batch closes when it holds `max_batch_size` images, when its oldest image has waited
`max_batch_wait_s`, or (with `adaptive_wait`, the default) at once when no other request is on
its way: routes wrap decoding on a worker thread in `arriving()`, so the batcher knows whether
waiting can fill the batch. Reading a body is not "arriving": a client that stalls its upload
must not make other requests wait for it. A lone request (concurrency 1) therefore never pays
the batching wait, while under load the images being decoded join the batch. Batches run on a dedicated inference
thread so the event loop keeps answering health checks and scrapes. One exception, for small
models: a lone image (nothing else queued or arriving) whose mode's measured batch-1 run time is
at most `inline_max_s` runs on the event loop itself. The two thread hops it saves cost
0.1–0.3 ms on a 2-core machine, a third to half of such a model's inference, while a health
check arriving meanwhile waits at most `inline_max_s`. Early-exit and full-mode images
never share a batch. Threshold swaps take the same lock as a running batch, so they land between
batches. Everything except the runtime call runs on the event loop thread, which is what makes
the queue checks atomic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from serving.metrics import ServingMetrics
from serving.runtime import BatchResult

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ClassifyingRuntime(Protocol):
    """What the batcher needs from `serving.runtime.EarlyExitRuntime`."""

    def preprocess(self, images: np.ndarray) -> np.ndarray: ...

    @property
    def thresholds(self) -> tuple[float, ...]: ...

    def classify(self, batch: np.ndarray, full: bool = False) -> BatchResult: ...


class QueueFullError(RuntimeError):
    """The queue cannot take the images now; the client should retry later (503)."""


class BatcherClosedError(RuntimeError):
    """The server is shutting down and takes no new work (503)."""


class BatchTooLargeError(ValueError):
    """More images in one request than the queue can ever hold: retrying cannot help (413)."""


@dataclass(frozen=True)
class RowResult:
    """The answer for one image."""

    probs: np.ndarray  # C answer probabilities
    exit: int  # 1..K, 0 = fallback
    exit_probs: np.ndarray | None  # K×C, full mode only
    thresholds: tuple[float, ...]  # in force for this batch
    queue_seconds: float  # time waiting for its batch
    batch_size: int


@dataclass
class _Job:
    image: np.ndarray  # H×W×C uint8
    full: bool
    future: asyncio.Future[RowResult]
    enqueued: float


class DynamicBatcher:
    """Owns the queue, the worker task and the inference thread for one runtime."""

    def __init__(
        self,
        runtime: ClassifyingRuntime,
        *,
        max_batch_size: int,
        max_batch_wait_s: float,
        queue_size: int,
        metrics: ServingMetrics | None = None,
        adaptive_wait: bool = True,
        inline_max_s: float = 0.0,
    ) -> None:
        if max_batch_size < 1 or queue_size < 1 or max_batch_wait_s < 0 or inline_max_s < 0:
            raise ValueError(
                "max_batch_size and queue_size must be ≥ 1, max_batch_wait_s and inline_max_s ≥ 0"
            )
        self._runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self.adaptive_wait = adaptive_wait
        self.inline_max_s = inline_max_s
        self.queue_size = queue_size
        self._metrics = metrics
        self._pending: dict[bool, deque[_Job]] = {False: deque(), True: deque()}
        self._wakeup = asyncio.Event()
        self._run_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="earlyexit-infer")
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._arriving = 0  # requests being read or decoded, not yet queued
        self.batches_run = 0
        self.batches_inline = 0
        # Smoothed run time of a one-image batch, per mode (early exit, full): None until seen.
        self._single_seconds: dict[bool, float | None] = {False: None, True: None}
        # Called on the event loop with (images, exits, exit_probs or None per row) after a
        # batch's answers are set: the shadow sampler's entry point. Must never block.
        self.on_answered: (
            Callable[[list[np.ndarray], list[int], list[np.ndarray | None]], None] | None
        ) = None

    # ------------------------------------------------------------------ public API

    @property
    def depth(self) -> int:
        return len(self._pending[False]) + len(self._pending[True])

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(
                self._work(), name="earlyexit-batcher"
            )

    @property
    def arriving_count(self) -> int:
        return self._arriving

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark one request as on its way to the queue while its image, fully received, is
        decoded.

        Leave the block before `classify`/`enqueue`: a request counted here makes a partly
        filled batch wait (up to `max_batch_wait_s`) for it.
        """
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._wakeup.set()  # a batch waiting for this request re-checks at once

    async def classify(self, images: Sequence[np.ndarray], full: bool = False) -> list[RowResult]:
        """Queue the images (all or none) and wait for their answers, in order."""
        futures = self.enqueue(images, full)
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for fut in futures:
                fut.cancel()  # a disconnected client's rows are skipped, not computed
            raise

    def enqueue(self, images: Sequence[np.ndarray], full: bool) -> list[asyncio.Future[RowResult]]:
        if self._closing:
            raise BatcherClosedError("server is shutting down")
        if self._worker is None or self._worker.done():
            raise BatcherClosedError("batch worker is not running")
        if len(images) > self.queue_size:
            raise BatchTooLargeError(
                f"{len(images)} images in one request exceed the queue size ({self.queue_size}); "
                f"send at most {self.queue_size} per request"
            )
        if self.depth + len(images) > self.queue_size:
            raise QueueFullError(
                f"queue full ({self.depth} images waiting, limit {self.queue_size})"
            )
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futures: list[asyncio.Future[RowResult]] = []
        for image in images:
            fut: asyncio.Future[RowResult] = loop.create_future()
            self._pending[bool(full)].append(_Job(image, bool(full), fut, now))
            futures.append(fut)
        self._update_depth()
        self._wakeup.set()
        return futures

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the event loop while no batch is running (threshold swaps)."""
        async with self._run_lock:
            return fn()

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new work, finish everything queued, then stop the worker and thread."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), timeout=timeout_s)
            except asyncio.TimeoutError:
                logger.error("batcher did not drain within %.1fs; cancelling", timeout_s)
                self._worker.cancel()
                self._fail_pending(BatcherClosedError("server shut down before answering"))
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ worker

    def _update_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self.depth)

    def _oldest_mode(self) -> bool | None:
        heads = [(q[0].enqueued, mode) for mode, q in self._pending.items() if q]
        return min(heads)[1] if heads else None

    def _fail_pending(self, exc: BaseException) -> None:
        for queue in self._pending.values():
            while queue:
                job = queue.popleft()
                if not job.future.done():
                    job.future.set_exception(exc)
        self._update_depth()

    def _worth_waiting(self) -> bool:
        return self._arriving > 0 or not self.adaptive_wait

    async def _next_batch(self) -> list[_Job] | None:
        """Wait for work, then until the batch is full, its oldest job's wait is up, or no
        request is arriving that could join it."""
        while True:
            mode = self._oldest_mode()
            if mode is None:
                if self._closing:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            queue = self._pending[mode]
            deadline = queue[0].enqueued + self.max_batch_wait_s
            while len(queue) < self.max_batch_size and not self._closing and self._worth_waiting():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
                except asyncio.TimeoutError:
                    break
            batch: list[_Job] = []
            while queue and len(batch) < self.max_batch_size:
                job = queue.popleft()
                if not job.future.done():  # cancelled: the client went away
                    batch.append(job)
            self._update_depth()
            if batch:
                return batch

    def _run_batch(self, images: np.ndarray, full: bool) -> tuple[BatchResult, tuple[float, ...]]:
        # Read under the run lock: no swap can land between this and the classify call.
        thresholds = tuple(float(t) for t in self._runtime.thresholds)
        started = time.perf_counter()
        result = self._runtime.classify(self._runtime.preprocess(images), full=full)
        if len(images) == 1:
            seconds = time.perf_counter() - started
            last = self._single_seconds[full]
            self._single_seconds[full] = seconds if last is None else 0.8 * last + 0.2 * seconds
        return result, thresholds

    def _runs_inline(self, batch: list[_Job]) -> bool:
        """A lone image of a model measured fast enough, with no other work in sight."""
        if len(batch) != 1 or self._arriving or self.depth or self._closing:
            return False
        expected = self._single_seconds[batch[0].full]
        return expected is not None and expected <= self.inline_max_s

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            started = time.perf_counter()
            try:
                images = np.stack([job.image for job in batch])
                full = batch[0].full
                async with self._run_lock:
                    if self._runs_inline(batch):
                        result, thresholds = self._run_batch(images, full)
                        self.batches_inline += 1
                    else:
                        result, thresholds = await loop.run_in_executor(
                            self._executor, self._run_batch, images, full
                        )
                self.batches_run += 1
                self._resolve(batch, result, thresholds, started)
            except Exception as exc:  # noqa: BLE001 - every waiting request must get an answer
                logger.exception("batch of %d images failed", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _resolve(
        self, batch: list[_Job], result: BatchResult, thresholds: tuple[float, ...], started: float
    ) -> None:
        probs = np.asarray(result.probs)
        exits = np.asarray(result.exits)
        exit_probs = None if result.exit_probs is None else np.asarray(result.exit_probs)
        if self._metrics is not None:
            self._metrics.observe_batch(
                exits,
                probs.max(axis=1),
                result.rows_per_segment,
                result.segment_seconds,
                result.plain_seconds,
            )
        for row, job in enumerate(batch):
            if job.future.done():
                continue
            job.future.set_result(
                RowResult(
                    probs=probs[row],
                    exit=int(exits[row]),
                    exit_probs=None if exit_probs is None else exit_probs[row],
                    thresholds=thresholds,
                    queue_seconds=started - job.enqueued,
                    batch_size=len(batch),
                )
            )
        if self.on_answered is not None:
            try:
                self.on_answered(
                    [job.image for job in batch],
                    [int(e) for e in exits],
                    [None] * len(batch) if exit_probs is None else list(exit_probs),
                )
            except Exception:  # noqa: BLE001 - answers are already out; sampling is best effort
                logger.exception("shadow sampling hook failed")
