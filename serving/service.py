"""The serving state of one app: settings, metrics, the runtime once loaded, the batcher, and the
threshold lifecycle (swap via the API, re-read on SIGHUP). No HTTP here: routes translate the
exceptions raised below into status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal

from core.bundle import (
    MANIFEST_FILE,
    BundleError,
    Manifest,
    Thresholds,
    check_tuned_record,
    read_thresholds,
    validate_threshold_values,
    write_thresholds,
)
from core.drift import QuantileReference, confidence_reference, read_reference
from serving.batching import DynamicBatcher
from serving.decode_pool import DecodePool
from serving.metrics import ServingMetrics
from serving.plain_runtime import PlainModelRuntime
from serving.runtime import EarlyExitRuntime
from serving.settings import Settings
from serving.shadow import ShadowSampler, agreement_signals, drift_signal, drop_alert
from serving.shadow_store import ShadowRows, ShadowStore, store_path
from serving.state_dir import default_state_dir, serving_dir

logger = logging.getLogger(__name__)
# Earlier tuning records kept in `tuned.history`, newest first, each with the thresholds it
# described: enough to see and undo recent manual changes, small enough to stay in the file.
HISTORY_LIMIT = 10


class NotReadyError(RuntimeError):
    """The bundle is still loading, or failed to load (503)."""


class PersistError(RuntimeError):
    """thresholds.json could not be written; the old thresholds stay in force."""


class ShadowUnavailableError(RuntimeError):
    """No live sample to read or tune on (sampling off, or its store failed to open): 409."""


class ShadowSampleTooSmallError(RuntimeError):
    """The live window has too few rows for a guarded retune (409); says how many are needed."""

    def __init__(self, rows: int, needed: int) -> None:
        super().__init__(
            f"the live window has {rows} rows; a guarded retune needs at least {needed}: wait "
            f"for more traffic or raise EARLYEXIT_SHADOW_RATE"
        )
        self.rows, self.needed = rows, needed


class RetuneBusyError(RuntimeError):
    """Another retune is running; retunes never run two at once (409)."""


class TuneUnavailableError(RuntimeError):
    """The `tune` extra (deap) is not installed on this server (501)."""


class RetuneInputError(ValueError):
    """EPS, Z or another retune parameter is out of range (422)."""


class NoThresholdsError(RuntimeError):
    """The server serves the plain model (`--full-model`): there are no thresholds (409)."""


NO_THRESHOLDS = (
    "this server serves the plain model (earlyexit-serve --full-model): it has no exits and "
    "no thresholds to change; serve the bundle without --full-model to tune it"
)
SHADOW_OFF = "shadow sampling is off: set EARLYEXIT_SHADOW_RATE above 0 to collect a live sample"
# Prometheus gauges are refreshed from the sample at most this often (by the shadow thread).
SIGNALS_REFRESH_S = 2.0
MODE_EARLY_EXIT: Final = "early_exit"
MODE_FULL_MODEL: Final = "full_model"
# What a server runs: the early-exit chain, or the plain model with `--full-model`.
ServedRuntime = EarlyExitRuntime | PlainModelRuntime


class ServingState:
    """Everything a request handler needs, created by `create_app` and filled by the lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServingMetrics()
        self.runtime: ServedRuntime | None = None
        self.batcher: DynamicBatcher | None = None
        self.load_error: str | None = None
        self.tuned: dict[str, Any] = {}
        # tuned.reference read once per thresholds record (a bad one is logged once).
        self._reference_of: dict[str, Any] | None = None
        self._reference: QuantileReference | None = None
        self.decoder = DecodePool(
            workers=settings.decode_workers,
            memory_budget_bytes=settings.decode_memory_mb * 1024 * 1024,
            max_pixels=settings.max_image_pixels,
        )
        # The directory served from: the bundle itself, or a writable copy of the packaged
        # default one (serving.state_dir), decided when loading.
        self.bundle_dir = Path(settings.bundle)
        self.read_only_reason: str | None = None
        self._threshold_lock = asyncio.Lock()
        self._retune_lock = asyncio.Lock()
        self._stopping = False
        self.shadow: ShadowSampler | None = None
        self.shadow_error: str | None = None
        self._signals_at = 0.0
        self._retune_task: asyncio.Task[None] | None = None

    @property
    def serves_plain_model(self) -> bool:
        """True with `--full-model`: the bundle's plain single graph answers every image."""
        return bool(self.settings.full_model)

    @property
    def mode(self) -> Literal["early_exit", "full_model"]:
        return MODE_FULL_MODEL if self.serves_plain_model else MODE_EARLY_EXIT

    def served_graph(self) -> dict[str, Any] | None:
        """The plain graph served with `--full-model` (file, sha256, source, macs), else None."""
        return self.runtime.describe() if isinstance(self.runtime, PlainModelRuntime) else None

    @property
    def ready(self) -> bool:
        return self.runtime is not None and self.batcher is not None

    def require_ready(self) -> tuple[ServedRuntime, DynamicBatcher]:
        if self.runtime is None or self.batcher is None:
            if self.load_error:
                raise NotReadyError(f"bundle failed to load: {self.load_error}")
            raise NotReadyError("model is loading")
        return self.runtime, self.batcher

    def require_thresholds(self) -> tuple[EarlyExitRuntime, DynamicBatcher]:
        """The early-exit runtime and its batcher. NotReadyError while loading,
        NoThresholdsError when the plain model is served."""
        runtime, batcher = self.require_ready()
        if not isinstance(runtime, EarlyExitRuntime):
            raise NoThresholdsError(NO_THRESHOLDS)
        return runtime, batcher

    @property
    def manifest(self) -> Manifest:
        runtime, _ = self.require_ready()
        return runtime.manifest

    @property
    def thresholds(self) -> tuple[float, ...]:
        runtime, _ = self.require_ready()
        return tuple(float(t) for t in runtime.thresholds)

    @property
    def providers(self) -> list[str]:
        if self.runtime is not None and self.runtime.providers:
            return list(self.runtime.providers)
        return list(self.settings.providers)

    # ------------------------------------------------------------------ lifecycle

    def _load_runtime(self) -> ServedRuntime:
        # onnxruntime is imported by the runtime's constructor, not when the app is imported.
        if self.serves_plain_model:
            # Served in place, also the packaged default bundle: nothing is ever written.
            return PlainModelRuntime(
                self.bundle_dir,
                providers=list(self.settings.providers),
                intra_op_threads=self.settings.intra_op_threads,
                strict=self.settings.strict_providers,
            )
        self.bundle_dir, self.read_only_reason = serving_dir(
            Path(self.settings.bundle), self.settings.state_dir
        )
        return EarlyExitRuntime(
            self.bundle_dir,
            providers=list(self.settings.providers),
            intra_op_threads=self.settings.intra_op_threads,
            strict=self.settings.strict_providers,
        )

    async def load(self) -> None:
        """Load the bundle off the event loop; on failure remember why (readyz says so)."""
        started = time.perf_counter()
        try:
            runtime = await asyncio.to_thread(self._load_runtime)
        except Exception as exc:  # noqa: BLE001 - reported through /readyz and the log
            self.load_error = str(exc) or type(exc).__name__
            logger.error("bundle failed to load: %s", self.load_error)
            return
        manifest = runtime.manifest
        warmed: list[int] = []
        if self._stopping:  # e.g. the port could not be bound: nothing will be served
            logger.info("bundle load abandoned: the server is stopping")
            return
        if self.settings.warmup:
            try:
                warmed = await asyncio.to_thread(runtime.warm_up, self.settings.max_batch_size)
            except Exception as exc:  # noqa: BLE001 - a model that cannot run is not ready
                self.load_error = f"warm-up failed: {exc}"
                logger.error("bundle failed to warm up: %s", exc)
                return
        if self._stopping:
            logger.info("bundle load abandoned: the server is stopping")
            return
        self.metrics.prime(manifest.num_exits, single_graph=self.serves_plain_model)
        batcher = DynamicBatcher(
            runtime,
            max_batch_size=self.settings.max_batch_size,
            max_batch_wait_s=self.settings.max_batch_wait_s,
            adaptive_wait=self.settings.batch_wait == "adaptive",
            inline_max_s=self.settings.inline_max_s,
            queue_size=self.settings.queue_size,
            metrics=self.metrics,
        )
        batcher.start()
        self.tuned = dict(runtime.tuned)
        self.metrics.set_model(manifest.name, manifest.version, runtime.thresholds)
        self.runtime, self.batcher = runtime, batcher
        if self.settings.shadow_rate > 0 and isinstance(runtime, EarlyExitRuntime):
            try:
                await self._start_shadow(runtime, batcher)
            except Exception as exc:  # noqa: BLE001 - sampling is optional; answers are not
                self.shadow_error = f"shadow sampling could not start: {exc}"
                logger.exception(self.shadow_error)
        logger.info(
            "bundle loaded",
            extra={
                "fields": {
                    "bundle": str(self.bundle_dir),
                    "mode": self.mode,
                    "graph": (self.served_graph() or {}).get("file"),
                    "model": manifest.name,
                    "version": manifest.version,
                    "exits": manifest.num_exits,
                    "thresholds": list(runtime.thresholds),
                    "providers": self.providers,
                    "warmed_batch_sizes": warmed,
                    "load_seconds": round(time.perf_counter() - started, 3),
                }
            },
        )

    def begin_stopping(self) -> None:
        """No batcher is started and nothing is announced from now on (a load still running in
        its thread finishes quietly)."""
        self._stopping = True

    async def shutdown(self) -> None:
        """Answer everything already queued, then release the inference and decode threads."""
        self._stopping = True
        if self.batcher is not None:
            await self.batcher.stop(timeout_s=self.settings.shutdown_timeout_s)
        if self._retune_task is not None:
            self._retune_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retune_task
        if self.shadow is not None:
            await asyncio.to_thread(self.shadow.stop)
        self.decoder.close()

    # ------------------------------------------------------------------ thresholds

    def _record(self, tuned: dict[str, Any] | None, previous: tuple[float, ...]) -> dict[str, Any]:
        """The tuning record to store with new thresholds: the client's (checked) or a manual
        one, with the record it replaces pushed onto a bounded `history`."""
        record = dict(check_tuned_record(tuned)) if tuned else {}
        record.setdefault("method", "manual")
        record.setdefault("source", "PUT /v1/thresholds")
        record.setdefault("updated_at", dt.datetime.now(dt.timezone.utc).isoformat())
        before = dict(self.tuned)
        older = before.pop("history", [])
        entry = {**before, "thresholds": list(previous)}
        kept = [h for h in older if isinstance(h, dict)] if isinstance(older, list) else []
        record["history"] = [entry, *kept][:HISTORY_LIMIT]
        return record

    async def update_thresholds(
        self, values: Sequence[Any], tuned: dict[str, Any] | None, source: str = "api"
    ) -> tuple[tuple[float, ...], tuple[float, ...], dict[str, Any], Path]:
        """Validate, persist atomically, then swap between batches. Returns (new, old, tuned,
        path). BundleError on invalid values or tuning record, PersistError when the file cannot
        be written; either way the old thresholds stay in force. NoThresholdsError when the
        plain model is served."""
        runtime, batcher = self.require_thresholds()
        checked = validate_threshold_values(values, runtime.manifest.num_exits)
        if self.read_only_reason:
            raise PersistError(f"thresholds not changed: {self.read_only_reason}")
        async with self._threshold_lock:
            previous = tuple(float(t) for t in runtime.thresholds)
            record = self._record(tuned, previous)
            try:
                path = await asyncio.to_thread(
                    write_thresholds, self.bundle_dir, Thresholds(values=checked, tuned=record)
                )
            except OSError as exc:
                raise PersistError(f"could not write thresholds.json: {exc}") from exc
            await batcher.run_exclusive(lambda: runtime.set_thresholds(checked, record))
            self.tuned = record
        self.metrics.set_thresholds(checked)
        self.metrics.threshold_updates.labels(source=source).inc()
        logger.info(
            "thresholds updated",
            extra={
                "fields": {
                    "source": source,
                    "thresholds": list(checked),
                    "previous": list(previous),
                }
            },
        )
        return checked, previous, record, path

    async def reload_thresholds(self, source: str = "reload") -> tuple[float, ...]:
        """Re-read thresholds.json (SIGHUP, reload endpoint). A missing, unreadable or invalid
        file is a BundleError and the thresholds in force stay: full depth is only ever set by
        asking for it (all 1.0). NoThresholdsError when the plain model is served."""
        runtime, batcher = self.require_thresholds()
        async with self._threshold_lock:
            loaded = await asyncio.to_thread(
                read_thresholds, self.bundle_dir, runtime.manifest.num_exits, False
            )
            await batcher.run_exclusive(lambda: runtime.set_thresholds(loaded.values, loaded.tuned))
            self.tuned = dict(loaded.tuned)
        self.metrics.set_thresholds(loaded.values)
        self.metrics.threshold_updates.labels(source=source).inc()
        logger.info(
            "thresholds reloaded",
            extra={"fields": {"source": source, "thresholds": list(loaded.values)}},
        )
        return loaded.values

    async def reload_from_signal(self) -> None:
        try:
            await self.reload_thresholds(source="sighup")
        except NoThresholdsError:
            logger.warning("SIGHUP ignored: the plain model (--full-model) has no thresholds")
        except (BundleError, NotReadyError, OSError) as exc:
            logger.error("SIGHUP: thresholds not reloaded, old ones stay: %s", exc)
        except Exception:  # a signal's task has no caller to report to: log, keep serving
            logger.exception("SIGHUP: thresholds not reloaded, old ones stay")

    # ------------------------------------------------------------------ shadow sample

    async def _start_shadow(self, runtime: EarlyExitRuntime, batcher: DynamicBatcher) -> None:
        """Open the sample's store and start sampling; a store that cannot be opened at all
        (unwritable state directory) turns sampling off with a logged reason, never a crash."""
        settings = self.settings
        manifest = runtime.manifest
        try:
            manifest_bytes = (self.bundle_dir / MANIFEST_FILE).read_bytes()
            path = store_path(settings.state_dir or default_state_dir(), manifest.name,
                              manifest_bytes)  # fmt: skip
            store = await asyncio.to_thread(
                ShadowStore, path, manifest.num_exits, manifest.num_classes,
                settings.shadow_capacity, settings.shadow_max_bytes, manifest.fallback == "plain",
            )  # fmt: skip
        except (OSError, sqlite3.Error) as exc:
            self.shadow_error = f"shadow sample store could not be opened: {exc}"
            logger.error(self.shadow_error)
            return
        metrics = self.metrics

        def on_stored(rows: int) -> None:
            metrics.shadow_rows.inc(rows)
            metrics.shadow_queue_depth.set(sampler.queue_depth)
            if time.monotonic() - self._signals_at >= SIGNALS_REFRESH_S:
                self.shadow_signals_sync()

        def on_dropped(reason: str) -> None:
            metrics.shadow_dropped.labels(reason=reason).inc()

        sampler = ShadowSampler(
            runtime,
            store,
            rate=settings.shadow_rate,
            queue_size=settings.shadow_queue_size,
            busy=lambda: batcher.depth > 0 or batcher.arriving_count > 0,
            on_stored=on_stored,
            on_dropped=on_dropped,
        )
        sampler.start()
        batcher.on_answered = sampler.offer
        self.shadow = sampler
        await asyncio.to_thread(self.shadow_signals_sync)
        if settings.retune_interval > 0:
            self._retune_task = asyncio.get_running_loop().create_task(
                self._retune_periodically(settings.retune_interval), name="earlyexit-retune"
            )
        logger.info(
            "shadow sampling on",
            extra={"fields": {"rate": settings.shadow_rate, "store": str(path),
                              "rows": store.count(), "max_rows": store.max_rows}},
        )  # fmt: skip

    def require_shadow(self) -> ShadowSampler:
        self.require_ready()
        if self.serves_plain_model:
            raise NoThresholdsError(NO_THRESHOLDS)
        if self.shadow is None:
            raise ShadowUnavailableError(self.shadow_error or SHADOW_OFF)
        return self.shadow

    def _tuned_window(self) -> tuple[float, float] | None:
        """The live window the thresholds in force were tuned on, if they were."""
        data = self.tuned.get("data")
        if not isinstance(data, dict) or data.get("source") != "live":
            return None
        window = data.get("window")
        if not isinstance(window, dict):
            return None
        try:
            return float(window["from"]), float(window["to"])
        except (KeyError, TypeError, ValueError):
            return None

    def _tuned_reference(self) -> QuantileReference | None:
        """The drift reference the thresholds in force carry (`tuned.reference`), if any."""
        tuned = self.tuned
        if self._reference_of is not tuned:
            self._reference = read_reference(tuned.get("reference"))
            self._reference_of = tuned
        return self._reference

    def shadow_signals_sync(self) -> dict[str, Any]:
        """Everything GET /v1/shadow answers (blocking: call from a thread). Also refreshes the
        Prometheus gauges."""
        sampler = self.require_shadow()
        runtime, _ = self.require_thresholds()
        store = sampler.store
        settings = self.settings
        recent = store.recent(settings.shadow_window)
        thresholds = tuple(float(t) for t in runtime.thresholds)
        live = agreement_signals(
            recent, thresholds, runtime.manifest.fallback, settings.shadow_confidence
        )
        tuned_window = self._tuned_window()
        reference = store.between(*tuned_window) if tuned_window else None
        tuned_reference = self._tuned_reference()
        signals = {
            "rate": sampler.rate,
            "rows": store.count(),
            "max_rows": store.max_rows,
            "sampled": sampler.sampled,
            "dropped": sampler.dropped,
            "queue_depth": sampler.queue_depth,
            "window": {
                "rows": recent.num_rows,
                "from": float(recent.times[0]) if recent.num_rows else None,
                "to": float(recent.times[-1]) if recent.num_rows else None,
            },
            "thresholds": list(thresholds),
            "confidence": settings.shadow_confidence,
            "drop_budget": settings.shadow_drop_budget,
            **drop_alert(live, thresholds, tuned_reference, settings.shadow_drop_budget),
            "live": live,
            "drift": {
                **drift_signal(reference, recent, tuned_reference),
                "tuned_window": None
                if tuned_window is None
                else {"from": tuned_window[0], "to": tuned_window[1]},
            },
            # The file name only: this answer is public, the server's directories are not.
            "store": {"file": store.path.name, "recovered": store.recovered},
        }
        self.metrics.set_shadow_signals(signals)
        self._signals_at = time.monotonic()
        return signals

    async def shadow_signals(self) -> dict[str, Any]:
        self.require_shadow()
        return await asyncio.to_thread(self.shadow_signals_sync)

    def shadow_rows_sync(self, limit: int) -> ShadowRows:
        return self.require_shadow().store.recent(limit)

    # ------------------------------------------------------------------ live retune

    async def retune(
        self,
        eps: float,
        confidence: float,
        held_out_fraction: float = 0.3,
        seed: int = 0,
        generations: int | None = None,
        trigger: str = "POST /v1/thresholds/retune",
    ) -> dict[str, Any]:
        """Tune on the live window for agreement ≥ 100 − eps at `confidence`, and swap (and
        persist) only if the guard holds on the held-out part. Raises ShadowUnavailableError,
        NoThresholdsError, RetuneBusyError, TuneUnavailableError, RetuneInputError,
        ShadowSampleTooSmallError, BundleError / PersistError from the swap.
        Whatever fails, the thresholds in force and thresholds.json stay as they were."""
        sampler = self.require_shadow()
        if self._retune_lock.locked():
            raise RetuneBusyError("a retune is already running; try again when it has finished")
        async with self._retune_lock:
            try:
                # Lazy: the server install carries no deap; only retuning needs it.
                from thresholds.agreement import SampleTooSmall, guarded_retune
                from thresholds.costs import macs_cost_model
                from thresholds.errors import TuningError
                from thresholds.search import GAConfig
            except ImportError as exc:
                raise TuneUnavailableError(
                    f"retuning needs the tune extra (pip install 'earlyexit[tune]'): {exc}"
                ) from exc
            runtime, _ = self.require_thresholds()
            manifest = runtime.manifest
            rows = await asyncio.to_thread(sampler.store.recent, self.settings.shadow_window)
            before_thresholds = tuple(float(t) for t in runtime.thresholds)
            try:
                ga = GAConfig(generations=generations or GAConfig.generations, seed=seed,
                              progress=False)  # fmt: skip
                outcome = await asyncio.to_thread(
                    guarded_retune, rows.exit_probs, manifest.fallback, macs_cost_model(manifest),
                    eps, confidence, held_out_fraction, seed, ga, rows.plain_probs,
                )  # fmt: skip
            except SampleTooSmall as exc:
                self.metrics.retunes.labels(outcome="too_small").inc()
                raise ShadowSampleTooSmallError(exc.rows, exc.needed) from exc
            except TuningError as exc:
                self.metrics.retunes.labels(outcome="failed").inc()
                raise RetuneInputError(str(exc)) from exc
            new_thresholds = outcome.thresholds
            answer: dict[str, Any] = {
                "swapped": False,
                "guard": outcome.to_dict(),
                "before": {"thresholds": list(before_thresholds), **agreement_signals(
                    rows, before_thresholds, manifest.fallback, confidence)},
                "after": {"thresholds": list(new_thresholds), **agreement_signals(
                    rows, new_thresholds, manifest.fallback, confidence)},
                "window": {"rows": rows.num_rows, "from": float(rows.times[0]),
                           "to": float(rows.times[-1])},
            }  # fmt: skip
            if not outcome.guard_holds:
                self.metrics.retunes.labels(outcome="guard_failed").inc()
                logger.warning(
                    "live retune: guard failed on the held-out rows, thresholds unchanged",
                    extra={"fields": {"guard": outcome.to_dict()}},
                )
                return answer
            record = {
                "method": "live-retune",
                # Drift keeps a reference after the window has left the store.
                "reference": confidence_reference(
                    rows.exit_probs, "live", thresholds=new_thresholds, fallback=manifest.fallback,
                    plain_probs=rows.plain_probs,
                ),
                "source": trigger,
                "max_drop": eps,
                "confidence": confidence,
                "data": {"source": "live", "window": answer["window"],
                         "tune_rows": outcome.tune_rows, "held_out_rows": outcome.held_out_rows},
                "metrics": outcome.to_dict(),
                "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            }  # fmt: skip
            try:
                _, _, tuned, path = await self.update_thresholds(
                    new_thresholds, record, source="retune"
                )
            except Exception:
                self.metrics.retunes.labels(outcome="failed").inc()
                raise
            self.metrics.retunes.labels(outcome="swapped").inc()
            answer.update(swapped=True, tuned=tuned, path=str(path))
            # The gauges describe the thresholds in force: refresh now, not at the next sample.
            await asyncio.to_thread(self.shadow_signals_sync)
            return answer

    async def _retune_periodically(self, interval_s: float) -> None:
        """EARLYEXIT_RETUNE_INTERVAL: a guarded retune with the budget and confidence settings
        every `interval_s`; what fails is logged and the thresholds in force stay."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                answer = await self.retune(
                    eps=self.settings.shadow_drop_budget,
                    confidence=self.settings.shadow_confidence,
                    trigger="EARLYEXIT_RETUNE_INTERVAL",
                )
            except asyncio.CancelledError:
                raise
            except (ShadowSampleTooSmallError, RetuneBusyError) as exc:
                logger.info("periodic retune skipped: %s", exc)
                continue
            except Exception:  # noqa: BLE001 - the next interval tries again
                logger.exception("periodic retune failed; thresholds unchanged")
                continue
            logger.info(
                "periodic retune",
                extra={"fields": {"swapped": answer["swapped"],
                                  "thresholds": answer["after"]["thresholds"]}},
            )  # fmt: skip
