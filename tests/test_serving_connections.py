"""The connection guard (`serving.connections`) in a real uvicorn server: header size and time
limits, the body read timeout, the connection limit, and JSON for parser-level errors."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.serving_helpers import metric_value, server_process

LIMITS = {
    "EARLYEXIT_MAX_CONNECTIONS": "16",
    "EARLYEXIT_HEADER_TIMEOUT_S": "1",
    "EARLYEXIT_BODY_TIMEOUT_S": "1",
    "EARLYEXIT_MAX_HEADER_BYTES": "4096",
}


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    with server_process(tiny_bundle, env=LIMITS, log_dir=tmp_path_factory.mktemp("conn")) as proc:
        yield proc


def address(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and the seconds that took."""
    started = time.monotonic()
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received, time.monotonic() - started


def status_and_json(response: bytes) -> tuple[int, str, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers.get("content-type", ""), json.loads(body)


def healthz_seconds(server) -> float:
    started = time.monotonic()
    assert httpx.get(server.url + "/healthz", timeout=30).status_code == 200
    return time.monotonic() - started


def test_parser_errors_are_json(server) -> None:
    """Regression: uvicorn answered protocol-level 400s as text/plain."""
    with socket.create_connection(address(server)) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        response, _ = read_until_closed(sock, 10)
    status, content_type, body = status_and_json(response)
    assert status == 400 and content_type == "application/json" and body["detail"]


def test_an_endless_header_is_cut_off_and_health_checks_stay_fast(server) -> None:
    """Regression: one socket sending an endless header line pushed /healthz to 3-5 s."""
    answer: list[bytes] = []

    def endless() -> None:
        with socket.create_connection(address(server)) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
            try:
                for _ in range(20_000):  # 20 MB at most; cut off after 4 KiB
                    sock.sendall(b"a" * 1024)
            except OSError:
                pass
            answer.append(read_until_closed(sock, 10)[0])

    thread = threading.Thread(target=endless)
    thread.start()
    slowest = max(healthz_seconds(server) for _ in range(10))
    thread.join(timeout=60)
    status, content_type, body = status_and_json(answer[0])
    assert status == 431 and content_type == "application/json"
    assert "4096 bytes" in body["detail"]
    assert slowest < 0.5


def test_heads_under_the_limit_pass_however_they_are_cut(server, tiny_images) -> None:
    """Only the head counts towards MAX_HEADER_BYTES: not a body arriving in the same read,
    not a blank line cut between two reads."""
    from tests.serving_helpers import png_bytes

    image = png_bytes(tiny_images.images[0])
    padding = b"X-Pad: " + b"p" * 3900 + b"\r\n"  # the head ends up just under 4096 bytes
    head = (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nConnection: close\r\n"
            + padding + b"Content-Length: %d\r\n\r\n" % len(image))  # fmt: skip
    assert len(head) < 4096
    for pieces in ([head + image], [head[:-1], head[-1:] + image], [head[:-3], head[-3:], image]):
        with socket.create_connection(address(server)) as sock:
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(0.05)
            status, _, body = status_and_json(read_until_closed(sock, 30)[0])
        assert status == 200 and body["model"]["name"] == "tiny-resnet18"


def test_a_silent_or_slow_header_is_closed_after_the_header_timeout(server) -> None:
    """Regression: a connection that never finished its headers stayed open for good."""
    with socket.create_connection(address(server)) as sock:
        received, seconds = read_until_closed(sock, 15)
    assert received == b"" and 0.5 < seconds < 10
    with socket.create_connection(address(server)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        received, seconds = read_until_closed(sock, 15)
    status, _, body = status_and_json(received)
    assert status == 408 and "not received in time" in body["detail"] and seconds < 10


def test_idle_connections_make_room_for_new_clients(server) -> None:
    """Regression: 20 000 sockets with partial headers exhausted file descriptors and new
    clients were refused. At the limit the connection idle longest is closed instead."""
    before = metric_value(httpx.get(server.url + "/metrics").text,
                          "earlyexit_connections_closed_total", {"reason": "limit"})  # fmt: skip
    idle = [socket.create_connection(address(server)) for _ in range(40)]
    try:
        for sock in idle:
            sock.sendall(b"GET / HTTP/1.1\r\n")  # a header begun, never finished
        assert healthz_seconds(server) < 5
        metrics = httpx.get(server.url + "/metrics").text
    finally:
        for sock in idle:
            sock.close()
    closed = metric_value(metrics, "earlyexit_connections_closed_total", {"reason": "limit"})
    assert closed - before >= 40 - 16
    assert metric_value(metrics, "earlyexit_open_connections") <= 16


def test_a_stalled_body_is_closed_and_counted_as_a_client_disconnect(server) -> None:
    """The body read timeout, and regression: a client gone mid-upload was a 500 with an ERROR
    traceback; it is counted under code 499 with one log line."""
    before = metric_value(httpx.get(server.url + "/metrics").text, "earlyexit_requests_total",
                          {"code": "499"})  # fmt: skip
    with socket.create_connection(address(server)) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"\x89PNG\r\n\x1a\n" + b"\0" * 100
        )
        received, seconds = read_until_closed(sock, 15)
    assert received == b"" and seconds < 10
    deadline = time.monotonic() + 30
    count = before
    while count == before and time.monotonic() < deadline:
        count = metric_value(httpx.get(server.url + "/metrics").text,
                             "earlyexit_requests_total", {"code": "499"})  # fmt: skip
        time.sleep(0.05)
    assert count == before + 1
    logs = server.logs()
    assert "client disconnected before its request was read" in logs
    assert "Traceback" not in logs and "unhandled error" not in logs
    assert 'code="500"' not in httpx.get(server.url + "/metrics").text


def test_the_guard_works_on_the_h11_parser_too() -> None:
    """Without httptools uvicorn parses with h11; the same limits and JSON errors apply."""
    import uvicorn
    from fastapi import FastAPI

    from serving.connections import ConnectionLimits, bind_listener, guarded_protocol

    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    limits = ConnectionLimits(max_connections=8, header_timeout_s=1.0, body_timeout_s=1.0,
                              max_header_bytes=4096)  # fmt: skip
    listener = bind_listener("127.0.0.1", 0)
    port = listener.getsockname()[1]
    config = uvicorn.Config(app, http=guarded_protocol(limits, h11=True), log_level="critical",
                            h11_max_incomplete_event_size=4096)  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
            status, content_type, _ = status_and_json(read_until_closed(sock, 10)[0])
        assert status == 431 and content_type == "application/json"
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            status, _, _ = status_and_json(read_until_closed(sock, 10)[0])
        assert status == 408
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
            assert response.json() == {"status": "ok"}
        finally:
            for sock in idle:
                sock.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
