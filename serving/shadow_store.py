"""The shadow sample on disk: one SQLite file per served model under the state directory.

Each row is one answered image re-run through the full chain: its time, the exit that answered
it, the final exit's prediction and every exit's probabilities (K×C float32, so a retune can
rebuild the exit table for either fallback, the ensemble included, exactly as served; per-exit
max-probabilities and predictions are derived from them). The store keeps at most
`min(capacity, max_bytes // row_bytes)` rows, oldest dropped first, where row_bytes is the
probability payload plus a fixed per-row overhead.

A store that cannot be opened or checked, or that was written for another model, is moved aside
(`*.corrupt-<time>` / `*.other-<time>`, never deleted) and the server starts with an empty sample.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
# Time, two integers, the row id and SQLite's record header, rounded up.
ROW_OVERHEAD_BYTES = 40


@dataclass(frozen=True)
class ShadowRows:
    """A slice of the sample, oldest first."""

    times: np.ndarray  # N float64, seconds since the epoch
    served_exits: np.ndarray  # N int64: 1..K, 0 = fallback
    exit_probs: np.ndarray  # N×K×C float32
    plain_probs: np.ndarray | None = None  # N×C float32: the plain model's (fallback "plain")

    @property
    def num_rows(self) -> int:
        return int(self.times.shape[0])


def store_path(state_dir: Path, model_name: str, manifest_bytes: bytes) -> Path:
    """The store of one model: named after the manifest's hash, so a new model starts fresh."""
    digest = hashlib.sha256(manifest_bytes).hexdigest()[:16]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model_name)[:64]
    return state_dir / "shadow" / f"{safe or 'model'}-{digest}.sqlite"


class ShadowStore:
    """Bounded, persistent, thread-safe (one lock; every call is short)."""

    def __init__(
        self,
        path: Path,
        num_exits: int,
        num_classes: int,
        capacity: int,
        max_bytes: int,
        plain: bool = False,
    ) -> None:
        self.path = path
        self.num_exits, self.num_classes = num_exits, num_classes
        # Fallback "plain": each row also keeps the plain model's probabilities, after the exits'.
        self.plain = plain
        self.row_bytes = 4 * (num_exits + int(plain)) * num_classes + ROW_OVERHEAD_BYTES
        self.max_rows = max(0, min(capacity, max_bytes // self.row_bytes))
        self.recovered: str | None = None  # why an existing file was moved aside, if it was
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._open()
        self._trim()

    # ------------------------------------------------------------------ open / recover

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")  # a crash mid-write leaves the last commit intact
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _open(self) -> sqlite3.Connection:
        try:
            db = self._connect()
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity check failed")
            self._ensure_schema(db)
            return db
        except sqlite3.DatabaseError as exc:
            return self._move_aside(
                "corrupt", f"the shadow store {self.path} is unreadable ({exc})"
            )
        except _OtherModel as exc:
            return self._move_aside("other", str(exc))

    def _move_aside(self, tag: str, reason: str) -> sqlite3.Connection:
        aside = self.path.with_name(f"{self.path.name}.{tag}-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(aside) + suffix))
        self.recovered = f"{reason}; moved to {aside.name}, starting with an empty sample"
        logger.warning(self.recovered)
        db = self._connect()
        self._ensure_schema(db)
        return db

    def _ensure_schema(self, db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute(
            "CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "t REAL NOT NULL, served_exit INTEGER NOT NULL, final_pred INTEGER NOT NULL, "
            "probs BLOB NOT NULL)"
        )
        want = {
            "schema": SCHEMA_VERSION,
            "exits": str(self.num_exits),
            "classes": str(self.num_classes),
        }
        if self.plain:  # absent in older stores, which never kept a plain model's answers
            want["plain"] = "1"
        have = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if not have:
            db.executemany("INSERT INTO meta VALUES (?, ?)", list(want.items()))
        elif have != want:
            db.close()
            raise _OtherModel(f"the shadow store {self.path} was written for {have}, not {want}")

    # ------------------------------------------------------------------ rows

    def append(
        self,
        times: np.ndarray,
        served_exits: np.ndarray,
        exit_probs: np.ndarray,
        plain_probs: np.ndarray | None = None,
    ) -> int:
        """Add rows (N, N, N×K×C, and N×C for a plain-fallback store) and drop the oldest beyond
        the caps. Returns rows stored now."""
        probs = np.ascontiguousarray(exit_probs, dtype=np.float32)
        if probs.ndim != 3 or probs.shape[1:] != (self.num_exits, self.num_classes):
            raise ValueError(f"expected N×{self.num_exits}×{self.num_classes} probabilities")
        if self.plain:
            if plain_probs is None:
                raise ValueError(f"expected N×{self.num_classes} plain-model probabilities")
            plain = np.asarray(plain_probs, dtype=np.float32)
            if plain.shape != (probs.shape[0], self.num_classes):
                raise ValueError(f"expected N×{self.num_classes} plain-model probabilities")
            probs = np.ascontiguousarray(np.concatenate([probs, plain[:, None, :]], axis=1))
        final = probs[:, -1, :].argmax(axis=1)  # full depth: exit K, or the plain model
        records = [
            (float(t), int(e), int(f), p.tobytes())
            for t, e, f, p in zip(times, served_exits, final, probs, strict=True)
        ]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO rows (t, served_exit, final_pred, probs) VALUES (?, ?, ?, ?)", records
            )
            self._trim_locked()
            self._db.execute("COMMIT")
            return self._count_locked()

    def _trim(self) -> None:
        with self._lock:
            self._trim_locked()

    def _trim_locked(self) -> None:
        # Capacity may have been lowered since the file was written: the cap holds on start too.
        self._db.execute(
            "DELETE FROM rows WHERE id <= (SELECT MAX(id) FROM rows) - ?", (self.max_rows,)
        )

    def _count_locked(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM rows").fetchone()[0])

    def count(self) -> int:
        with self._lock:
            return self._count_locked()

    def recent(self, limit: int) -> ShadowRows:
        """The newest `limit` rows, oldest first."""
        return self._select("ORDER BY id DESC LIMIT ?", (int(limit),), reverse=True)

    def between(self, start: float, end: float) -> ShadowRows:
        """Rows sampled in [start, end], oldest first."""
        return self._select("WHERE t >= ? AND t <= ? ORDER BY id", (start, end), reverse=False)

    def _select(self, clause: str, params: tuple[float, ...], reverse: bool) -> ShadowRows:
        with self._lock:
            found = self._db.execute(
                f"SELECT t, served_exit, probs FROM rows {clause}", params
            ).fetchall()
        if reverse:
            found.reverse()
        shape = (self.num_exits + int(self.plain), self.num_classes)
        probs = np.empty((len(found), *shape), dtype=np.float32)
        for i, (_, _, blob) in enumerate(found):
            probs[i] = np.frombuffer(blob, dtype=np.float32).reshape(shape)
        return ShadowRows(
            times=np.array([r[0] for r in found], dtype=np.float64),
            served_exits=np.array([r[1] for r in found], dtype=np.int64),
            exit_probs=probs[:, : self.num_exits],
            plain_probs=probs[:, -1] if self.plain else None,
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _OtherModel(Exception):
    """The file holds another model's sample."""
