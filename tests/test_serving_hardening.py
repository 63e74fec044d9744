"""No single client stalls, starves or crashes a real server, and no bad value silently changes
what it serves (the hardening issue), against `earlyexit-serve` subprocesses."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from core.bundle import THRESHOLDS_FILE, read_thresholds
from tests.conftest import copy_bundle
from tests.serving_helpers import (
    REPO,
    metric_value,
    png_bytes,
    server_env,
    server_process,
    start_server,
)

sys.path.insert(0, str(REPO / "scripts"))
import hardening_attack as attack  # noqa: E402

TOKEN = "hardening-token"
BUDGET_MB = 256


@pytest.fixture(scope="module")
def bundle(tiny_bundle, tmp_path_factory):
    return copy_bundle(tiny_bundle, tmp_path_factory.mktemp("hardening") / "bundle")


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    env = {
        # Spaces around the token, as an env file or `$(cat file)` may leave them.
        "EARLYEXIT_ADMIN_TOKEN": f"  {TOKEN} \n",
        # A long adaptive window: a request waiting for company it should not wait for shows.
        "EARLYEXIT_MAX_BATCH_WAIT_MS": "300",
        "EARLYEXIT_DECODE_MEMORY_MB": str(BUDGET_MB),
    }
    with server_process(bundle, env=env, log_dir=tmp_path_factory.mktemp("log")) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=300.0) as http:
        yield http


@pytest.fixture(scope="module")
def image(tiny_images) -> bytes:
    return png_bytes(tiny_images.images[0])


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def thresholds(client: httpx.Client) -> list[float]:
    return client.get("/v1/model").json()["thresholds"]


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


# ------------------------------------------------------------------ one client cannot stall it


def test_adversarial_uploads_do_not_block_health_checks(server, client) -> None:
    """Regression: a 10 MB PNG of ~870 000 empty chunks blocked /healthz for 4.5 s, a 10 MB
    progressive JPEG of ~4 200 scans for 1.7 s: they were parsed on the event loop."""
    png = attack.png_many_chunks(10_000_000)  # under the 10 MiB body limit with multipart
    jpeg = attack.jpeg_many_scans(10_000_000)
    answers: list[str] = []

    def upload(kind: str, data: bytes, media: str) -> None:
        for _ in range(3):
            try:
                if kind == "raw":
                    r = httpx.post(server.url + "/classify", content=data,
                                   headers={"Content-Type": media}, timeout=120)  # fmt: skip
                else:  # multipart: read whole, then checked off the event loop
                    r = httpx.post(server.url + "/classify", files={"file": ("x", data, media)},
                                   timeout=120)  # fmt: skip
                answers.append(str(r.status_code))
            except httpx.TransportError:
                answers.append("closed")  # refused early: the rest of the body is not read

    uploads = [
        threading.Thread(target=upload, args=args)
        for args in (("raw", png, "image/png"), ("raw", jpeg, "image/jpeg"),
                     ("multipart", png, "image/png"), ("multipart", jpeg, "image/jpeg"))
    ]  # fmt: skip
    for thread in uploads:
        thread.start()
    slowest = 0.0
    while any(thread.is_alive() for thread in uploads):
        started = time.monotonic()
        assert client.get("/healthz").status_code == 200
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.01)
    assert slowest < 0.5
    assert set(answers) <= {"400", "closed"} and len(answers) == 12


def test_a_stalled_upload_does_not_hold_other_requests_in_the_batcher(server, client, image):
    """Regression: a request still receiving its body counted as arriving, so every lone
    request waited the whole batch window (204 ms at MAX_BATCH_WAIT_MS=200)."""
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as stalled:
        stalled.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 50000\r\n\r\n" + b"\x89PNG\r\n\x1a\n"
        )
        time.sleep(0.3)  # the stalled request is inside the route, reading its body
        seconds = []
        for _ in range(5):
            started = time.monotonic()
            response = client.post(
                "/classify", content=image, headers={"Content-Type": "image/png"}
            )
            assert response.status_code == 200
            seconds.append(time.monotonic() - started)
    assert sorted(seconds)[2] < 0.2  # the batch window is 0.3 s


def test_small_images_that_decode_to_gigabytes_stay_within_the_memory_budget(server) -> None:
    """Regression: sixteen concurrent 32 KB 16-bit 4096×4096 PNGs took the process to 5.4 GB
    and it kept 744 MB after going idle."""
    payload = attack.png16_gray(4096)
    baseline = status_kib(server.pid, "VmRSS")
    Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # peak := now

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
            responses = await asyncio.gather(*(
                http.post("/classify", content=payload, headers={"Content-Type": "image/png"})
                for _ in range(16)
            ))  # fmt: skip
        return [r.status_code for r in responses]

    assert asyncio.run(burst()) == [200] * 16
    peak = status_kib(server.pid, "VmHWM")
    time.sleep(2.0)
    after = status_kib(server.pid, "VmRSS")
    # The budget bounds decoding; the rest (bodies, answers, threads) is small.
    assert (peak - baseline) / 1024 <= BUDGET_MB + 96
    assert (after - baseline) / 1024 <= 64


# ------------------------------------------------------------------ small request defects


def test_head_health_checks_are_answered(client) -> None:
    """Regression: HEAD /healthz was 405."""
    assert client.head("/healthz").status_code == 200
    assert client.head("/readyz").status_code == 200


def test_two_file_parts_on_the_single_image_endpoint_are_refused(client, image) -> None:
    """Regression: the last of two `file` parts was silently classified."""
    files = [("file", ("a.png", image, "image/png")), ("file", ("b.png", image, "image/png"))]
    response = client.post("/classify", files=files)
    assert response.status_code == 422 and "/classify/batch" in response.json()["detail"]


def test_a_token_configured_with_spaces_still_matches(client) -> None:
    """Regression: an admin token with surrounding spaces could never match."""
    current = thresholds(client)
    response = client.put("/v1/thresholds", json={"thresholds": current}, headers=AUTH)
    assert response.status_code == 200


# ------------------------------------------------------------------ no bad value changes answers


def test_bad_threshold_numbers_are_400_and_tuned_keeps_history(client, bundle) -> None:
    """Regression: a 400-digit integer raised OverflowError (500), a NaN in `tuned` was written
    as bare NaN, and each PUT replaced the tuning record instead of keeping it as history."""
    before = thresholds(client)
    huge = '{"thresholds": [0.5, 1' + "0" * 400 + ", 0.1]}"
    response = client.put("/v1/thresholds", content=huge, headers=AUTH)
    assert response.status_code == 400 and "threshold 2" in response.json()["detail"]
    nan = '{"thresholds": [0.5, 0.5, 0.1], "tuned": {"method": "x", "score": NaN}}'
    response = client.put("/v1/thresholds", content=nan, headers=AUTH)
    assert response.status_code == 400 and "standard JSON" in response.json()["detail"]
    assert thresholds(client) == pytest.approx(before)

    first = client.put("/v1/thresholds", json={"thresholds": [0.6, 0.6, 0.2],
                                               "tuned": {"method": "hand", "note": "a"}},
                       headers=AUTH).json()  # fmt: skip
    second = client.put("/v1/thresholds", json={"thresholds": [0.7, 0.7, 0.3]}, headers=AUTH)
    record = second.json()["tuned"]
    assert record["method"] == "manual"
    assert record["history"][0]["method"] == "hand" and record["history"][0]["note"] == "a"
    assert record["history"][0]["thresholds"] == pytest.approx([0.6, 0.6, 0.2])
    assert record["history"][1]["thresholds"] == pytest.approx(first["previous"])
    stored = json.loads((bundle / THRESHOLDS_FILE).read_text())  # standard JSON on disk
    assert stored["tuned"]["history"] == record["history"]


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_a_reload_without_a_readable_file_keeps_the_thresholds(client, bundle, kind) -> None:
    """Regression: reload with thresholds.json missing or a directory switched the server to
    full depth (all 1.0) and answered 200."""
    before = thresholds(client)
    path = bundle / THRESHOLDS_FILE
    saved = path.read_bytes()
    path.unlink()
    if kind == "directory":
        path.mkdir()
    try:
        response = client.post("/v1/thresholds/reload", headers=AUTH)
        assert response.status_code == 400 and "old ones stay" in response.json()["detail"]
        assert thresholds(client) == pytest.approx(before) and 1.0 not in before[:1]
    finally:
        if path.is_dir():
            path.rmdir()
        path.write_bytes(saved)


def test_sighup_with_a_huge_number_logs_one_error_and_keeps_serving(server, client, bundle):
    """Regression: SIGHUP with `1e400` written as an integer left an unhandled task error."""
    before = thresholds(client)
    path = bundle / THRESHOLDS_FILE
    saved = path.read_bytes()
    path.write_text('{"thresholds": [0.5, 1' + "0" * 400 + ", 0.1]}")
    try:
        server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "SIGHUP: thresholds not reloaded" not in server.logs():
            assert time.monotonic() < deadline, server.logs()[-2000:]
            time.sleep(0.05)
    finally:
        path.write_bytes(saved)
    assert thresholds(client) == pytest.approx(before)
    assert "Task exception" not in server.logs() and "Traceback" not in server.logs()
    assert client.get("/healthz").status_code == 200


# ------------------------------------------------------------------ start-up and shutdown


def test_a_port_in_use_is_one_line_before_anything_loads(tiny_bundle) -> None:
    """Regression: the documented message was missing, and "bundle loaded" was logged after
    the failed bind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "serving.cli", "--bundle", str(tiny_bundle),
             "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True, text=True, env=server_env(), cwd=REPO, timeout=300,
        )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("earlyexit-serve: cannot start server:")
    assert "address already in use" in last.lower()
    assert "bundle loaded" not in result.stderr + result.stdout


