"""Calibration arrays for tuning: read from a file, or collected through the runtime and cached.

Collecting runs every exit on every row of a split, the slow part of tuning, so the result is
cached as an `.npz` (see `core.calibration`) keyed by the bundle's segment sha256s, the
dataset, the split and the data directory: retuning with other options reuses it, and a
re-exported bundle never picks up stale probabilities.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.bundle import Manifest
from core.calibration import CalibrationError, collect_calibration, load_calibration
from core.calibration import save_calibration as _save_calibration
from thresholds.errors import TuningError
from thresholds.runner import RuntimeOptions

logger = logging.getLogger(__name__)

CACHE_DIR_NAME = "calibration_cache"


@dataclass(frozen=True, eq=False)
class Calibration:
    exit_probs: np.ndarray  # N×K×C float32
    labels: np.ndarray  # N int64
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # file it came from, for provenance

    @property
    def num_rows(self) -> int:
        return int(self.exit_probs.shape[0])

    @property
    def num_exits(self) -> int:
        return int(self.exit_probs.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.exit_probs.shape[2])


def bundle_sha256(manifest: Manifest) -> str:
    """One digest for the segments that produce the probabilities (their sha256s, in order)."""
    joined = "\n".join(s.sha256 for s in manifest.segments)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


def check_against_manifest(calibration: Calibration, manifest: Manifest, what: str) -> None:
    """TuningError when the arrays cannot belong to this bundle (exit or class count)."""
    if calibration.num_rows == 0:
        raise TuningError(f"{what} is empty (0 rows)")
    if calibration.num_exits != manifest.num_exits:
        raise TuningError(
            f"{what} has {calibration.num_exits} exits but the bundle has {manifest.num_exits}"
        )
    if calibration.num_classes != manifest.num_classes:
        raise TuningError(
            f"{what} has {calibration.num_classes} classes but the bundle has "
            f"{manifest.num_classes}"
        )
    recorded = calibration.meta.get("segment_sha256")
    if isinstance(recorded, list) and recorded != [s.sha256 for s in manifest.segments]:
        logger.warning(
            "%s was collected on a different export of this model (segment sha256s "
            "differ): thresholds may not transfer",
            what,
        )


def read_calibration_file(path: str | os.PathLike[str]) -> Calibration:
    """Load an `.npz` written by `core.calibration.save_calibration` (or the same layout)."""
    try:
        exit_probs, labels, meta = load_calibration(path)
    except CalibrationError as exc:
        raise TuningError(str(exc)) from exc
    return Calibration(exit_probs, labels, meta, source=os.fspath(path))


def cache_path(
    cache_dir: str | os.PathLike[str],
    manifest: Manifest,
    dataset: str,
    split: str,
    data_dir: str | os.PathLike[str],
) -> Path:
    key = json.dumps(
        {
            "segments": [s.sha256 for s in manifest.segments],
            "dataset": dataset,
            "split": split,
            "data_dir": os.fspath(Path(data_dir).resolve()),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return Path(cache_dir) / f"calibration-{dataset}-{split}-{digest}.npz"


def collect(
    bundle_dir: str | os.PathLike[str],
    manifest: Manifest,
    dataset: str,
    data_dir: str | os.PathLike[str],
    split: str,
    batch_size: int = 256,
    options: RuntimeOptions | None = None,
    runtime: Any = None,
) -> Calibration:
    """Run the split through every exit of the bundle (serving runtime, full mode)."""
    from core.datasets import load_split

    data = load_split(dataset, data_dir, split)
    if len(data) == 0:
        raise TuningError(f"{dataset} split '{split}' in {data_dir} is empty")
    if len(data.classes) != manifest.num_classes:
        raise TuningError(
            f"{dataset} has {len(data.classes)} classes but the bundle has {manifest.num_classes}"
        )
    if runtime is None:
        runtime = (options or RuntimeOptions()).open(bundle_dir)
    logger.info(
        "collecting calibration: %d %s/%s images through %d exits",
        len(data),
        dataset,
        split,
        manifest.num_exits,
    )
    exit_probs, labels = collect_calibration(runtime, data.images, data.labels, batch_size)
    meta = {
        "bundle_sha256": bundle_sha256(manifest),
        "segment_sha256": [s.sha256 for s in manifest.segments],
        "bundle_name": manifest.name,
        "bundle_version": manifest.version,
        "dataset": dataset,
        "split": split,
        "data_dir": os.fspath(Path(data_dir).resolve()),
        "num_exits": manifest.num_exits,
        "num_classes": manifest.num_classes,
        "rows": int(labels.shape[0]),
        "collected_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return Calibration(exit_probs, labels, meta, source="runtime")


def load_or_collect(
    bundle_dir: str | os.PathLike[str],
    manifest: Manifest,
    dataset: str,
    data_dir: str | os.PathLike[str],
    split: str,
    batch_size: int = 256,
    cache_dir: str | os.PathLike[str] | None = None,
    options: RuntimeOptions | None = None,
    write_cache: bool = True,
    runtime: Any = None,
) -> Calibration:
    """The cached calibration for (bundle, dataset, split, data dir), collected when missing.

    The cache lives in `cache_dir` (default: `<bundle>/calibration_cache/`); a cache that
    cannot be written only costs a warning.
    """
    directory = Path(cache_dir) if cache_dir is not None else Path(bundle_dir) / CACHE_DIR_NAME
    path = cache_path(directory, manifest, dataset, split, data_dir)
    if path.is_file():
        try:
            cached = read_calibration_file(path)
            check_against_manifest(cached, manifest, f"cached calibration {path}")
            logger.info("using cached calibration %s (%d rows)", path, cached.num_rows)
            return cached
        except TuningError as exc:
            logger.warning("ignoring unusable calibration cache: %s", exc)
    calibration = collect(
        bundle_dir, manifest, dataset, data_dir, split, batch_size, options, runtime
    )
    if write_cache:
        try:
            saved = _save_calibration(
                path, calibration.exit_probs, calibration.labels, calibration.meta
            )
            logger.info("calibration cached at %s", saved)
            calibration = Calibration(
                calibration.exit_probs,
                calibration.labels,
                calibration.meta,
                source=os.fspath(saved),
            )
        except OSError as exc:
            logger.warning("could not cache calibration in %s: %s", directory, exc)
    return calibration
