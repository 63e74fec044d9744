"""What a row costs: per-segment MACs from the manifest, or latency measured on this machine.

A row answered at exit k costs segments 1..k; a fallback row costs all K; acceleration is the
full model's cost divided by the mean cost per row. Like the runtime, a disabled exit (t ≥ 1.0)
whose segment has a `stage_file` costs only its stage (no head) when the head's probabilities
cannot matter: fallback "last", or exit K accepting every row (t_K < 1/C) —
`core.decision.skipped_heads`, the rule `serving.runtime.EarlyExitRuntime.stage_skips` applies.
With fallback "plain" a row no exit accepts costs the segments up to the last enabled exit
(`core.decision.chain_segments`) and then the plain graph (`CostModel.plain_cost`).

With `--cost latency` the per-segment and full-model costs are seconds per row measured with the
serving runtime at one batch size and kept in the bundle as `latency_profile.json`, reused while
the bundle's files, the batch size, the execution providers, the thread count and the host are
unchanged.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import atomic_write_json
from core.bundle import Manifest, plain_macs
from core.costs import plain_fallback_costs
from core.decision import chain_segments, skipped_heads
from thresholds.errors import TuningError
from thresholds.runner import RuntimeOptions

logger = logging.getLogger(__name__)

COST_KINDS = ("macs", "latency")
LATENCY_PROFILE_FILE = "latency_profile.json"
LATENCY_PROFILE_FORMAT = "earlyexit-latency/1"


@dataclass(frozen=True)
class CostModel:
    """Per-segment costs (segment k alone) and the full model's cost, in one unit."""

    segment_costs: tuple[float, ...]
    full_model: float
    unit: str  # "macs" or "seconds"
    source: str = ""
    # Segment k run as its stage file (no exit head), for disabled exits; None = no stage files.
    stage_costs: tuple[float, ...] | None = None
    # The plain graph a fallback "plain" row runs; None = it costs what the full model does.
    plain: float | None = None

    def __post_init__(self) -> None:
        values = (
            *self.segment_costs,
            self.full_model,
            *(self.stage_costs or ()),
            *(() if self.plain is None else (self.plain,)),
        )
        if not self.segment_costs or not all(math.isfinite(v) and v > 0 for v in values):
            raise TuningError("segment and full-model costs must be positive finite numbers")
        if self.stage_costs is not None and len(self.stage_costs) != len(self.segment_costs):
            raise TuningError("stage_costs needs one entry per segment")

    @property
    def num_exits(self) -> int:
        return len(self.segment_costs)

    @property
    def plain_cost(self) -> float:
        """What the plain graph costs a row that falls back to it (fallback "plain")."""
        return self.full_model if self.plain is None else self.plain

    def exit_costs(self, fallback: str = "ensemble") -> np.ndarray:
        """K+1 costs with every exit enabled: answering at exit 1..K (cumulative), then the
        fallback (all K, and the plain graph with fallback "plain")."""
        cumulative = np.cumsum(np.asarray(self.segment_costs, dtype=np.float64))
        extra = self.plain_cost if fallback == "plain" else 0.0
        return np.append(cumulative, cumulative[-1] + extra)

    def exit_cost_matrix(
        self, thresholds: np.ndarray, fallback: str, num_classes: int
    ) -> np.ndarray:
        """P×(K+1) exit costs for P threshold vectors, with disabled exits run as stages."""
        segments = np.broadcast_to(
            np.asarray(self.segment_costs, dtype=np.float64), thresholds.shape
        )
        if self.stage_costs is not None:
            skip = skipped_heads(thresholds, fallback, num_classes)
            segments = np.where(skip, np.asarray(self.stage_costs, dtype=np.float64), segments)
        cumulative = np.cumsum(segments, axis=1)
        if fallback != "plain":
            return np.concatenate([cumulative, cumulative[:, -1:]], axis=1)
        ran = chain_segments(thresholds, fallback)  # P: segments a fallback row runs
        rest = plain_fallback_costs(segments, ran, self.plain_cost)
        return np.concatenate([cumulative, rest[:, None]], axis=1)

    @property
    def full_depth_acceleration(self) -> float:
        """Acceleration when every row runs all K segments (below 1: the heads cost extra)."""
        return self.full_model / float(np.sum(self.segment_costs))

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "source": self.source,
            "segments": list(self.segment_costs),
            "stages": None if self.stage_costs is None else list(self.stage_costs),
            "full_model": self.full_model,
            "plain": self.plain_cost,
        }


