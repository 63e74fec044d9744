"""Where uploaded images are decoded: on the event loop only when the work has a small proven
bound, otherwise on a few worker threads under a memory budget.

The event loop answers every request, so nothing whose cost an upload can choose may run there.
An image is decoded inline only if it is a PNG or JPEG of at most INLINE_DECODE_BYTES with at
most 16 chunks (PNG) or scans (JPEG), and the request's images hold at most
INLINE_DECODE_PIXELS pixels: parsing and inflating that little data into that few pixels takes
about 0.1 ms (PNG) or 0.6 ms (JPEG) for the worst such files on the development host
(tests/test_serving_decode.py builds and times them).
Everything else is opened (header only) and decoded on `workers` threads. Before a decode
starts, the memory it will hold at its peak (`serving.imaging.plan_decode`, known from the
header) is reserved from a byte budget shared by all requests; an image, or a request's images
together, needing more than the whole budget is refused (413), the others wait their turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from core.bundle import InputSpec
from serving import image_structure
from serving.imaging import ImageError, ImageTooLargeError, decode_image, open_image, plan_decode

logger = logging.getLogger(__name__)
T = TypeVar("T")

INLINE_DECODE_BYTES = 16 * 1024
INLINE_DECODE_PIXELS = 128 * 128
INLINE_MAX_CHUNKS = 16  # PNG chunks, JPEG scans
_MIB = 1024 * 1024


class ByteBudget:
    """A first-come-first-served semaphore counting bytes. Event-loop side only."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a byte budget needs a capacity of at least 1")
        self.capacity = capacity
        self.available = capacity
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, amount: int) -> None:
        """Wait until `amount` bytes are free and every earlier waiter is served."""
        if amount > self.capacity:
            raise ValueError(f"{amount} bytes exceed the whole budget of {self.capacity}")
        if not self._waiters and amount <= self.available:
            self.available -= amount
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((amount, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(amount)  # granted just as the waiter was cancelled
            else:
                self._waiters.remove((amount, waiter))
                self._wake()
            raise

    def release(self, amount: int) -> None:
        self.available = min(self.capacity, self.available + amount)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.available:
            amount, waiter = self._waiters.popleft()
            if not waiter.done():
                self.available -= amount
                waiter.set_result(None)


@contextlib.contextmanager
def _naming(index: int, count: int) -> Iterator[None]:
    """Errors about one of several images say which one (`files[i]: ...`)."""
    try:
        yield
    except ImageError as exc:
        if count > 1:
            raise type(exc)(f"files[{index}]: {exc}") from exc
        raise


def inline_candidate(data: bytes) -> bool:
    """Small enough, in bytes and in structure, to be opened on the event loop."""
    if len(data) > INLINE_DECODE_BYTES:
        return False
    if image_structure.is_png(data):
        return image_structure.png_chunk_count(data, INLINE_MAX_CHUNKS) <= INLINE_MAX_CHUNKS
    if image_structure.is_jpeg(data):
        return image_structure.jpeg_scan_count(data) <= INLINE_MAX_CHUNKS
    # Other formats (GIF, BMP, WebP) parse part of their data in Python: worker threads.
    return False


class DecodePool:
    """Decodes request images into H×W×C uint8 arrays; owns its worker threads."""

    def __init__(self, *, workers: int, memory_budget_bytes: int, max_pixels: int) -> None:
        if workers < 1:
            raise ValueError("the decode pool needs at least one worker")
        self.budget = ByteBudget(memory_budget_bytes)
        self.max_pixels = max_pixels
        self.inline_requests = 0
        self.pooled_images = 0
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="earlyexit-decode"
        )

    async def decode(
        self,
        payloads: Sequence[bytes],
        spec: InputSpec,
        decoding: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> list[np.ndarray]:
        """Every payload decoded to `spec`'s size, in order. `decoding()` is entered while a
        worker decodes (the batcher's `arriving`). Raises the `serving.imaging` errors."""
        count = len(payloads)
        opened: list[Image.Image | None] = [None] * count
        if all(inline_candidate(data) for data in payloads):
            inline: list[Image.Image] = []
            for i, data in enumerate(payloads):
                with _naming(i, count):
                    inline.append(open_image(data, self.max_pixels))
            if sum(im.width * im.height for im in inline) <= INLINE_DECODE_PIXELS:
                self.inline_requests += 1
                out = []
                for i, small in enumerate(inline):
                    with _naming(i, count):
                        out.append(decode_image(small, spec))
                return out
            opened[:] = inline
        results = []
        total = 0
        for i, data in enumerate(payloads):
            with _naming(i, count):
                image = opened[i]
                if image is None:
                    image = await self._run(open_image, data, self.max_pixels)
                cost = plan_decode(image, spec)
                total += cost
                if total > self.budget.capacity:
                    what = "image needs" if count == 1 else "the request's images need"
                    raise ImageTooLargeError(
                        f"{what} about {_mib(total)} MiB to decode; the server decodes at most "
                        f"{_mib(self.budget.capacity)} MiB at a time"
                    )
                results.append(await self._decode_within_budget(image, spec, cost, decoding))
        return results

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _decode_within_budget(
        self,
        image: Image.Image,
        spec: InputSpec,
        cost: int,
        decoding: Callable[[], AbstractContextManager[Any]],
    ) -> np.ndarray:
        await self.budget.acquire(cost)
        loop = asyncio.get_running_loop()
        try:
            job = self._executor.submit(decode_image, image, spec)
        except RuntimeError:  # shut down meanwhile
            self.budget.release(cost)
            raise
        self.pooled_images += 1

        def give_back(_: Future[np.ndarray]) -> None:
            # The memory is free when the worker is done, not when a cancelled waiter stops
            # waiting for it.
            with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
                loop.call_soon_threadsafe(self.budget.release, cost)

        job.add_done_callback(give_back)
        with decoding():
            return await asyncio.wrap_future(job)

    def close(self) -> None:
        """Stop the workers; queued decodes are dropped, running ones finish."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _mib(value: int) -> int:
    return max(1, round(value / _MIB))
