"""Calibration arrays for tuning: read from a file, or collected through the runtime and cached.

Collecting runs every exit on every row of a split, the slow part of tuning, so the result is
cached as an `.npz` (see `core.calibration`) keyed by the bundle's segment sha256s, the
dataset, the split and the data directory: retuning with other options reuses it, and a
re-exported bundle never picks up stale probabilities.

The bundle's plain model (`core.bundle.plain_graph`: what tuning compares early exit with) is
collected the same way, as a one-"exit" calibration keyed by that graph's sha256, so the tuning
bound can pair its answers with the early exits' row by row.
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

from core.bundle import Manifest, plain_graph
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


def check_plain(calibration: Calibration, manifest: Manifest, what: str) -> None:
    """TuningError unless the arrays are the bundle's plain model on some rows (one output per
    row with the bundle's class count, collected from the graph the manifest names now)."""
    if calibration.num_rows == 0:
        raise TuningError(f"{what} is empty (0 rows)")
    if calibration.num_exits != 1 or calibration.num_classes != manifest.num_classes:
        raise TuningError(
            f"{what} has shape {list(calibration.exit_probs.shape)}, not N×1×{manifest.num_classes}"
        )
    if calibration.meta.get("plain_graph_sha256") != plain_graph(manifest).sha256:
        raise TuningError(f"{what} was collected from another plain graph")


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
    plain: bool = False,
) -> Path:
    graphs = [plain_graph(manifest).sha256] if plain else [s.sha256 for s in manifest.segments]
    key = json.dumps(
        {
            "segments": graphs,
            "dataset": dataset,
            "split": split,
            "data_dir": os.fspath(Path(data_dir).resolve()),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    kind = "plain" if plain else "calibration"
    return Path(cache_dir) / f"{kind}-{dataset}-{split}-{digest}.npz"


def collect(
    bundle_dir: str | os.PathLike[str],
    manifest: Manifest,
    dataset: str,
    data_dir: str | os.PathLike[str],
    split: str,
    batch_size: int = 256,
    options: RuntimeOptions | None = None,
    runtime: Any = None,
    plain: bool = False,
) -> Calibration:
    """Run the split through every exit of the bundle (serving runtime, full mode), or with
    `plain` through its plain model (N×1×C)."""
    from core.datasets import load_split

    data = load_split(dataset, data_dir, split)
    if len(data) == 0:
        raise TuningError(f"{dataset} split '{split}' in {data_dir} is empty")
    if len(data.classes) != manifest.num_classes:
        raise TuningError(
            f"{dataset} has {len(data.classes)} classes but the bundle has {manifest.num_classes}"
        )
    if runtime is None:
        runtime = (options or RuntimeOptions()).open(bundle_dir, plain=plain)
    logger.info(
        "collecting calibration: %d %s/%s images through %s",
        len(data),
        dataset,
        split,
        f"the plain model ({plain_graph(manifest).file})"
        if plain
        else f"{manifest.num_exits} exits",
    )
    exit_probs, labels = collect_calibration(
        runtime, data.images, data.labels, batch_size, plain=plain
    )
    meta: dict[str, Any] = {
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
    if plain:
        meta.update(num_exits=1, plain_graph_sha256=plain_graph(manifest).sha256)
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
    plain: bool = False,
) -> Calibration:
    """The cached calibration for (bundle, dataset, split, data dir), collected when missing;
    with `plain`, the bundle's plain model's (N×1×C).

    The cache lives in `cache_dir` (default: `<bundle>/calibration_cache/`); a cache that
    cannot be written only costs a warning.
    """
    directory = Path(cache_dir) if cache_dir is not None else Path(bundle_dir) / CACHE_DIR_NAME
    path = cache_path(directory, manifest, dataset, split, data_dir, plain)
    check = check_plain if plain else check_against_manifest
    if path.is_file():
        try:
            cached = read_calibration_file(path)
            check(cached, manifest, f"cached calibration {path}")
            logger.info("using cached calibration %s (%d rows)", path, cached.num_rows)
            return cached
        except TuningError as exc:
            logger.warning("ignoring unusable calibration cache: %s", exc)
    calibration = collect(
        bundle_dir, manifest, dataset, data_dir, split, batch_size, options, runtime, plain
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
