"""A lean asyncio HTTP/1.1 keep-alive client for the load benchmark (stdlib only).

httpx spends about a millisecond of CPU per request, more than the model's inference, and the
benchmark shares the CPU with the server it measures. This client does the least HTTP/1.1 needs:
one persistent connection per `HttpConnection`, the request written in one call, the response
framed by Content-Length, chunked transfer coding or connection close. No TLS, no redirects, no
cookies, no pipelining: one request at a time per connection, like wrk and hey.

    async with HttpClient("http://127.0.0.1:8000", timeout_s=30) as client:
        model = (await client.request("GET", "/v1/model")).json()   # pooled connection
        async with client.connection() as conn:                     # one owned connection
            response = await conn.request("POST", "/classify", png, {"Content-Type": "image/png"})
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

# Methods a server must treat as idempotent (RFC 9110 §9.2.2): sending one twice is harmless.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
# Methods whose requests carry no content by convention, so no Content-Length: 0 is sent.
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})
# Framing is the client's job: a caller's header must not contradict it.
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


class HttpClientError(Exception):
    """Base class of this client's errors."""


class InvalidURL(HttpClientError, ValueError):
    """The base URL is not an http:// URL this client can use."""


class ConnectFailed(HttpClientError):
    """The TCP connection could not be opened."""


class ServerDisconnected(HttpClientError):
    """The server closed the connection before the response was complete."""


class ProtocolError(HttpClientError):
    """The server's response is not valid HTTP/1.x."""


class RequestTimeout(HttpClientError, TimeoutError):
    """No complete response within the request's timeout (the connection is dropped)."""


@dataclass(frozen=True)
class Response:
    """A complete response: status code, headers (names lower-cased) and the decoded body."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON (raises json.JSONDecodeError / ValueError if it is not)."""
        return json.loads(self.body)


@dataclass(frozen=True)
class Origin:
    """Where requests go: host, port and a path prefix ("" or "/prefix", no trailing slash)."""

    host: str
    port: int
    base_path: str = ""

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 80 else f"{host}:{self.port}"


