"""Prometheus metrics of one app instance (own CollectorRegistry, so tests and several apps in a
process never share counters). Names and labels are the contract's; labels stay low-cardinality:
status code, exit number (or "fallback"; "full" for the plain model) and segment number (or
"full") only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Request and segment latencies are milliseconds on CPU and sub-millisecond on GPU.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
SEGMENT_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 0.999, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = CONTENT_TYPE_LATEST
FALLBACK: Final = "fallback"
# The plain single graph (`earlyexit-serve --full-model`): its answers' exit, and the `exit` and
# `segment` label of its rows and of its one graph run per batch.
FULL: Final = "full"
FULL_EXIT = -1
CONNECTION_CLOSE_REASONS = ("limit", "header_timeout", "body_timeout", "header_too_large")


def exit_label(exit_index: int) -> str:
    """Runtime exit number (1..K, 0 = fallback, FULL_EXIT = the plain model) → the `exit`
    label value."""
    if exit_index == FULL_EXIT:
        return FULL
    return FALLBACK if exit_index == 0 else str(exit_index)


class ServingMetrics:
    """Every metric of the contract plus model info and the live thresholds."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "earlyexit_requests",
            "Classification requests (POST /classify and /classify/batch; no other endpoint) by "
            "HTTP status code; 499 = the client went away before its request was read.",
            ["code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "earlyexit_request_duration_seconds",
            "Wall time of classification requests (those earlyexit_requests_total counts), "
            "body read to response.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.exits = Counter(
            "earlyexit_exit", "Answered images by the exit that answered them.", ["exit"],
            registry=r,
        )  # fmt: skip
        self.exit_confidence = Histogram(
            "earlyexit_exit_confidence",
            "Confidence (max probability) of answers, by exit.",
            ["exit"],
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.segment_duration = Histogram(
            "earlyexit_segment_duration_seconds",
            "Wall time of one segment run over one batch.",
            ["segment"],
            buckets=SEGMENT_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "earlyexit_batch_size", "Images per runtime batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("earlyexit_queue_depth", "Images waiting for a batch.", registry=r)
        self.model_info = Gauge(
            "earlyexit_model_info", "The served bundle (value 1).", ["name", "version"],
            registry=r,
        )  # fmt: skip
        self.threshold = Gauge(
            "earlyexit_threshold", "Current acceptance threshold per exit.", ["exit"], registry=r
        )
        self.ready = Gauge("earlyexit_ready", "1 once the bundle is loaded.", registry=r)
        self.threshold_updates = Counter(
            "earlyexit_threshold_updates",
            "Threshold swaps by source: api (PUT /v1/thresholds), api-reload "
            "(POST /v1/thresholds/reload), sighup (kill -HUP).",
            ["source"],
            registry=r,
        )
        self.open_connections = Gauge(
            "earlyexit_open_connections", "HTTP connections open now.", registry=r
        )
        self.connections_closed = Counter(
            "earlyexit_connections_closed",
            "Connections the server closed to protect itself, by reason: limit (the oldest idle "
            "one, to admit a new one at EARLYEXIT_MAX_CONNECTIONS), header_timeout, "
            "body_timeout, header_too_large.",
            ["reason"],
            registry=r,
        )
        for reason in CONNECTION_CLOSE_REASONS:
            self.connections_closed.labels(reason=reason)
        # Online retuning (serving.shadow); the gauges are refreshed from the live sample.
        self.shadow_rows = Counter(
            "earlyexit_shadow_rows", "Answered rows re-run through every exit and stored.",
            registry=r,
        )  # fmt: skip
        self.shadow_dropped = Counter(
            "earlyexit_shadow_dropped",
            "Sampled rows dropped instead of re-run, by reason: queue_full (the server was too "
            "busy for shadow work).",
            ["reason"],
            registry=r,
        )
        self.shadow_dropped.labels(reason="queue_full")
        self.shadow_queue_depth = Gauge(
            "earlyexit_shadow_queue_depth", "Sampled rows waiting to be re-run.", registry=r
        )
        self.shadow_store_rows = Gauge(
            "earlyexit_shadow_store_rows", "Rows in the persistent shadow sample.", registry=r
        )
        self.shadow_window_rows = Gauge(
            "earlyexit_shadow_window_rows", "Rows the live signals are computed on.", registry=r
        )
        self.shadow_agreement = Gauge(
            "earlyexit_shadow_agreement_percent",
            "Agreement with the final exit among the window's rows each exit accepts under the "
            "current thresholds (fallback included).",
            ["exit"],
            registry=r,
        )
        self.shadow_estimated_drop = Gauge(
            "earlyexit_shadow_estimated_drop_points",
            "Estimated accuracy drop of the current thresholds vs full depth (100 - agreement).",
            registry=r,
        )
        self.shadow_estimated_drop_lower = Gauge(
            "earlyexit_shadow_estimated_drop_lower_points",
            "One-sided lower confidence bound (EARLYEXIT_SHADOW_CONFIDENCE) of the drop: what "
            "the drop alert compares with its level.",
            registry=r,
        )
        self.shadow_estimated_drop_upper = Gauge(
            "earlyexit_shadow_estimated_drop_upper_points",
            "One-sided upper confidence bound (EARLYEXIT_SHADOW_CONFIDENCE) of the drop.",
            registry=r,
        )
        self.shadow_drop_budget = Gauge(
            "earlyexit_shadow_drop_budget_points",
            "EARLYEXIT_SHADOW_DROP_BUDGET: how far the drop may rise above its tuning-time "
            "level before the alert fires.",
            registry=r,
        )
        self.shadow_alert_level = Gauge(
            "earlyexit_shadow_alert_level_points",
            "Drop above which the alert fires: the budget plus the disagreement the thresholds "
            "had on their tuning rows (tuned.reference.agreement; 0 when not recorded).",
            registry=r,
        )
        self.shadow_drift = Gauge(
            "earlyexit_shadow_drift",
            "KS statistic of exit 1's confidence, recent window vs the window the thresholds "
            "were tuned on (NaN when they were not tuned on live rows).",
            registry=r,
        )
        self.retunes = Counter(
            "earlyexit_retunes",
            "Live retunes by outcome: swapped, guard_failed, too_small, failed.",
            ["outcome"],
            registry=r,
        )
        for outcome in ("swapped", "guard_failed", "too_small", "failed"):
            self.retunes.labels(outcome=outcome)

        # Labelled children looked up once: `.labels()` costs microseconds per call, several
        # calls per request, on the event loop that bounds throughput.
        self._exit_series: dict[str, tuple[Any, Any]] = {}
        self._segment_series: dict[int, Any] = {}
        # Segment k's label; the plain model's one graph is "full" (see prime).
        self._segment_names: tuple[str, ...] | None = None

    def _for_exit(self, label: str) -> tuple[Any, Any]:
        series = self._exit_series.get(label)
        if series is None:
            series = (self.exits.labels(exit=label), self.exit_confidence.labels(exit=label))
            self._exit_series[label] = series
        return series

    def _for_segment(self, k: int) -> Any:
        series = self._segment_series.get(k)
        if series is None:
            names = self._segment_names
            name = names[k - 1] if names is not None and k <= len(names) else str(k)
            series = self._segment_series[k] = self.segment_duration.labels(segment=name)
        return series

    def prime(self, num_exits: int, single_graph: bool = False) -> None:
        """Create every exit/segment series at 0 so dashboards see them before traffic. With
        `single_graph` (the plain model) the only exit and segment is `full`: no exit or
        fallback series are created that could never count anything."""
        if single_graph:
            self._segment_names = (FULL,)
            self.exits.labels(exit=FULL)
            self.exit_confidence.labels(exit=FULL)
            self.segment_duration.labels(segment=FULL)
            return
        for k in range(1, num_exits + 1):
            self.exits.labels(exit=str(k))
            self.exit_confidence.labels(exit=str(k))
            self.segment_duration.labels(segment=str(k))
        self.exits.labels(exit=FALLBACK)
        self.exit_confidence.labels(exit=FALLBACK)

    def set_model(self, name: str, version: str, thresholds: Sequence[float]) -> None:
        self.model_info.labels(name=name, version=version).set(1)
        self.set_thresholds(thresholds)
        self.ready.set(1)

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        for k, value in enumerate(thresholds, start=1):
            self.threshold.labels(exit=str(k)).set(float(value))

    def observe_request(self, code: int, seconds: float) -> None:
        self.requests.labels(code=str(code)).inc()
        self.request_duration.observe(seconds)

    def observe_batch(
        self,
        exits: np.ndarray,
        confidences: np.ndarray,
        rows_per_segment: Sequence[int],
        segment_seconds: Sequence[float],
        plain_seconds: float = 0.0,
    ) -> None:
        """One runtime batch: every answered row counts once under the exit that answered it;
        `plain_seconds` (fallback "plain") is the plain graph's run, under segment `full` as
        when the plain model is served alone."""
        self.batch_size.observe(int(exits.shape[0]))
        for exit_index, confidence in zip(exits.tolist(), confidences.tolist(), strict=True):
            count, confidence_histogram = self._for_exit(exit_label(int(exit_index)))
            count.inc()
            confidence_histogram.observe(float(confidence))
        for k, (rows, seconds) in enumerate(
            zip(rows_per_segment, segment_seconds, strict=False), start=1
        ):
            if rows > 0:
                self._for_segment(k).observe(float(seconds))
        if plain_seconds > 0:
            self.segment_duration.labels(segment=FULL).observe(float(plain_seconds))

    def set_shadow_signals(self, signals: dict[str, Any]) -> None:
        """Gauges from a `/v1/shadow` answer (see ServingState.shadow_signals)."""
        nan = float("nan")
        live = signals.get("live") or {}
        self.shadow_store_rows.set(signals.get("rows", 0))
        self.shadow_window_rows.set(live.get("rows", 0))
        for entry in live.get("per_exit", []):
            value = entry.get("agreement")
            self.shadow_agreement.labels(exit=entry["exit"]).set(nan if value is None else value)
        for gauge, key in (
            (self.shadow_estimated_drop, "estimated_drop"),
            (self.shadow_estimated_drop_lower, "estimated_drop_lower"),
            (self.shadow_estimated_drop_upper, "estimated_drop_upper"),
        ):
            value = live.get(key)
            gauge.set(nan if value is None else value)
        self.shadow_drop_budget.set(signals.get("drop_budget", nan))
        self.shadow_alert_level.set(signals.get("alert_level", nan))
        drift = (signals.get("drift") or {}).get("statistic")
        self.shadow_drift.set(nan if drift is None else drift)

    def render(self) -> bytes:
        return generate_latest(self.registry)
