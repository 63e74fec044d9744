"""The lean HTTP/1.1 client: round trips against the real server, and framing, keep-alive and
reconnect behaviour against small asyncio servers started in the test."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import httpx
import numpy as np
import pytest

from benchmarks.httpclient import (
    HttpClient,
    HttpConnection,
    InvalidURL,
    Origin,
    RequestTimeout,
    ServerDisconnected,
    parse_base_url,
)
from benchmarks.loadtest import run_http_bench
from tests.serving_helpers import png_bytes, server_process

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    with server_process(tiny_bundle, log_dir=tmp_path_factory.mktemp("log")) as proc:
        yield proc


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    """Request line, headers (lower-cased) and Content-Length body, as a server reads them."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return head[0], headers, body


def run_with_server(handler: Handler, scenario: Callable[[Origin], Awaitable[None]]) -> list[int]:
    """Serve `handler` (called with the connection number) on a free port, run `scenario`
    against it; returns the connection numbers the server saw."""
    seen: list[int] = []

    async def main() -> None:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(len(seen) + 1)
            try:
                await handler(reader, writer, seen[-1])
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        srv = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        async with srv:
            await asyncio.wait_for(scenario(Origin("127.0.0.1", port)), 10)

    asyncio.run(main())
    return seen


def test_round_trips_against_the_real_server(server, tiny_images) -> None:
    payload = png_bytes(tiny_images.images[0])

    async def scenario() -> None:
        async with HttpClient(server.url, timeout_s=60) as client:
            model = await client.request("GET", "/v1/model")
            assert model.status == 200 and model.headers["content-type"] == "application/json"
            assert model.json()["num_exits"] == 3
            async with client.connection() as conn:
                answers = [
                    await conn.request("POST", "/classify", payload, {"Content-Type": "image/png"})
                    for _ in range(3)
                ]
                assert conn.connects == 1  # kept alive across the three requests
            bodies = [a.json() for a in answers]
            assert all(a.status == 200 for a in answers)
            assert bodies[0]["class_index"] == bodies[1]["class_index"] == bodies[2]["class_index"]
            assert 0 <= bodies[0]["class_index"] < 10 and bodies[0]["exit"] in (0, 1, 2, 3)
            # An error status is a response like any other, body and all.
            bad = await client.request("POST", "/classify", b"not an image", {"Content-Type": "image/png"})  # fmt: skip
            assert 400 <= bad.status < 500 and bad.json()
            missing = await client.request("GET", "/no-such-route")
            assert missing.status == 404

    asyncio.run(scenario())


def test_answers_match_httpx(server, tiny_images) -> None:
    """Request bodies arrive intact: each image gets the answer httpx gets for it."""
    payloads = [png_bytes(img) for img in tiny_images.images[:4]]
    headers = {"Content-Type": "image/png"}

    async def scenario() -> list[dict]:
        async with HttpClient(server.url, timeout_s=60) as client:
            conn = client.connection()
            return [(await conn.request("POST", "/classify", p, headers)).json() for p in payloads]

    ours = asyncio.run(scenario())
    theirs = [
        httpx.post(f"{server.url}/classify", content=p, headers=headers, timeout=60).json()
        for p in payloads
    ]
    keys = ("class_index", "exit", "confidence", "label")
    assert [{k: a[k] for k in keys} for a in ours] == [{k: a[k] for k in keys} for a in theirs]


def test_chunked_body_and_request_framing() -> None:
    requests: list[tuple[str, dict[str, str], bytes]] = []

    async def handler(reader, writer, _conn) -> None:
        while True:
            requests.append(await read_request(reader))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                b'5;ext=1\r\n{"ok"\r\n'
                b"A\r\n: [1, 2, 3\r\n"
                b"2\r\n]}\r\n"
                b"0\r\nX-Trailer: yes\r\n\r\n"
            )
            await writer.drain()

    async def scenario(origin: Origin) -> None:
        async with HttpConnection(origin, timeout_s=5) as conn:
            first = await conn.request("POST", "/echo", b"abc", {"X-Token": "t"})
            second = await conn.request("GET", "/again")
            assert first.json() == {"ok": [1, 2, 3]} == second.json()
            assert first.headers["transfer-encoding"] == "chunked"
            assert conn.connects == 1

    assert run_with_server(handler, scenario) == [1]
    (line1, headers1, body1), (line2, headers2, body2) = requests
    assert line1 == "POST /echo HTTP/1.1" and body1 == b"abc"
    assert headers1["content-length"] == "3" and headers1["x-token"] == "t"
    assert headers1["host"].startswith("127.0.0.1:")
    assert line2 == "GET /again HTTP/1.1" and "content-length" not in headers2 and body2 == b""


def test_connection_close_header_reconnects_next_request() -> None:
    async def handler(reader, writer, conn_no) -> None:
        await read_request(reader)
        body = json.dumps({"conn": conn_no}).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()

    async def scenario(origin: Origin) -> None:
        async with HttpConnection(origin, timeout_s=5) as conn:
            seen = [(await conn.request("POST", "/x", b"1")).json()["conn"] for _ in range(3)]
            assert seen == [1, 2, 3] and conn.connects == 3

    assert run_with_server(handler, scenario) == [1, 2, 3]