def macs_cost_model(manifest: Manifest) -> CostModel:
    """Costs from `segments[k].macs` (`stage_macs` for stage files) and `full_model.macs`."""
    segments = tuple(float(s.macs) for s in manifest.segments)
    stages = tuple(
        float(s.stage_macs) if s.stage_file and s.stage_macs else float(s.macs)
        for s in manifest.segments
    )
    return CostModel(
        segment_costs=segments,
        full_model=float(manifest.full_model.macs),
        unit="macs",
        source="manifest",
        stage_costs=stages if stages != segments else None,
        plain=float(plain_macs(manifest)),
    )


@dataclass(frozen=True)
class LatencyProfile:
    """Median seconds per row of each segment (exit head included), of each segment run as its
    stage file (no head; the segment's own time where it has none), and of the full model."""

    batch_size: int
    requested_providers: tuple[str, ...]  # what was asked for; empty = the runtime's default
    intra_op_threads: int  # as asked for; 0 = onnxruntime's default
    providers: tuple[str, ...]  # what the runtime actually used
    segment_sha256: tuple[str, ...]
    full_model_sha256: str
    segment_seconds: tuple[float, ...]
    stage_seconds: tuple[float, ...] | None
    full_model_seconds: float
    repeats: int
    host: str
    measured_at: str
    format: str = LATENCY_PROFILE_FORMAT

    def matches(self, manifest: Manifest, batch_size: int, options: RuntimeOptions) -> bool:
        return (
            self.format == LATENCY_PROFILE_FORMAT
            and self.batch_size == batch_size
            and self.requested_providers == tuple(options.providers or ())
            and self.intra_op_threads == options.intra_op_threads
            and self.segment_sha256 == tuple(s.sha256 for s in manifest.segments)
            and self.full_model_sha256 == manifest.full_model.sha256
            and self.host == platform.node()
        )

    def cost_model(self) -> CostModel:
        return CostModel(
            segment_costs=self.segment_seconds,
            full_model=self.full_model_seconds,
            unit="seconds",
            source=f"latency profile, batch {self.batch_size}, {'/'.join(self.providers)}",
            stage_costs=self.stage_seconds,
        )


