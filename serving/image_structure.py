"""Byte-level facts about an encoded image, read without decoding it: how many PNG chunks and
JPEG scans it has, and whether a JPEG is too short to hold the pixels its header declares.

They bound work Pillow would otherwise do for free to an attacker: Pillow walks every PNG chunk
in Python (about 5 µs each, so a 10 MB file of empty chunks costs seconds), and libjpeg decodes
every progressive scan of a JPEG, however many there are. Each function costs at most a short
loop over a bounded number of items or one C-level `bytes.count`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
_SOS = b"\xff\xda"
# Start-of-frame markers of arithmetic-coded JPEGs: they can spend under one bit on a block,
# so the length bound of `jpeg_too_short` does not hold for them.
_ARITHMETIC_SOF = tuple(bytes((0xFF, m)) for m in (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def is_png(data: bytes) -> bool:
    return data.startswith(PNG_SIGNATURE)


def is_jpeg(data: bytes) -> bool:
    return data.startswith(JPEG_SIGNATURE)


class PngChunkCounter:
    """Counts PNG chunks as the file streams in, stopping at IEND or once past `limit`: each
    `feed` costs one short step per chunk header in the data, never more than `limit` in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.done = False
        self._next = len(PNG_SIGNATURE)  # absolute offset of the next chunk header
        self._offset = 0  # bytes fed so far
        self._tail = b""  # the start of a chunk header cut by the end of the last feed

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        start = self._offset
        self._offset += len(data)
        end = self._offset
        if self._tail:
            need = 8 - len(self._tail)
            if len(data) < need:
                self._tail += data
                return
            header, self._tail = self._tail + data[:need], b""
            self._take(header)
        while not self.done and self._next + 8 <= end:
            at = self._next - start
            self._take(data[at : at + 8])
        if not self.done and self._next < end:
            self._tail = data[self._next - start :]

    def _take(self, header: bytes) -> None:
        (length,) = struct.unpack(">I", header[:4])
        self.count += 1
        if header[4:8] == b"IEND" or self.count > self.limit:
            self.done = True
        self._next += 12 + length


def png_chunk_count(data: bytes, limit: int) -> int:
    """Chunks in a PNG up to IEND, counting no further than `limit` + 1 (so the cost is bounded
    by `limit`, not by the file). A malformed tail ends the count; Pillow reports it later."""
    counter = PngChunkCounter(limit)
    counter.feed(data)
    return counter.count


def jpeg_scan_count(data: bytes) -> int:
    """Start-of-scan markers in a JPEG. Entropy-coded data cannot hold one (a 0xFF byte there is
    always followed by 0x00 or a restart number), so only metadata could add a false one: the
    count is an upper bound, which is the safe side for a limit."""
    return data.count(_SOS)


class StructureCheck:
    """Streaming form of the chunk and scan limits, for a body still arriving: `feed` each piece
    and get the reason to refuse it as soon as one is known (None while it looks fine)."""

    def __init__(self, max_png_chunks: int, max_jpeg_scans: int) -> None:
        self.max_png_chunks = max_png_chunks
        self.max_jpeg_scans = max_jpeg_scans
        self._kind: str | None = None  # "png", "jpeg" or "other" once the signature is in
        self._pending = b""
        self._png: PngChunkCounter | None = None
        self._scans = 0
        self._last = b""

    def feed(self, data: bytes) -> str | None:
        if self._kind is None:
            if len(self._pending) + len(data) < len(PNG_SIGNATURE):
                self._pending += data
                return None
            data, self._pending = (self._pending + data if self._pending else data), b""
            self._kind = "png" if is_png(data) else "jpeg" if is_jpeg(data) else "other"
            if self._kind == "png":
                self._png = PngChunkCounter(self.max_png_chunks)
        if self._png is not None:
            self._png.feed(data)
            if self._png.count > self.max_png_chunks:
                return f"PNG has more than {self.max_png_chunks} chunks"
        elif self._kind == "jpeg":
            # A marker cut between two pieces counts too.
            self._scans += data.count(_SOS) + (self._last == b"\xff" and data[:1] == b"\xda")
            self._last = data[-1:]
            if self._scans > self.max_jpeg_scans:
                return f"JPEG has more than {self.max_jpeg_scans} scans"
        return None


def jpeg_too_short(data: bytes, size: tuple[int, int], sampling: Sequence[tuple[int, int]]) -> bool:
    """True when a Huffman-coded JPEG has fewer bits than it has 8×8 blocks.

    Every block of every component costs at least one bit of entropy-coded data (its DC
    difference code, in baseline and progressive files alike), so a file shorter than that
    was cut off, however complete its header looks; libjpeg would pad it with grey and Pillow
    would not say so. `size` is the header's (width, height), `sampling` each component's
    (horizontal, vertical) factors. Arithmetic-coded files are never judged.
    """
    if not sampling or any(marker in data[: data.find(_SOS)] for marker in _ARITHMETIC_SOF):
        return False
    width, height = size
    h_max = max(h for h, _ in sampling) or 1
    v_max = max(v for _, v in sampling) or 1
    blocks = 0
    for h, v in sampling:
        comp_w = math.ceil(width * h / h_max)
        comp_h = math.ceil(height * v / v_max)
        blocks += math.ceil(comp_w / 8) * math.ceil(comp_h / 8)
    return len(data) * 8 < blocks
