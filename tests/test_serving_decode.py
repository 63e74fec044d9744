"""What an upload may cost the server: structure limits, truncation, the decode memory budget
and the inline-decoding rule, without a server (`serving.imaging`, `serving.decode_pool`)."""

from __future__ import annotations

import asyncio
import io
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.bundle import InputSpec
from serving.decode_pool import (
    INLINE_DECODE_BYTES,
    INLINE_MAX_CHUNKS,
    ByteBudget,
    DecodePool,
    inline_candidate,
)
from serving.image_structure import PngChunkCounter, StructureCheck, png_chunk_count
from serving.imaging import (
    MAX_JPEG_SCANS,
    MAX_PNG_CHUNKS,
    ImageTooLargeError,
    UndecodableImageError,
    open_image,
    plan_decode,
    prepare_image,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import hardening_attack as attack  # noqa: E402

RGB32 = InputSpec(shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, color_mode="RGB")
LIMIT = 4096 * 4096


def run(coro):
    return asyncio.run(coro)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ structure limits


def test_a_png_of_many_empty_chunks_is_refused_before_pillow_walks_them() -> None:
    data = attack.png_many_chunks(2 * 1024 * 1024)
    started = time.perf_counter()
    with pytest.raises(UndecodableImageError, match=f"more than {MAX_PNG_CHUNKS} chunks"):
        prepare_image(data, RGB32, LIMIT)
    # Pillow alone spends ~5 µs a chunk (about 1 s here); the check stops after the limit.
    assert time.perf_counter() - started < 0.5


def test_a_jpeg_of_many_scans_is_refused() -> None:
    data = attack.jpeg_many_scans(1024 * 1024)
    with pytest.raises(UndecodableImageError, match=f"more than {MAX_JPEG_SCANS} scans"):
        prepare_image(data, RGB32, LIMIT)


@pytest.mark.parametrize("piece", [1, 3, 7, 8, 9, 1000, 65536])
def test_streamed_counts_equal_whole_file_counts(piece: int) -> None:
    data = attack.png_many_chunks(60_000)
    counter = PngChunkCounter(10**9)
    for at in range(0, len(data), piece):
        counter.feed(data[at : at + piece])
    assert counter.count == png_chunk_count(data, 10**9) > 4000
    jpeg = attack.jpeg_many_scans(40_000)
    check = StructureCheck(10**9, 3)
    problems = {check.feed(jpeg[at : at + piece]) for at in range(0, len(jpeg), piece)}
    assert "JPEG has more than 3 scans" in problems


def test_real_files_pass_the_structure_limits() -> None:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8))
    for fmt, kwargs in (("PNG", {}), ("JPEG", {"progressive": True}), ("JPEG", {})):
        buf = io.BytesIO()
        photo.save(buf, fmt, **kwargs)
        assert StructureCheck(MAX_PNG_CHUNKS, MAX_JPEG_SCANS).feed(buf.getvalue()) is None
        assert prepare_image(buf.getvalue(), RGB32, LIMIT).shape == (32, 32, 3)


def test_a_jpeg_cut_short_of_its_declared_size_is_undecodable() -> None:
    """Regression: a header claiming 4000×4000 over 64×48 of data was answered 200."""
    with pytest.raises(UndecodableImageError, match="truncated JPEG"):
        prepare_image(attack.jpeg_claiming(4000, 4000), RGB32, LIMIT)
    # The same data with its true size decodes.
    assert prepare_image(attack.jpeg_claiming(64, 48), RGB32, LIMIT).shape == (32, 32, 3)