def test_a_fractional_shutdown_timeout_lets_in_flight_requests_finish(tiny_bundle, image, tmp_path):
    """Regression: EARLYEXIT_SHUTDOWN_TIMEOUT_S=0.5 was cut to 0 by int() and cancelled the
    request in flight."""
    env = {"EARLYEXIT_SHUTDOWN_TIMEOUT_S": "0.5", "EARLYEXIT_BATCH_WAIT": "fixed",
           "EARLYEXIT_MAX_BATCH_WAIT_MS": "300", "EARLYEXIT_MAX_BATCH_SIZE": "64"}  # fmt: skip
    server = start_server(tiny_bundle, env=env, log_dir=tmp_path)
    try:

        async def in_flight() -> httpx.Response:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                task = asyncio.ensure_future(
                    http.post("/classify", content=image, headers={"Content-Type": "image/png"})
                )
                depth = 0.0
                while depth < 1:
                    await asyncio.sleep(0.01)
                    depth = metric_value((await http.get("/metrics")).text, "earlyexit_queue_depth")
                server.send_signal(signal.SIGTERM)
                return await task

        assert asyncio.run(in_flight()).status_code == 200
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        server.stop()


@pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient.")
def test_the_packaged_bundle_is_served_from_a_writable_copy(tmp_path) -> None:
    """Regression: an admin update rewrote thresholds.json inside the installed package."""
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import DEFAULT_BUNDLE_DIR, Settings

    packaged = (DEFAULT_BUNDLE_DIR / THRESHOLDS_FILE).read_bytes()
    settings = Settings(bundle=DEFAULT_BUNDLE_DIR, state_dir=tmp_path / "state",
                        admin_token=TOKEN, providers=["cpu"], warmup=False)  # fmt: skip
    with TestClient(create_app(settings)) as http:
        deadline = time.monotonic() + 120
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        k = http.get("/v1/model").json()["num_exits"]
        response = http.put("/v1/thresholds", json={"thresholds": [1.0] * k}, headers=AUTH)
        assert response.status_code == 200
        written = Path(response.json()["path"])
    assert (DEFAULT_BUNDLE_DIR / THRESHOLDS_FILE).read_bytes() == packaged
    assert written.is_relative_to(tmp_path / "state")
    assert read_thresholds(written.parent, k).values == (1.0,) * k


def test_metric_help_says_what_is_counted() -> None:
    """Regression: requests_total read as all HTTP requests; threshold_updates named sources
    its labels never take."""
    from serving.metrics import ServingMetrics

    text = ServingMetrics().render().decode()
    help_line = next(line for line in text.splitlines() if "HELP earlyexit_requests_total" in line)
    assert "POST /classify" in help_line and "no other endpoint" in help_line
    updates = next(line for line in text.splitlines()
                   if "HELP earlyexit_threshold_updates_total" in line)  # fmt: skip
    assert all(source in updates for source in ("api ", "api-reload", "sighup"))


def test_startup_objects_are_frozen_out_of_the_collector() -> None:
    """A full garbage collection walked every import and set-up object (~100 ms here) while
    requests waited; the server freezes them before serving."""
    code = (
        "import gc; import serving.app; from serving.process_limits import "
        "freeze_startup_objects; freeze_startup_objects(); print(gc.get_freeze_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env=server_env(), timeout=300, check=True)  # fmt: skip
    assert int(out.stdout) > 10_000
