"""Calibration data: every exit's probabilities on a labelled split, saved as one `.npz`.

Threshold tuning (`thresholds/`) and benchmarks work on these arrays instead of re-running the
network: `exit_probs` N×K×C float32 (exit k's softmax for row n), `labels` int64 N, and `meta`
(a JSON string: bundle_sha256, dataset, split, num_exits, num_classes, ...). What to do with
them, the early-exit rule, is `core.decision`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """A calibration file or array is missing, malformed or inconsistent; names the problem."""


def collect_calibration(
    runtime: Any,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int = 256,
    progress: bool = True,
    plain: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Run uint8 N×H×W×C `images` through every exit of `runtime` (an EarlyExitRuntime), or
    with `plain` through the one graph of a plain-model runtime (its `run`; K = 1).

    Returns (exit_probs N×K×C float32, labels int64 N).
    """
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim not in (3, 4) or images.shape[0] != labels.shape[0]:
        raise CalibrationError(
            f"images ({list(images.shape)}) and labels ({list(labels.shape)}) do not match"
        )
    if batch_size < 1:
        raise CalibrationError(f"batch_size must be >= 1, got {batch_size}")
    n = images.shape[0]
    manifest = runtime.manifest
    exits = 1 if plain else manifest.num_exits
    out = np.empty((n, exits, manifest.num_classes), dtype=np.float32)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="calibration", unit="batch", leave=False)
    for start in starts:
        stop = min(start + batch_size, n)
        batch = runtime.preprocess(images[start:stop])
        if plain:
            out[start:stop, 0] = runtime.run(batch)
        else:
            out[start:stop] = runtime.classify(batch, full=True).exit_probs
    return out, labels


def _check_arrays(exit_probs: np.ndarray, labels: np.ndarray, where: str) -> None:
    if exit_probs.ndim != 3 or exit_probs.dtype != np.float32:
        raise CalibrationError(
            f"{where}: exit_probs must be float32 N×K×C, got {exit_probs.dtype} "
            f"{list(exit_probs.shape)}"
        )
    if labels.ndim != 1 or labels.shape[0] != exit_probs.shape[0]:
        raise CalibrationError(
            f"{where}: labels must have shape [{exit_probs.shape[0]}], got {list(labels.shape)}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise CalibrationError(f"{where}: labels must be integers, got {labels.dtype}")


def save_calibration(
    path: str | os.PathLike[str],
    exit_probs: np.ndarray,
    labels: np.ndarray,
    meta: dict[str, Any],
) -> Path:
    """Write the arrays and `meta` atomically (temp file in the same directory, then rename)."""
    exit_probs = np.asarray(exit_probs)
    labels = np.asarray(labels)
    _check_arrays(exit_probs, labels, os.fspath(path))
    target = Path(path)
    if target.suffix != ".npz":
        target = target.with_name(target.name + ".npz")  # np.savez would append it anyway
    target.parent.mkdir(parents=True, exist_ok=True)
    meta_json = json.dumps(meta, sort_keys=True, default=str)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        exit_probs=exit_probs,
        labels=labels.astype(np.int64, copy=False),
        meta=np.array(meta_json),
    )
    atomic_write_bytes(target, buffer.getvalue())
    return target


def load_calibration(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a file written by `save_calibration`: (exit_probs, labels, meta)."""
    source = Path(path)
    if not source.is_file():
        raise CalibrationError(f"calibration file not found: {source}")
    try:
        with np.load(source, allow_pickle=False) as data:
            missing = [key for key in ("exit_probs", "labels", "meta") if key not in data.files]
            if missing:
                raise CalibrationError(f"{source}: missing array(s) {', '.join(missing)}")
            exit_probs = data["exit_probs"]
            labels = data["labels"]
            meta_text = str(data["meta"])
    except CalibrationError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationError(f"{source}: not a calibration .npz file ({exc})") from exc
    try:
        meta = json.loads(meta_text)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{source}: 'meta' is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise CalibrationError(f"{source}: 'meta' must be a JSON object")
    _check_arrays(exit_probs, labels, os.fspath(source))
    return exit_probs, labels.astype(np.int64, copy=False), meta