def test_the_bomb_message_quotes_the_configured_limit() -> None:
    """Regression: beyond Pillow's own bomb limit the message quoted Pillow's 178956970."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    with pytest.raises(ImageTooLargeError) as info:
        prepare_image(data, RGB32, 1_000_000)
    assert "the limit is 1000000" in str(info.value) and "178956970" not in str(info.value)


# ------------------------------------------------------------------ inline decoding


def test_only_small_simple_pngs_and_jpegs_decode_inline() -> None:
    rng = np.random.default_rng(1)
    small = png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert inline_candidate(small)
    assert not inline_candidate(attack.png_many_chunks(INLINE_DECODE_BYTES))
    assert not inline_candidate(attack.png_many_chunks(10 * 1024 * 1024))
    assert not inline_candidate(attack.jpeg_many_scans(INLINE_DECODE_BYTES))
    gif = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(gif, "GIF")
    assert not inline_candidate(gif.getvalue())


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _worst_inline_png() -> bytes:
    """The costliest PNG the inline rule admits: all its chunks and bytes, 128×128 RGBA 16-bit
    data of random bytes (zlib inflates it at its slowest)."""
    rng = np.random.default_rng(2)
    rows = b"".join(b"\0" + rng.bytes(128 * 8) for _ in range(128))
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 128, 128, 16, 6, 0, 0, 0))
    fillers = _chunk(b"prVt", b"") * (INLINE_MAX_CHUNKS - 3)
    room = INLINE_DECODE_BYTES - 8 - len(ihdr) - len(fillers) - 2 * 12
    body = zlib.compress(rows, 0)[:room]  # stored blocks, cut: Pillow inflates all it gets
    data = b"\x89PNG\r\n\x1a\n" + ihdr + fillers + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")
    assert len(data) == INLINE_DECODE_BYTES and png_chunk_count(data, 100) == INLINE_MAX_CHUNKS
    return data


def _worst_inline_jpeg() -> bytes:
    """A progressive 128×128 JPEG with the most scans and bytes the inline rule admits."""
    data = attack.jpeg_many_scans(
        INLINE_DECODE_BYTES, quality=50, scan_bytes=600, max_scans=INLINE_MAX_CHUNKS
    )
    assert data.count(b"\xff\xda") == INLINE_MAX_CHUNKS and len(data) <= INLINE_DECODE_BYTES
    return data


def test_the_worst_inline_decodes_take_milliseconds() -> None:
    """The bound that lets these run on the event loop: worst admitted inputs decode fast."""
    for data in (_worst_inline_png(), _worst_inline_jpeg()):
        assert inline_candidate(data)
        worst = 0.0
        for _ in range(5):
            started = time.perf_counter()
            try:
                prepare_image(data, RGB32, LIMIT)
            except UndecodableImageError:
                pass  # a truncated stream is refused: the cost is what counts here
            worst = max(worst, time.perf_counter() - started)
        assert worst < 0.025, f"{worst * 1000:.1f} ms on the event loop"


# ------------------------------------------------------------------ memory budget


def test_the_decode_estimate_comes_from_the_header_and_shrinks_with_jpeg_draft() -> None:
    image = open_image(attack.png16_gray(4096), LIMIT)
    assert image.mode == "I;16" and image.tile  # tiles still to decode: header only
    assert 64 * 2**20 <= plan_decode(image, RGB32) <= 256 * 2**20
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (1, 2, 3)).save(buf, "JPEG")
    photo = open_image(buf.getvalue(), LIMIT)
    assert plan_decode(photo, RGB32) <= 500 * 375 * 12  # decoded at 1/8 scale


def test_an_image_over_the_whole_budget_is_413_and_the_rest_waits_its_turn() -> None:
    data = attack.png16_gray(2048)  # 16-bit 2048²: about 32 MiB to decode

    async def scenario() -> tuple[int, float]:
        small = DecodePool(workers=2, memory_budget_bytes=16 * 2**20, max_pixels=LIMIT)
        with pytest.raises(ImageTooLargeError, match="MiB to decode"):
            await small.decode([data], RGB32)
        small.close()
        pool = DecodePool(workers=4, memory_budget_bytes=40 * 2**20, max_pixels=LIMIT)
        peak_in_use = 0

        async def watch() -> None:
            nonlocal peak_in_use
            while True:
                peak_in_use = max(peak_in_use, pool.budget.capacity - pool.budget.available)
                await asyncio.sleep(0.001)

        watcher = asyncio.ensure_future(watch())
        arrays = await asyncio.gather(*(pool.decode([data], RGB32) for _ in range(4)))
        watcher.cancel()
        pool.close()
        assert all(a[0].shape == (32, 32, 3) for a in arrays)
        return peak_in_use, pool.budget.available / pool.budget.capacity

    peak_in_use, free_after = run(scenario())
    assert 0 < peak_in_use <= 40 * 2**20 and free_after == 1.0


def test_a_batch_over_the_budget_together_is_413_naming_the_request() -> None:
    data = attack.png16_gray(1024)  # about 8 MiB each

    async def scenario() -> None:
        pool = DecodePool(workers=1, memory_budget_bytes=20 * 2**20, max_pixels=LIMIT)
        try:
            with pytest.raises(ImageTooLargeError, match="the request's images need"):
                await pool.decode([data] * 4, RGB32)
            assert len(await pool.decode([data] * 2, RGB32)) == 2
        finally:
            pool.close()

    run(scenario())


def test_errors_name_the_file_among_several() -> None:
    good = png(np.zeros((8, 8, 3), dtype=np.uint8))

    async def scenario() -> None:
        pool = DecodePool(workers=1, memory_budget_bytes=2**26, max_pixels=LIMIT)
        try:
            with pytest.raises(UndecodableImageError, match=r"^files\[1\]: "):
                await pool.decode([good, b"not an image", good], RGB32)
        finally:
            pool.close()

    run(scenario())


def test_byte_budget_is_first_come_first_served_and_survives_cancellation() -> None:
    async def scenario() -> list[str]:
        budget = ByteBudget(10)
        order: list[str] = []
        await budget.acquire(8)

        async def take(name: str, amount: int) -> None:
            await budget.acquire(amount)
            order.append(name)

        big = asyncio.ensure_future(take("big", 6))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(take("small", 1))  # fits now, but waits behind "big"
        cancelled = asyncio.ensure_future(take("cancelled", 1))
        await asyncio.sleep(0)
        assert order == []
        cancelled.cancel()
        budget.release(8)
        await asyncio.gather(big, small, return_exceptions=True)
        assert budget.available == 3
        with pytest.raises(ValueError):
            await budget.acquire(11)
        return order

    assert run(scenario()) == ["big", "small"]