def parse_base_url(url: str) -> Origin:
    """`http://host[:port][/prefix]` → Origin; raises InvalidURL for anything else (https too)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise InvalidURL(f"invalid URL {url!r}: {exc}") from exc
    if parts.scheme == "https":
        raise InvalidURL(f"{url!r}: https is not supported by this client (plain http:// only)")
    if parts.scheme != "http":
        raise InvalidURL(f"{url!r}: expected an http://host[:port] URL")
    if not parts.hostname:
        raise InvalidURL(f"{url!r}: no host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise InvalidURL(f"{url!r}: a base URL takes no query, fragment or credentials")
    return Origin(parts.hostname, 80 if port is None else port, parts.path.rstrip("/"))


_T = TypeVar("_T")


async def _within(coro: Awaitable[_T], timeout_s: float) -> _T:
    if hasattr(asyncio, "timeout"):  # 3.11+: no extra task per call, unlike wait_for
        async with asyncio.timeout(timeout_s):
            return await coro
    return await asyncio.wait_for(coro, timeout_s)


class _Unanswered(Exception):
    """The server sent not one byte of a response; `send_failed` when the request never left."""

    def __init__(self, message: str, send_failed: bool) -> None:
        super().__init__(message)
        self.send_failed = send_failed


_C = TypeVar("_C", bound="_Closing")


class _Closing:
    """`async with` support: leaving the block awaits `aclose()`."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self: _C) -> _C:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class HttpConnection(_Closing):
    """One persistent HTTP/1.1 connection; one request at a time (no pipelining).

    Opens lazily, reopens after the server asked to close (`Connection: close`) or after an
    error, and retries once on a fresh connection when a kept-alive one turns out to be stale.
    """

    def __init__(self, origin: Origin, *, timeout_s: float = 30.0) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.origin = origin
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._busy = False
        self.connects = 0  # TCP connections opened so far (reconnects included)

    @property
    def is_open(self) -> bool:
        return self._writer is not None

    async def connect(self) -> None:
        """Open the connection now (otherwise the first request does), within timeout_s."""
        if not self._usable():
            try:
                await _within(self._open(), self.timeout_s)
            except asyncio.TimeoutError:
                raise RequestTimeout(
                    f"no connection to {self.origin.host}:{self.origin.port} "
                    f"within {self.timeout_s:g} s"
                ) from None

    async def aclose(self) -> None:
        """Close the connection (a no-op when it is not open)."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass  # already reset by the peer: closed either way

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        *,
        timeout_s: float | None = None,
        retry_safe: bool | None = None,
    ) -> Response:
        """Send one request and read the whole response.

        `path` is relative to the origin's base path and starts with "/". `timeout_s` (default:
        the connection's) bounds connecting, sending and reading together. `retry_safe`
        overrides whether the method may be resent after a stale keep-alive connection (default:
        the method is idempotent); pass True for a POST without side effects. Raises
        ConnectFailed, ServerDisconnected, ProtocolError or RequestTimeout; ValueError for a
        malformed method, path or header.
        """
        method = method.upper()
        message = self._encode(method, path, body, headers)
        resend_ok = method in IDEMPOTENT_METHODS if retry_safe is None else retry_safe
        limit = self.timeout_s if timeout_s is None else timeout_s
        if self._busy:
            raise RuntimeError("HttpConnection is not safe for concurrent requests: use one each")
        self._busy = True
        try:
            return await _within(self._exchange(method, message, resend_ok), limit)
        except asyncio.TimeoutError:
            self._drop()  # the response may still arrive: the connection is out of step
            raise RequestTimeout(
                f"{method} {path}: no complete response within {limit:g} s"
            ) from None
        except BaseException:
            self._drop()  # cancelled or failed mid-exchange: never reuse a half-read stream
            raise
        finally:
            self._busy = False

    # ------------------------------------------------------------------------- internals

    def _encode(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str] | None
    ) -> bytes:
        if not method.isalpha():
            raise ValueError(f"invalid HTTP method {method!r}")
        if not path.startswith("/") or any(c in path for c in " \r\n"):
            raise ValueError(f"invalid request path {path!r}: must start with '/', no spaces")
        lines = [
            f"{method} {self.origin.base_path}{path} HTTP/1.1",
            f"Host: {self.origin.host_header}",
        ]
        if body or method not in _BODYLESS_METHODS:
            lines.append(f"Content-Length: {len(body)}")
        for name, value in (headers or {}).items():
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by the client itself")
            if any(c in name for c in ":\r\n ") or "\r" in value or "\n" in value:
                raise ValueError(f"invalid header {name!r}: {value!r}")
            lines.append(f"{name}: {value}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + body if body else head

    def _usable(self) -> bool:
        """Open and not known to be closed by the server (EOF already seen while idle)."""
        if self._writer is None or self._reader is None:
            return False
        if self._reader.at_eof() or self._writer.is_closing():
            self._drop()
            return False
        return True

    async def _open(self) -> None:
        host, port = self.origin.host, self.origin.port
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from exc
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Small requests must leave at once: Nagle would hold them behind the previous ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader, self._writer = reader, writer
        self.connects += 1

    def _drop(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.transport.abort()

    async def _exchange(self, method: str, message: bytes, resend_ok: bool) -> Response:
        reused = self._usable()
        if not reused:
            await self._open()
        try:
            return await self._attempt(method, message)
        except _Unanswered as exc:
            # Stale keep-alive race: the server may close an idle connection just as we send
            # on it. A request may be sent again only if the server cannot have acted on it:
            # - the send itself failed: the connection was already gone, nothing was delivered;
            # - or no response byte came back AND the method is idempotent: the server may or
            #   may not have run it, and running it twice is harmless.
            # A fresh connection is never retried: its failure is the server's real answer.
            if not reused or not (exc.send_failed or resend_ok):
                raise ServerDisconnected(f"{method}: {exc}") from exc
            logger.debug("kept-alive connection was stale (%s): reconnecting once", exc)
        await self._open()
        try:
            return await self._attempt(method, message)
        except _Unanswered as exc:
            raise ServerDisconnected(f"{method}: {exc} (after reconnecting)") from exc

    async def _attempt(self, method: str, message: bytes) -> Response:
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None  # _exchange opened it
        try:
            writer.write(message)
            await writer.drain()
        except OSError as exc:  # ConnectionResetError, BrokenPipeError, ...
            self._drop()
            raise _Unanswered(f"sending failed: {exc}", send_failed=True) from exc
        try:
            # One byte first, so that a failure is known to have come before any response byte.
            first = await reader.readexactly(1)
        except (asyncio.IncompleteReadError, OSError) as exc:
            self._drop()
            raise _Unanswered("server closed the connection without a response", False) from exc
        try:
            response, keep_alive = await self._read_response(method, first, reader)
        except asyncio.IncompleteReadError as exc:
            self._drop()
            raise ServerDisconnected(f"{method}: connection closed mid-response") from exc
        except asyncio.LimitOverrunError as exc:
            self._drop()
            raise ProtocolError(f"{method}: response line or header block too long") from exc
        except OSError as exc:
            self._drop()
            raise ServerDisconnected(f"{method}: connection lost mid-response: {exc}") from exc
        if not keep_alive:
            await self.aclose()  # the next request opens a new connection
        return response

    async def _read_response(
        self, method: str, first: bytes, reader: asyncio.StreamReader
    ) -> tuple[Response, bool]:
        while True:
            head = first + await reader.readuntil(b"\r\n\r\n")
            version, status, headers = _parse_head(head)
            if not 100 <= status < 200 or status == 101:
                break
            first = await reader.readexactly(1)  # an interim response (100 Continue): skip it
        connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = "close" not in connection and (
            version != "HTTP/1.0" or "keep-alive" in connection
        )
        if method == "HEAD" or status in (101, 204, 304):
            return Response(status, headers, b""), keep_alive
        encoding = headers.get("transfer-encoding", "").lower()
        if encoding:
            if encoding.rsplit(",", 1)[-1].strip() != "chunked":
                # Not chunked last: only the connection's end marks the end of the body.
                return Response(status, headers, await reader.read()), False
            return Response(status, headers, await _read_chunked(reader)), keep_alive
        if "content-length" in headers:
            length = _content_length(headers["content-length"])
            body = await reader.readexactly(length) if length else b""
            return Response(status, headers, body), keep_alive
        return Response(status, headers, await reader.read()), False  # close-delimited


def _parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"invalid status line {lines[0][:100]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(f"invalid header line {line[:100]!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return parts[0], int(parts[1]), headers


def _content_length(raw: str) -> int:
    values = {v.strip() for v in raw.split(",")}  # repeated identical headers are allowed
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise ProtocolError(f"invalid Content-Length {raw!r}")
    return int(values.pop())


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A `Transfer-Encoding: chunked` body: size lines (hex, extensions ignored), data, trailers."""
    parts = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size_text = size_line[:-2].split(b";", 1)[0].strip()
        if not size_text or not set(size_text) <= _HEX_DIGITS:
            raise ProtocolError(f"invalid chunk size line {size_line[:100]!r}")
        size = int(size_text, 16)
        if size == 0:
            break
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise ProtocolError("chunk data not followed by CRLF")
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass  # trailer fields: not needed here
    return b"".join(parts)


class HttpClient(_Closing):
    """Connections to one base URL: `connection()` hands out owned ones (one per worker);
    `request()` borrows from a small idle pool for one-off calls. `aclose()` closes them all."""

    def __init__(self, base_url: str, *, timeout_s: float = 30.0) -> None:
        self.origin = parse_base_url(base_url)
        self.timeout_s = timeout_s
        self._idle: list[HttpConnection] = []
        self._all: list[HttpConnection] = []

    def connection(self) -> HttpConnection:
        """A new connection (opened on first use) that the caller uses alone."""
        conn = HttpConnection(self.origin, timeout_s=self.timeout_s)
        self._all.append(conn)
        return conn

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        **options: Any,
    ) -> Response:
        """`HttpConnection.request` on an idle pooled connection (a new one if none is idle)."""
        conn = self._idle.pop() if self._idle else self.connection()
        try:
            return await conn.request(method, path, body, headers, **options)
        finally:
            self._idle.append(conn)  # closed ones reopen on their next request

    async def aclose(self) -> None:
        connections, self._all, self._idle = self._all, [], []
        await asyncio.gather(*(conn.aclose() for conn in connections))
