"""Connection guard: uvicorn's HTTP protocol with the limits uvicorn itself does not have.

uvicorn bounds nothing before a request's headers are complete: a socket that never finishes
its headers stays open forever, httptools accumulates an endless header line (quadratically),
and every such socket holds a file descriptor until the process can accept no more. Its
`--limit-concurrency` does not help: it answers 503 to every new request once that many
connections are open, idle ones included, so idle sockets starve everyone. The protocol below
(`guarded_protocol`, used by `earlyexit-serve`) adds:

- a connection limit that admits newcomers: at `max_connections` the connection idle longest
  (no request in progress: never sent one, a partial header, or keep-alive) is closed to make
  room; only when every connection is busy with a request is the new one closed instead;
- a header deadline: the request line and headers must arrive within `header_timeout_s` of the
  connection (or of a keep-alive request's first byte), else 408 and close;
- a header size limit: more than `max_header_bytes` before the headers end → 431 and close;
- a body read timeout: a pause longer than `body_timeout_s` inside a request body closes the
  connection (the route sees a client disconnect);
- JSON bodies for the errors the HTTP parser answers itself (400 was text/plain).

Keep-alive idleness stays uvicorn's `timeout_keep_alive`. Each close is counted in
`earlyexit_connections_closed_total{reason}` and logged at most once per LOG_EVERY_S per reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar
from weakref import WeakKeyDictionary

from serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)
LOG_EVERY_S = 10.0
_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line after the headers (CRLF or bare LF)


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int


class _Registry:
    """One server's idle connections, the longest idle first, and its close log."""

    def __init__(self) -> None:
        self.idle: OrderedDict[Any, None] = OrderedDict()
        self.evicting = 0  # closed to make room, not yet gone from the server's set
        self._counts: dict[str, int] = {}
        self._last_log: dict[str, float] = {}

    def note_close(self, reason: str, metrics: ServingMetrics | None) -> None:
        if metrics is not None:
            metrics.connections_closed.labels(reason=reason).inc()
        self._counts[reason] = self._counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last_log.get(reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            logger.warning(
                "closed connections to protect the server",
                extra={"fields": {"reason": reason, "closed": self._counts[reason]}},
            )
            self._counts[reason] = 0
            self._last_log[reason] = now


_REGISTRIES: WeakKeyDictionary[Any, _Registry] = WeakKeyDictionary()


def _registry(server_state: Any) -> _Registry:
    registry = _REGISTRIES.get(server_state)
    if registry is None:
        registry = _REGISTRIES[server_state] = _Registry()
    return registry


class _Guard:
    """Mixed in before uvicorn's HttpToolsProtocol or H11Protocol (see `guarded_protocol`).
    Relies on their public-by-convention attributes: loop, transport, flow, cycle (with
    `more_body`, `response_complete`), connections and server_state."""

    limits: ClassVar[ConnectionLimits]
    metrics: ClassVar[ServingMetrics | None] = None

    # uvicorn's protocols set these; declared for readers and type checkers.
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    flow: Any
    cycle: Any
    connections: set[Any]
    server_state: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._head_bytes = 0
        self._head_tail = b""
        self._evicted = False
        self._last_read = self.loop.time()
        self._body_timer: asyncio.TimerHandle | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._guard = _registry(self.server_state)
        self._guard.idle[self] = None
        if len(self.connections) - self._guard.evicting > self.limits.max_connections:
            self._make_room()
        if not transport.is_closing():
            self._arm_head_timer()
        self._count_open()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self._guard.idle.pop(self, None)
        if self._evicted:
            self._guard.evicting -= 1
            self._evicted = False
        super().connection_lost(exc)  # type: ignore[misc]
        self._count_open()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        reading_head = cycle is None or cycle.response_complete
        self._last_read = self.loop.time()
        if reading_head:
            if self._head_timer is None:
                self._arm_head_timer()  # first byte of a keep-alive connection's next request
            if self._measure_head(data) > self.limits.max_header_bytes:
                # Refused before the parser sees it: httptools would accumulate it all.
                self._close_with(431, self._head_detail(), "header_too_large")
                return
        super().data_received(data)  # type: ignore[misc]
        if self.transport.is_closing():
            return
        if self.cycle is not cycle:
            self._request_started()
        if self._body_timer is not None and not self.cycle.more_body:
            self._body_timer.cancel()
            self._body_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # no pipelined request running
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            self._guard.idle[self] = None
            self._guard.idle.move_to_end(self)

    def send_400_response(self, msg: str) -> None:  # noqa: ARG002 - uvicorn's signature
        # The parser's message is not echoed: a generic JSON error, like every other refusal.
        self._send_json(400, "invalid HTTP request")

    # ---------------------------------------------------------------- internals

    def _measure_head(self, data: bytes) -> int:
        """Bytes of the request line and headers so far, counting `data` up to the blank line
        that ends them (which may start in the previous piece)."""
        seen = self._head_tail + data
        end = _HEAD_END.search(seen)
        if end is None:
            self._head_bytes += len(data)
            self._head_tail = seen[-3:]
            return self._head_bytes
        return self._head_bytes + end.end() - len(self._head_tail)

    def _head_detail(self) -> str:
        return f"request line and headers exceed {self.limits.max_header_bytes} bytes"

    def _count_open(self) -> None:
        if self.metrics is not None:
            self.metrics.open_connections.set(len(self.connections))

    def _make_room(self) -> None:
        """Close the connection idle longest; this new one if every other is busy."""
        victim = next((c for c in self._guard.idle if c is not self), self)
        self._guard.idle.pop(victim, None)
        self._guard.note_close("limit", self.metrics)
        if victim is not self:
            victim._evicted = True
            self._guard.evicting += 1
        victim._cancel_timers()
        victim.transport.close()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _request_started(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_bytes = 0
        self._head_tail = b""
        self._guard.idle.pop(self, None)
        if self.cycle.more_body and self._body_timer is None:
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or (cycle is not None and not cycle.response_complete):
            return
        if self._head_bytes:
            self._close_with(408, "request headers not received in time", "header_timeout")
        else:
            self._guard.note_close("header_timeout", self.metrics)
            self.transport.close()

    def _body_timeout(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or cycle.response_complete:
            return
        if not cycle.more_body:
            return
        waited = self.loop.time() - self._last_read
        if self.flow.read_paused or waited < self.limits.body_timeout_s:
            # Reading is paused by the server itself (the app has not consumed the body yet),
            # or bytes came in meanwhile: not the client's stall.
            left = self.limits.body_timeout_s - (0.0 if self.flow.read_paused else waited)
            self._body_timer = self.loop.call_later(left, self._body_timeout)
            return
        self._guard.note_close("body_timeout", self.metrics)
        self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _close_with(self, status: int, detail: str, reason: str) -> None:
        self._guard.note_close(reason, self.metrics)
        self._send_json(status, detail)

    def _send_json(self, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode("utf-8")
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        ).encode("latin-1")
        self._cancel_timers()
        if not self.transport.is_closing():
            self.transport.write(head + body)
            self.transport.close()


def guarded_protocol(
    limits: ConnectionLimits, metrics: ServingMetrics | None = None, h11: bool = False
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools when installed, else or with `h11` the pure
    Python h11 parser) with the guard; pass it as `uvicorn.Config(http=...)`."""
    try:
        if h11:
            raise ImportError("h11 asked for")
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base: type[asyncio.Protocol] = HttpToolsProtocol
    except ImportError:  # httptools is optional
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol
    namespace = {"limits": limits, "metrics": metrics}
    return type("GuardedHTTPProtocol", (_Guard, base), namespace)


def bind_listener(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6), bound before anything else starts,
    so a port in use is reported before the bundle is loaded. OSError when it cannot bind."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
