"""Pure ASGI middleware: request body limit, and the access log + request metrics.

Pure ASGI (not BaseHTTPMiddleware) so bodies stream through untouched and the limit is enforced
as bytes arrive, not after buffering.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.metrics import ServingMetrics

access_logger = logging.getLogger("serving.access")
# Probes and scrapes arrive every few seconds: logged at DEBUG so they do not drown requests.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyTooLargeError(Exception):
    """The request body exceeded the configured limit (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes")
        self.limit = limit


async def send_json(send: Send, status: int, payload: dict[str, Any], close: bool = False) -> None:
    body = json.dumps(payload).encode("utf-8")
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Refuse a declared Content-Length over the limit at once; count streamed bytes too."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = None
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                declared = value
                break
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await send_json(send, 400, {"detail": "invalid Content-Length header"}, close=True)
                return
            if length > limit:
                await send_json(send, 413, {"detail": BodyTooLargeError(limit).args[0]}, close=True)
                return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError as exc:
            if started:
                raise
            await send_json(send, 413, {"detail": exc.args[0]}, close=True)


class AccessLogMiddleware:
    """One JSON log line per request; request metrics for the classification endpoints."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServingMetrics,
        counted_paths: Collection[str],
        enabled: bool = True,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.counted_paths = frozenset(counted_paths)
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        state = scope.setdefault("state", {})  # routes record the exit taken here

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            seconds = time.perf_counter() - started
            path = scope.get("path", "")
            if path in self.counted_paths and scope.get("method") == "POST":
                self.metrics.observe_request(status, seconds)
            if self.enabled:
                client = scope.get("client")
                access_logger.log(
                    logging.DEBUG if path in QUIET_PATHS and status < 400 else logging.INFO,
                    "request",
                    extra={
                        "fields": {
                            "method": scope.get("method"),
                            "path": path,
                            "status": status,
                            "duration_ms": round(seconds * 1000.0, 3),
                            "exit": state.get("exit"),
                            "client": client[0] if client else None,
                        }
                    },
                )
