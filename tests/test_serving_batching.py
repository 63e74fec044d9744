"""The dynamic batcher in-process, over the real onnxruntime chain of the tiny bundle."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serving.batching import BatcherClosedError, BatchTooLargeError, DynamicBatcher, QueueFullError
from serving.metrics import ServingMetrics


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    from serving.runtime import EarlyExitRuntime

    return EarlyExitRuntime(tiny_bundle, providers=["cpu"], intra_op_threads=1)


@pytest.fixture(scope="module")
def alone(runtime, tiny_images):
    """Each image classified on its own: (class index, exit) per row."""
    answers = []
    for image in tiny_images.images:
        result = runtime.classify(runtime.preprocess(image[None]))
        answers.append((int(result.probs[0].argmax()), int(result.exits[0])))
    return answers


def run(coro):
    return asyncio.run(coro)


def test_concurrent_images_share_batches_and_keep_their_answers(runtime, tiny_images, alone):
    metrics = ServingMetrics()

    async def scenario():
        batcher = DynamicBatcher(runtime, max_batch_size=16, max_batch_wait_s=0.05,
                                 queue_size=256, metrics=metrics)  # fmt: skip
        batcher.start()
        results = await asyncio.gather(*(batcher.classify([image]) for image in tiny_images.images))
        await batcher.stop()
        return batcher, [r[0] for r in results]

    batcher, rows = run(scenario())
    n = len(tiny_images.images)
    assert batcher.batches_run == n // 16  # every batch filled up to max_batch_size
    assert [(int(r.probs.argmax()), r.exit) for r in rows] == alone
    assert all(r.batch_size == 16 and r.exit_probs is None for r in rows)
    exported = metrics.render().decode()
    assert f"earlyexit_batch_size_sum {float(n)}" in exported
    assert "earlyexit_queue_depth 0.0" in exported


def test_full_and_early_exit_requests_never_share_a_batch(runtime, tiny_images, alone):
    images = tiny_images.images[:10]

    async def scenario():
        batcher = DynamicBatcher(runtime, max_batch_size=32, max_batch_wait_s=0.05, queue_size=64)
        batcher.start()
        early = [batcher.classify([im], full=False) for im in images[:5]]
        full = [batcher.classify([im], full=True) for im in images[5:]]
        results = await asyncio.gather(*early, *full)
        await batcher.stop()
        return batcher, [r[0] for r in results]

    batcher, rows = run(scenario())
    assert batcher.batches_run == 2
    assert [r.exit_probs is None for r in rows] == [True] * 5 + [False] * 5
    assert all(r.batch_size == 5 for r in rows)
    # Full mode reports every exit and still answers with the early-exit decision.
    assert [(int(r.probs.argmax()), r.exit) for r in rows] == alone[:10]
    for row in rows[5:]:
        assert row.exit_probs.shape == (3, 10)


def test_queue_limit_is_all_or_nothing(runtime, tiny_images):
    async def scenario():
        batcher = DynamicBatcher(runtime, max_batch_size=4, max_batch_wait_s=10.0, queue_size=3)
        batcher.start()
        first = batcher.enqueue(list(tiny_images.images[:2]), full=False)
        with pytest.raises(QueueFullError):
            batcher.enqueue(list(tiny_images.images[2:4]), full=False)
        assert batcher.depth == 2
        futures = first + batcher.enqueue([tiny_images.images[2]], full=False)
        with pytest.raises(QueueFullError):
            batcher.enqueue([tiny_images.images[3]], full=False)
        # stop() drains: the queued images are answered although their window is 10 s.
        await asyncio.wait_for(batcher.stop(), timeout=5)
        with pytest.raises(BatcherClosedError):
            batcher.enqueue([tiny_images.images[0]], full=False)
        return [f.result() for f in futures]

    rows = run(scenario())
    assert len(rows) == 3 and all(r.batch_size == 3 for r in rows)


def test_a_batch_larger_than_the_queue_is_refused_as_too_large(runtime, tiny_images):
    """Not QueueFullError (503, "retry later"): on an idle server it could never fit."""

    async def scenario():
        batcher = DynamicBatcher(runtime, max_batch_size=4, max_batch_wait_s=0.0, queue_size=3)
        batcher.start()
        with pytest.raises(BatchTooLargeError, match=r"4 images .* exceed the queue size \(3\)"):
            batcher.enqueue(list(tiny_images.images[:4]), full=False)
        assert batcher.depth == 0
        rows = await batcher.classify(list(tiny_images.images[:3]))
        await batcher.stop()
        return rows

    assert len(run(scenario())) == 3


def test_threshold_swaps_wait_for_the_running_batch(runtime, tiny_images):
    async def scenario():
        batcher = DynamicBatcher(runtime, max_batch_size=64, max_batch_wait_s=0.0, queue_size=64)
        batcher.start()
        original = runtime.thresholds
        task = asyncio.ensure_future(batcher.classify(list(tiny_images.images)))
        await asyncio.sleep(0)  # the worker picks up the batch
        await batcher.run_exclusive(lambda: runtime.set_thresholds([1.0, 1.0, 0.0]))
        rows = await task
        after = await batcher.classify([tiny_images.images[0]])
        runtime.set_thresholds(original)
        await batcher.stop()
        return rows, after, original

    rows, after, original = run(scenario())
    # The in-flight batch used one threshold vector for all its rows.
    assert len({r.thresholds for r in rows}) == 1
    assert after[0].thresholds == (1.0, 1.0, 0.0) and after[0].exit == 3
    assert runtime.thresholds == original


def test_a_failing_batch_fails_its_requests_only(runtime, tiny_images):
    async def scenario():
        batcher = DynamicBatcher(runtime, max_batch_size=8, max_batch_wait_s=0.0, queue_size=8)
        batcher.start()
        wrong_shape = np.zeros((5, 5, 3), dtype=np.uint8)
        with pytest.raises(ValueError):
            await batcher.classify([wrong_shape])
        ok = await batcher.classify([tiny_images.images[0]])
        await batcher.stop()
        return ok

    assert run(scenario())[0].probs.shape == (10,)


def test_bad_configuration_is_refused(runtime):
    with pytest.raises(ValueError):
        DynamicBatcher(runtime, max_batch_size=0, max_batch_wait_s=0.001, queue_size=4)
    with pytest.raises(ValueError):
        DynamicBatcher(runtime, max_batch_size=4, max_batch_wait_s=-1, queue_size=4)
    with pytest.raises(ValueError):
        DynamicBatcher(runtime, max_batch_size=4, max_batch_wait_s=0, queue_size=4, inline_max_s=-1)


def test_a_lone_request_does_not_wait_for_company(runtime, tiny_images):
    """Nothing else is arriving, so the 10 s batching window is not waited out."""

    async def scenario():
        batcher = DynamicBatcher(runtime, max_batch_size=8, max_batch_wait_s=10.0, queue_size=8)
        batcher.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        rows = await asyncio.wait_for(batcher.classify([tiny_images.images[0]]), timeout=5)
        waited = loop.time() - t0
        await batcher.stop()
        return rows, waited

    rows, waited = run(scenario())
    assert rows[0].batch_size == 1 and waited < 5


def test_a_batch_waits_for_a_request_still_arriving(runtime, tiny_images):
    """A request being decoded joins the batch of one already queued."""

    async def scenario():
        batcher = DynamicBatcher(runtime, max_batch_size=8, max_batch_wait_s=10.0, queue_size=8)
        batcher.start()

        async def slow_client():
            with batcher.arriving():
                await asyncio.sleep(0.05)  # reading and decoding its body
            return await batcher.classify([tiny_images.images[1]])

        slow = asyncio.ensure_future(slow_client())
        await asyncio.sleep(0)  # the slow request is now arriving
        assert batcher.arriving_count == 1
        first = await asyncio.wait_for(batcher.classify([tiny_images.images[0]]), timeout=5)
        second = await slow
        await batcher.stop()
        return first, second, batcher

    first, second, batcher = run(scenario())
    assert first[0].batch_size == second[0].batch_size == 2
    assert batcher.batches_run == 1 and batcher.arriving_count == 0


def test_fixed_wait_holds_a_lone_request_for_the_window(runtime, tiny_images):
    async def scenario():
        batcher = DynamicBatcher(runtime, max_batch_size=8, max_batch_wait_s=0.3, queue_size=8,
                                 adaptive_wait=False)  # fmt: skip
        batcher.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        rows = await batcher.classify([tiny_images.images[0]])
        waited = loop.time() - t0
        await batcher.stop()
        return rows, waited

    rows, waited = run(scenario())
    assert rows[0].batch_size == 1 and rows[0].queue_seconds >= 0.29 and waited >= 0.29


class _ThreadRecorder:
    """The runtime, noting which thread ran each classify call."""

    def __init__(self, runtime):
        self._runtime = runtime
        self.threads: list[int] = []

    def preprocess(self, images):
        return self._runtime.preprocess(images)

    @property
    def thresholds(self):
        return self._runtime.thresholds

    def classify(self, batch, full=False):
        import threading

        self.threads.append(threading.get_ident())
        return self._runtime.classify(batch, full=full)


def _lone_requests(runtime, images, inline_max_s, arriving=False):
    """Classify `images` one request at a time; returns (rows, threads used, loop thread)."""
    import threading

    recorder = _ThreadRecorder(runtime)

    async def scenario():
        batcher = DynamicBatcher(recorder, max_batch_size=8, max_batch_wait_s=0.0, queue_size=8,
                                 inline_max_s=inline_max_s)  # fmt: skip
        batcher.start()
        rows = []
        for image in images:
            if arriving:
                with batcher.arriving():  # another request is on its way
                    rows += await batcher.classify([image])
            else:
                rows += await batcher.classify([image])
        await batcher.stop()
        return rows, batcher.batches_inline

    loop_thread = threading.get_ident()  # asyncio.run runs the loop on this thread
    rows, inline = run(scenario())
    return rows, inline, [t == loop_thread for t in recorder.threads]


def test_a_lone_image_of_a_fast_model_runs_on_the_event_loop(runtime, tiny_images, alone):
    images = tiny_images.images[:6]
    rows, inline, on_loop = _lone_requests(runtime, images, inline_max_s=10.0)
    # The first run is on the inference thread: it measures the model; the rest run inline.
    assert on_loop == [False] + [True] * 5 and inline == 5
    assert [(int(r.probs.argmax()), r.exit) for r in rows] == alone[:6]


def test_inline_runs_need_the_setting_a_fast_enough_model_and_no_company(runtime, tiny_images):
    images = tiny_images.images[:4]
    for kwargs in (
        {"inline_max_s": 0.0},
        {"inline_max_s": 1e-9},
        {"inline_max_s": 10.0, "arriving": True},
    ):
        _, inline, on_loop = _lone_requests(runtime, images, **kwargs)
        assert inline == 0 and not any(on_loop), kwargs


def test_a_batch_of_several_images_runs_on_the_inference_thread(runtime, tiny_images):
    import threading

    recorder = _ThreadRecorder(runtime)

    async def scenario():
        batcher = DynamicBatcher(recorder, max_batch_size=8, max_batch_wait_s=0.0, queue_size=8,
                                 inline_max_s=10.0)  # fmt: skip
        batcher.start()
        await batcher.classify([tiny_images.images[0]])  # measured: fast enough to go inline
        rows = await batcher.classify(list(tiny_images.images[:3]))
        await batcher.stop()
        return rows

    loop_thread = threading.get_ident()
    rows = run(scenario())
    assert len(rows) == 3 and rows[0].batch_size == 3
    assert recorder.threads[-1] != loop_thread
