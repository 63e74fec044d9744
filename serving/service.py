"""The serving state of one app: settings, metrics, the runtime once loaded, the batcher, and the
threshold lifecycle (swap via the API, re-read on SIGHUP). No HTTP here: routes translate the
exceptions raised below into status codes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serving.batching import DynamicBatcher
from serving.bundle import (
    BundleError,
    Manifest,
    Thresholds,
    check_tuned_record,
    read_thresholds,
    validate_threshold_values,
    write_thresholds,
)
from serving.decode_pool import DecodePool
from serving.metrics import ServingMetrics
from serving.settings import Settings
from serving.state_dir import serving_dir

logger = logging.getLogger(__name__)
# Earlier tuning records kept in `tuned.history`, newest first, each with the thresholds it
# described: enough to see and undo recent manual changes, small enough to stay in the file.
HISTORY_LIMIT = 10


class NotReadyError(RuntimeError):
    """The bundle is still loading, or failed to load (503)."""


class PersistError(RuntimeError):
    """thresholds.json could not be written; the old thresholds stay in force."""


class NoThresholdsError(RuntimeError):
    """The server serves the plain model (`--full-model`): there are no thresholds (409)."""


NO_THRESHOLDS = (
    "this server serves the plain model (earlyexit-serve --full-model): it has no exits and "
    "no thresholds to change; serve the bundle without --full-model to tune it"
)
MODE_EARLY_EXIT = "early_exit"
MODE_FULL_MODEL = "full_model"


class ServingState:
    """Everything a request handler needs, created by `create_app` and filled by the lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServingMetrics()
        self.runtime: Any | None = None
        self.batcher: DynamicBatcher | None = None
        self.load_error: str | None = None
        self.tuned: dict[str, Any] = {}
        self.started_at = time.time()
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
        self._stopping = False

    @property
    def serves_plain_model(self) -> bool:
        """True with `--full-model`: the bundle's plain single graph answers every image."""
        return bool(self.settings.full_model)

    @property
    def mode(self) -> str:
        return MODE_FULL_MODEL if self.serves_plain_model else MODE_EARLY_EXIT

    def served_graph(self) -> dict[str, Any] | None:
        """The plain graph served with `--full-model` (file, sha256, source, macs), else None."""
        describe = getattr(self.runtime, "describe", None)
        return describe() if self.serves_plain_model and callable(describe) else None

    @property
    def ready(self) -> bool:
        return self.runtime is not None and self.batcher is not None

    def require_ready(self) -> tuple[Any, DynamicBatcher]:
        if self.runtime is None or self.batcher is None:
            if self.load_error:
                raise NotReadyError(f"bundle failed to load: {self.load_error}")
            raise NotReadyError("model is loading")
        return self.runtime, self.batcher

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
        if self.runtime is not None:
            active = getattr(self.runtime, "providers", None)
            if active:
                return [str(p) for p in active]
        return list(self.settings.providers)

    # ------------------------------------------------------------------ lifecycle

    def _load_runtime(self) -> Any:
        # Imported here: onnxruntime is heavy and must not load when the app module is imported.
        from serving.runtime import EarlyExitRuntime

        if self.serves_plain_model:
            from serving.plain_runtime import PlainModelRuntime

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
        self.tuned = dict(getattr(runtime, "tuned", None) or {})
        self.metrics.set_model(manifest.name, manifest.version, runtime.thresholds)
        self.runtime, self.batcher = runtime, batcher
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
        runtime, batcher = self.require_ready()
        if self.serves_plain_model:
            raise NoThresholdsError(NO_THRESHOLDS)
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
        runtime, batcher = self.require_ready()
        if self.serves_plain_model:
            raise NoThresholdsError(NO_THRESHOLDS)
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
