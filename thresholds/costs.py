"""What a row costs: per-segment MACs from the manifest, or latency measured on this machine.

A row answered at exit k costs segments 1..k; a fallback row costs all K; acceleration is the
full model's cost divided by the mean cost per row. With `--cost latency` the per-segment and
full-model costs are seconds per row measured with the serving runtime at one batch size and
kept in the bundle as `latency_profile.json`, reused while the bundle's files, the batch size,
the execution providers and the host are unchanged.
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

from serving.bundle import Manifest, atomic_write_json
from thresholds.errors import TuningError

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

    def __post_init__(self) -> None:
        values = (*self.segment_costs, self.full_model)
        if not self.segment_costs or not all(math.isfinite(v) and v > 0 for v in values):
            raise TuningError("segment and full-model costs must be positive finite numbers")

    @property
    def num_exits(self) -> int:
        return len(self.segment_costs)

    def exit_costs(self) -> np.ndarray:
        """K+1 costs: answering at exit 1..K (cumulative), then the fallback (all K)."""
        cumulative = np.cumsum(np.asarray(self.segment_costs, dtype=np.float64))
        return np.append(cumulative, cumulative[-1])

    @property
    def full_depth_acceleration(self) -> float:
        """Acceleration when every row runs all K segments (below 1: the heads cost extra)."""
        return self.full_model / float(np.sum(self.segment_costs))

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "source": self.source,
            "segments": list(self.segment_costs),
            "full_model": self.full_model,
        }


def macs_cost_model(manifest: Manifest) -> CostModel:
    """Costs from `segments[k].macs` and `full_model.macs` in the manifest."""
    return CostModel(
        segment_costs=tuple(float(m) for m in manifest.segment_macs()),
        full_model=float(manifest.full_model.macs),
        unit="macs",
        source="manifest",
    )


@dataclass(frozen=True)
class LatencyProfile:
    """Median seconds per row of each segment (full mode, exit heads included) and full model."""

    batch_size: int
    requested_providers: tuple[str, ...]  # what was asked for; empty = the runtime's default
    providers: tuple[str, ...]  # what the runtime actually used
    segment_sha256: tuple[str, ...]
    full_model_sha256: str
    segment_seconds: tuple[float, ...]
    full_model_seconds: float
    repeats: int
    host: str
    measured_at: str
    format: str = LATENCY_PROFILE_FORMAT

    def matches(self, manifest: Manifest, batch_size: int, providers: tuple[str, ...]) -> bool:
        return (
            self.format == LATENCY_PROFILE_FORMAT
            and self.batch_size == batch_size
            and self.requested_providers == providers
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
        )


def read_latency_profile(path: str | os.PathLike[str]) -> LatencyProfile | None:
    """The stored profile, or None when absent or unreadable (it is then measured again)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return LatencyProfile(
            batch_size=int(data["batch_size"]),
            requested_providers=tuple(data["requested_providers"]),
            providers=tuple(data["providers"]),
            segment_sha256=tuple(data["segment_sha256"]),
            full_model_sha256=str(data["full_model_sha256"]),
            segment_seconds=tuple(float(v) for v in data["segment_seconds"]),
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


def _time_full_model(
    bundle_dir: Path, manifest: Manifest, batch: np.ndarray, providers: list[str], repeats: int,
    warmup: int,
) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(bundle_dir / manifest.full_model.file), providers=providers
    )
    feed = {manifest.full_model.input_name: batch}
    outputs = [manifest.full_model.probs_output]
    for _ in range(warmup):
        session.run(outputs, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(outputs, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_latency_profile(
    bundle_dir: str | os.PathLike[str],
    manifest: Manifest,
    batch_size: int,
    repeats: int = 20,
    warmup: int = 3,
    providers: tuple[str, ...] | None = None,
) -> LatencyProfile:
    """Time each segment (serving runtime, full mode) and the full model at `batch_size`."""
    from serving.runtime import EarlyExitRuntime

    bundle = Path(bundle_dir)
    kwargs: dict[str, Any] = {} if providers is None else {"providers": list(providers)}
    runtime = EarlyExitRuntime(bundle, **kwargs)
    used = tuple(getattr(runtime, "providers", None) or providers or ("CPUExecutionProvider",))
    rng = np.random.default_rng(0)  # latency does not depend on pixel values
    batch = rng.standard_normal((batch_size, *manifest.input.shape)).astype(np.float32)
    k = manifest.num_exits
    per_segment: list[list[float]] = [[] for _ in range(k)]
    for _ in range(warmup):
        runtime.classify(batch, full=True)
    for _ in range(repeats):
        result = runtime.classify(batch, full=True)
        seconds = list(result.segment_seconds)
        if len(seconds) != k:
            raise TuningError(f"runtime reported {len(seconds)} segment timings for {k} segments")
        for j, s in enumerate(seconds):
            per_segment[j].append(float(s))
    full = _time_full_model(bundle, manifest, batch, list(used), repeats, warmup)
    return LatencyProfile(
        batch_size=batch_size,
        requested_providers=tuple(providers or ()),
        providers=used,
        segment_sha256=tuple(s.sha256 for s in manifest.segments),
        full_model_sha256=manifest.full_model.sha256,
        segment_seconds=tuple(statistics.median(v) / batch_size for v in per_segment),
        full_model_seconds=full / batch_size,
        repeats=repeats,
        host=platform.node(),
        measured_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def latency_cost_model(
    bundle_dir: str | os.PathLike[str],
    manifest: Manifest,
    batch_size: int,
    providers: tuple[str, ...] | None = None,
    repeats: int = 20,
    write: bool = True,
) -> CostModel:
    """Costs from the bundle's latency profile, measured (and saved atomically) when stale."""
    path = Path(bundle_dir) / LATENCY_PROFILE_FILE
    stored = read_latency_profile(path)
    if stored is not None and stored.matches(manifest, batch_size, tuple(providers or ())):
        logger.info("reusing latency profile %s (measured %s)", path, stored.measured_at)
        return stored.cost_model()
    logger.info("measuring per-segment latency at batch size %d (%d repeats)", batch_size, repeats)
    profile = measure_latency_profile(bundle_dir, manifest, batch_size, repeats, 3, providers)
    if write:
        payload = asdict(profile)
        atomic_write_json(path, payload)
        logger.info("latency profile saved to %s", path)
    return profile.cost_model()


def cost_model(
    kind: str,
    bundle_dir: str | os.PathLike[str],
    manifest: Manifest,
    batch_size: int = 32,
    providers: tuple[str, ...] | None = None,
    write: bool = True,
) -> CostModel:
    """`macs` from the manifest or `latency` measured with the runtime."""
    if kind == "macs":
        return macs_cost_model(manifest)
    if kind == "latency":
        return latency_cost_model(bundle_dir, manifest, batch_size, providers, write=write)
    raise TuningError(f"--cost must be one of {COST_KINDS}, got {kind!r}")