def read_latency_profile(path: str | os.PathLike[str]) -> LatencyProfile | None:
    """The stored profile, or None when absent or unreadable (it is then measured again)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        stages = data.get("stage_seconds")
        return LatencyProfile(
            batch_size=int(data["batch_size"]),
            requested_providers=tuple(data["requested_providers"]),
            intra_op_threads=int(data["intra_op_threads"]),
            providers=tuple(data["providers"]),
            segment_sha256=tuple(data["segment_sha256"]),
            full_model_sha256=str(data["full_model_sha256"]),
            segment_seconds=tuple(float(v) for v in data["segment_seconds"]),
            stage_seconds=None if stages is None else tuple(float(v) for v in stages),
            full_model_seconds=float(data["full_model_seconds"]),
            repeats=int(data["repeats"]),
            host=str(data["host"]),
            measured_at=str(data["measured_at"]),
            format=str(data.get("format", "")),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable latency profile %s (%s)", path, exc)
        return None


def _median_segment_seconds(
    runtime: Any, batch: np.ndarray, repeats: int, warmup: int, **classify: Any
) -> list[float]:
    k = runtime.manifest.num_exits
    samples: list[list[float]] = [[] for _ in range(k)]
    for i in range(warmup + repeats):
        seconds = list(runtime.classify(batch, **classify).segment_seconds)
        if len(seconds) != k:
            raise TuningError(f"runtime reported {len(seconds)} segment timings for {k} segments")
        if i >= warmup:
            for j, value in enumerate(seconds):
                samples[j].append(float(value))
    return [statistics.median(v) for v in samples]


def _median_full_model_seconds(runtime: Any, batch: np.ndarray, repeats: int, warmup: int) -> float:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        runtime.run_full_model(batch)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_latency_profile(
    bundle_dir: str | os.PathLike[str],
    manifest: Manifest,
    batch_size: int,
    repeats: int = 20,
    warmup: int = 3,
    options: RuntimeOptions | None = None,
) -> LatencyProfile:
    """Time each segment, each stage file and the full model with the serving runtime."""
    options = options or RuntimeOptions()
    runtime = options.open(bundle_dir)
    rng = np.random.default_rng(0)  # latency does not depend on pixel values
    batch = rng.standard_normal((batch_size, *manifest.input.shape)).astype(np.float32)
    segments = _median_segment_seconds(runtime, batch, repeats, warmup, full=True)
    stages = None
    # Exits 1..K-1 disabled and exit K accepting everything: the runtime then runs every
    # segment that has a stage file without its head, and every row through every segment.
    probe = [1.0] * (manifest.num_exits - 1) + [0.0]
    skips = runtime.stage_skips(probe)
    if any(skips):
        probed = _median_segment_seconds(runtime, batch, repeats, warmup, thresholds=probe)
        stages = tuple(
            (p if skip else s) / batch_size
            for p, s, skip in zip(probed, segments, skips, strict=True)
        )
    full = _median_full_model_seconds(runtime, batch, repeats, warmup)
    return LatencyProfile(
        batch_size=batch_size,
        requested_providers=tuple(options.providers or ()),
        intra_op_threads=options.intra_op_threads,
        providers=tuple(runtime.providers),
        segment_sha256=tuple(s.sha256 for s in manifest.segments),
        full_model_sha256=manifest.full_model.sha256,
        segment_seconds=tuple(s / batch_size for s in segments),
        stage_seconds=stages,
        full_model_seconds=full / batch_size,
        repeats=repeats,
        host=platform.node(),
        measured_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def latency_cost_model(
    bundle_dir: str | os.PathLike[str],
    manifest: Manifest,
    batch_size: int,
    options: RuntimeOptions | None = None,
    repeats: int = 20,
    write: bool = True,
) -> CostModel:
    """Costs from the bundle's latency profile, measured (and saved atomically) when stale."""
    options = options or RuntimeOptions()
    path = Path(bundle_dir) / LATENCY_PROFILE_FILE
    stored = read_latency_profile(path)
    if stored is not None and stored.matches(manifest, batch_size, options):
        logger.info("reusing latency profile %s (measured %s)", path, stored.measured_at)
        return stored.cost_model()
    logger.info("measuring per-segment latency at batch size %d (%d repeats)", batch_size, repeats)
    profile = measure_latency_profile(bundle_dir, manifest, batch_size, repeats, 3, options)
    if write:
        atomic_write_json(path, asdict(profile))
        logger.info("latency profile saved to %s", path)
    return profile.cost_model()


def cost_model(
    kind: str,
    bundle_dir: str | os.PathLike[str],
    manifest: Manifest,
    batch_size: int = 32,
    options: RuntimeOptions | None = None,
    repeats: int = 20,
    write: bool = True,
) -> CostModel:
    """`macs` from the manifest or `latency` measured with the runtime."""
    if kind == "macs":
        return macs_cost_model(manifest)
    if kind == "latency":
        if repeats < 1:
            raise TuningError(f"latency repeats must be >= 1, got {repeats}")
        return latency_cost_model(bundle_dir, manifest, batch_size, options, repeats, write)
    raise TuningError(f"--cost must be one of {COST_KINDS}, got {kind!r}")