def test_reconnects_after_server_closes_idle_connection() -> None:
    async def handler(reader, writer, conn_no) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + str(conn_no).encode())
        await writer.drain()
        # An idle timeout: keep-alive was promised, but the server closes after one request.

    async def scenario(origin: Origin) -> None:
        async with HttpConnection(origin, timeout_s=5) as conn:
            assert (await conn.request("POST", "/x", b"a")).body == b"1"
            await asyncio.sleep(0.05)  # the server's FIN arrives while the connection is idle
            assert (await conn.request("POST", "/x", b"b")).body == b"2"

    assert run_with_server(handler, scenario) == [1, 2]


def test_stale_connection_race_retries_only_what_is_safe() -> None:
    """The server reads the second request on a connection and closes without answering: the
    race where an idle timeout fires as a request arrives. Idempotent requests (or ones the
    caller marks retry_safe) are resent once on a new connection; a plain POST is not."""

    async def handler(reader, writer, _conn) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # then close without a single response byte

    async def scenario(origin: Origin) -> None:
        async with HttpConnection(origin, timeout_s=5) as conn:
            await conn.request("GET", "/warm")
            assert (await conn.request("GET", "/again")).body == b"ok"
            assert conn.connects == 2
            # Each retry's request was the new connection's first: the next one hits the race.
            assert (await conn.request("POST", "/classify", b"x", retry_safe=True)).body == b"ok"
            assert conn.connects == 3
            with pytest.raises(ServerDisconnected, match="without a response"):
                await conn.request("POST", "/orders", b"x")
            assert conn.connects == 3 and not conn.is_open

    assert run_with_server(handler, scenario) == [1, 2, 3]


def test_fresh_connection_failure_is_not_retried() -> None:
    async def handler(reader, _writer, _conn) -> None:
        await read_request(reader)  # close without answering, every time

    async def scenario(origin: Origin) -> None:
        async with HttpConnection(origin, timeout_s=5) as conn:
            with pytest.raises(ServerDisconnected):
                await conn.request("GET", "/")

    assert run_with_server(handler, scenario) == [1]


def test_timeout_raises_and_drops_the_connection() -> None:
    async def handler(reader, _writer, _conn) -> None:
        await read_request(reader)
        await reader.read()  # never answers; returns once the client gives up and closes

    async def scenario(origin: Origin) -> None:
        async with HttpConnection(origin, timeout_s=5) as conn:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(RequestTimeout, match="within 0.2 s"):
                await conn.request("GET", "/slow", timeout_s=0.2)
            assert loop.time() - t0 < 2.0 and not conn.is_open
            assert isinstance(RequestTimeout("x"), TimeoutError)

    run_with_server(handler, scenario)


def test_base_url_parsing() -> None:
    with pytest.raises(InvalidURL, match="https is not supported"):
        parse_base_url("https://127.0.0.1:8000")
    with pytest.raises(InvalidURL, match="https is not supported"):
        HttpClient("https://example.com")
    for bad in ("ftp://host", "127.0.0.1:8000", "http://", "http://h:99999", "http://h/?q=1"):
        with pytest.raises(InvalidURL):
            parse_base_url(bad)
    assert parse_base_url("http://127.0.0.1:8099/") == Origin("127.0.0.1", 8099, "")
    origin = parse_base_url("http://example.com/api/")
    assert origin == Origin("example.com", 80, "/api") and origin.host_header == "example.com"
    assert Origin("::1", 8000).host_header == "[::1]:8000"


def test_bad_header_and_path_rejected_before_sending() -> None:
    conn = HttpConnection(Origin("127.0.0.1", 9))

    async def scenario() -> None:
        with pytest.raises(ValueError, match="invalid header"):
            await conn.request("GET", "/", headers={"X-A": "b\r\nInjected: yes"})
        with pytest.raises(ValueError, match="set by the client"):
            await conn.request("POST", "/", b"x", {"Content-Length": "5"})
        with pytest.raises(ValueError, match="invalid request path"):
            await conn.request("GET", "no-slash")

    asyncio.run(scenario())
    assert conn.connects == 0


def test_load_bench_uses_the_lean_client(server, tiny_images) -> None:
    report = run_http_bench(
        server.url, tiny_images.images[:4], tiny_images.labels[:4], concurrency=2,
        duration_s=0.5, timeout_s=60,
    )  # fmt: skip
    early = report["early_exit"]
    assert report["client"] == "asyncio-http11"
    assert report["event_loop"] == "uvloop"  # installed with the serve extra
    assert early["answered"] >= 1 and early["errors"] == 0 and early["mismatches"] == 0


def test_bench_cli_rejects_https(tmp_path, capsys) -> None:
    from benchmarks.cli import main as bench_main

    argv = ["--http", "https://127.0.0.1:8000", "--dataset", "cifar10", "--data-dir", str(tmp_path)]
    assert bench_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "https is not supported" in err[0]
    with pytest.raises(InvalidURL):
        run_http_bench("https://127.0.0.1:8000", np.zeros((1, 32, 32, 3), np.uint8), [0])
