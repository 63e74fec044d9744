"""Retuning without restart (admin API, SIGHUP), the queue limit and graceful shutdown, against
real uvicorn servers on copies of the tiny bundle; answers that need no process in process."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from core.bundle import THRESHOLDS_FILE, Thresholds, read_thresholds, write_thresholds
from tests.conftest import copy_bundle
from tests.serving_helpers import (
    app_client,
    metric_value,
    png_bytes,
    server_process,
    start_server,
)

TOKEN = "test-admin-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def bundle(tiny_bundle, tmp_path_factory):
    return copy_bundle(tiny_bundle, tmp_path_factory.mktemp("admin") / "bundle")


@pytest.fixture(scope="module")
def admin_server(bundle, tmp_path_factory):
    env = {"EARLYEXIT_ADMIN_TOKEN": TOKEN, "EARLYEXIT_MAX_BATCH_WAIT_MS": "5"}
    with server_process(bundle, env=env, log_dir=tmp_path_factory.mktemp("log")) as server:
        yield server


@pytest.fixture(scope="module")
def client(admin_server):
    with httpx.Client(base_url=admin_server.url, timeout=300.0) as http:
        yield http


@pytest.fixture(scope="module")
def pngs(tiny_images):
    return [png_bytes(image) for image in tiny_images.images]


def current(client: httpx.Client) -> list[float]:
    return client.get("/v1/model").json()["thresholds"]


def classify(client: httpx.Client, data: bytes) -> dict:
    response = client.post("/classify", content=data, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_thresholds(client: httpx.Client, want: list[float], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if current(client) == pytest.approx(want):
            return
        time.sleep(0.05)
    raise AssertionError(f"thresholds still {current(client)}, wanted {want}")


def test_auth(client) -> None:
    body = {"thresholds": [0.5, 0.5, 0.5]}
    before = current(client)
    assert client.put("/v1/thresholds", json=body).status_code == 401
    wrong = client.put("/v1/thresholds", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    basic = client.put("/v1/thresholds", json=body, headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    # Anonymous callers get 401 even for a malformed body: auth is checked first.
    assert client.put("/v1/thresholds", content=b"{").status_code == 401
    assert client.post("/v1/thresholds/reload").status_code == 401
    assert current(client) == before


def test_put_swaps_and_persists(client, bundle, pngs) -> None:
    original = read_thresholds(bundle, 3)
    response = client.put(
        "/v1/thresholds",
        json={"thresholds": [1.0, 1.0, 0.0], "tuned": {"method": "by-hand", "note": "test"}},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["thresholds"] == [1.0, 1.0, 0.0]
    assert body["previous"] == pytest.approx(list(original.values))
    stored = json.loads((bundle / THRESHOLDS_FILE).read_text())
    assert stored["thresholds"] == [1.0, 1.0, 0.0] and stored["tuned"]["method"] == "by-hand"
    assert current(client) == [1.0, 1.0, 0.0]
    # Exits 1 and 2 disabled, exit 3 accepts everything: every answer now comes from exit 3.
    assert {classify(client, p)["exit"] for p in pngs[:16]} == {3}
    model = client.get("/v1/model").json()
    assert model["tuned"]["note"] == "test"
    metrics = client.get("/metrics").text
    assert 'earlyexit_threshold{exit="3"} 0.0' in metrics
    restore = {"thresholds": list(original.values), "tuned": original.tuned}
    assert client.put("/v1/thresholds", json=restore, headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"thresholds": [0.5, 0.5]}, 400),
        ({"thresholds": [0.5, 0.5, 1.5]}, 400),
        ({"thresholds": [0.5, -0.1, 0.5]}, 400),
        ({"thresholds": [0.5, "high", 0.5]}, 400),
        ({"thresholds": [0.5, None, 0.5]}, 400),
        ({"thresholds": "0.5"}, 422),
        ({"values": [0.5, 0.5, 0.5]}, 422),
        ({"thresholds": [0.5, 0.5, 0.5], "tuned": "yesterday"}, 422),
        (b"not json", 422),
    ],
)
def test_invalid_thresholds_keep_the_old_ones(client, bundle, payload, status) -> None:
    before, file_before = current(client), (bundle / THRESHOLDS_FILE).read_bytes()
    kwargs = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
    response = client.put("/v1/thresholds", headers=AUTH, **kwargs)
    assert response.status_code == status, response.text
    assert isinstance(response.json()["detail"], str)
    assert current(client) == before
    assert (bundle / THRESHOLDS_FILE).read_bytes() == file_before


def test_sighup_and_reload_endpoint_reread_the_file(admin_server, client, bundle) -> None:
    original = read_thresholds(bundle, 3)
    try:
        write_thresholds(bundle, Thresholds((0.9, 0.8, 0.7), {"method": "sighup-test"}))
        admin_server.send_signal(signal.SIGHUP)
        wait_for_thresholds(client, [0.9, 0.8, 0.7])
        assert client.get("/v1/model").json()["tuned"]["method"] == "sighup-test"
        assert client.get("/healthz").status_code == 200  # SIGHUP did not stop the server

        # A broken file is refused; the server keeps what it has.
        (bundle / THRESHOLDS_FILE).write_text('{"thresholds": [0.1, 2.0, 0.1]}')
        admin_server.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while "thresholds not reloaded" not in admin_server.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "thresholds not reloaded" in admin_server.logs()
        assert current(client) == [0.9, 0.8, 0.7]
        response = client.post("/v1/thresholds/reload", headers=AUTH)
        assert response.status_code == 400 and current(client) == [0.9, 0.8, 0.7]

        write_thresholds(bundle, Thresholds((0.2, 0.3, 0.4), {"method": "reload-test"}))
        response = client.post("/v1/thresholds/reload", headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["thresholds"] == [0.2, 0.3, 0.4]
        assert current(client) == [0.2, 0.3, 0.4]
    finally:
        write_thresholds(bundle, original)
        assert client.post("/v1/thresholds/reload", headers=AUTH).status_code == 200


def test_swap_during_a_burst_loses_no_request(admin_server, client, bundle, pngs) -> None:
    original = list(read_thresholds(bundle, 3).values)
    full_depth = [1.0, 1.0, 1.0]
    images = pngs[:32]
    # Each image's answer under either threshold vector, one request at a time.
    refs = {}
    for name, values in (("full", full_depth), ("tuned", original)):
        assert client.put("/v1/thresholds", json={"thresholds": values}, headers=AUTH).is_success
        refs[name] = [(a["class_index"], a["exit"]) for a in (classify(client, p) for p in images)]
    assert refs["full"] != refs["tuned"]

    async def burst() -> tuple[list[httpx.Response], list[int]]:
        limits = httpx.Limits(max_connections=24)
        async with httpx.AsyncClient(base_url=admin_server.url, timeout=300, limits=limits) as http:

            async def swapper() -> list[int]:
                codes = []
                for i in range(12):
                    values = full_depth if i % 2 == 0 else original
                    r = await http.put("/v1/thresholds", json={"thresholds": values}, headers=AUTH)
                    codes.append(r.status_code)
                    await asyncio.sleep(0.01)
                return codes

            async def post(i: int) -> httpx.Response:
                return await http.post(
                    "/classify", content=images[i % len(images)],
                    headers={"Content-Type": "image/png"},
                )  # fmt: skip

            swaps = asyncio.ensure_future(swapper())
            responses = await asyncio.gather(*(post(i) for i in range(160)))
            return list(responses), await swaps

    responses, swap_codes = asyncio.run(burst())
    assert swap_codes == [200] * 12
    assert [r.status_code for r in responses] == [200] * 160
    for i, response in enumerate(responses):
        body = response.json()
        answer = (body["class_index"], body["exit"])
        # Every answer is the whole answer of one threshold vector, never a mix.
        assert answer in (refs["full"][i % 32], refs["tuned"][i % 32]), (i, answer)
    assert current(client) == pytest.approx(original)  # the last swap (i = 11) restored them


# ------------------------------------------------------------------ other configurations


def test_no_token_means_403_and_full_queue_means_503(bundle_copy, pngs) -> None:
    # A long fixed batch window keeps two requests queued while a third arrives.
    settings = {"queue_size": 2, "batch_wait": "fixed", "max_batch_wait_ms": 3000.0,
                "max_batch_size": 64}  # fmt: skip
    png = {"Content-Type": "image/png"}
    with app_client(bundle_copy, **settings) as http:
        body = {"thresholds": [0.5, 0.5, 0.5]}
        assert http.put("/v1/thresholds", json=body).status_code == 403
        assert http.put("/v1/thresholds", json=body, headers=AUTH).status_code == 403
        assert http.post("/v1/thresholds/reload", headers=AUTH).status_code == 403

        # Requests from several threads run concurrently in the app's event loop.
        with ThreadPoolExecutor(2) as pool:
            queued = [pool.submit(http.post, "/classify", content=p, headers=png) for p in pngs[:2]]
            depth = 0.0
            deadline = time.monotonic() + 60
            while depth < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
                depth = metric_value(http.get("/metrics").text, "earlyexit_queue_depth")
            started = time.monotonic()
            third = http.post("/classify", content=pngs[2], headers=png)
            seconds = time.monotonic() - started
            answers = [future.result() for future in queued]
        assert third.status_code == 503 and third.headers["retry-after"]
        assert "queue full" in third.json()["detail"] and seconds < 2.5
        assert [r.status_code for r in answers] == [200, 200]
        assert 'earlyexit_requests_total{code="503"} 1.0' in http.get("/metrics").text


def test_a_batch_larger_than_the_queue_is_413_not_a_permanent_503(bundle_copy, pngs):
    """Regression: on an idle server a batch of more images than the queue holds got 503 "queue
    full" with Retry-After, and every retry would get it again."""
    with app_client(bundle_copy, queue_size=2) as http:
        files = [("files", (f"{i}.png", pngs[i], "image/png")) for i in range(3)]
        response = http.post("/classify/batch", files=files)
        assert response.status_code == 413 and "retry-after" not in response.headers
        assert "exceed the queue size (2)" in response.json()["detail"]
        assert http.post("/classify/batch", files=files[:2]).status_code == 200


def test_graceful_shutdown_answers_queued_requests(tiny_bundle, pngs, tmp_path) -> None:
    # A long batch window keeps the requests queued when SIGTERM arrives.
    env = {"EARLYEXIT_MAX_BATCH_WAIT_MS": "3000", "EARLYEXIT_MAX_BATCH_SIZE": "64",
           "EARLYEXIT_BATCH_WAIT": "fixed"}  # fmt: skip
    server = start_server(tiny_bundle, env=env, log_dir=tmp_path)
    try:

        async def burst() -> tuple[list[httpx.Response], float]:
            async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
                tasks = [
                    asyncio.ensure_future(
                        http.post("/classify", content=p, headers={"Content-Type": "image/png"})
                    )
                    for p in pngs[:8]
                ]
                deadline = time.monotonic() + 60
                depth = 0.0
                while depth < 8 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                    depth = metric_value((await http.get("/metrics")).text, "earlyexit_queue_depth")
                server.send_signal(signal.SIGTERM)
                return list(await asyncio.gather(*tasks)), depth

        responses, depth = asyncio.run(burst())
        assert depth == 8, "the requests were not queued when SIGTERM was sent"
        assert [r.status_code for r in responses] == [200] * 8
        # uvicorn re-raises the signal after its graceful shutdown: "killed by SIGTERM" is normal.
        assert server.process.wait(timeout=120) in (0, -signal.SIGTERM)
    finally:
        server.stop()
    logs = server.logs()
    assert "server stopped" in logs


def test_a_bundle_that_fails_to_load_is_alive_but_not_ready(bundle_copy, pngs, caplog) -> None:
    from core.atomic import atomic_write_json
    from core.bundle import MANIFEST_FILE, sha256_file

    # Hashes match (the CLI check passes) but segment 2 is not an ONNX model.
    segment = bundle_copy / "segment_2.onnx"
    segment.write_bytes(b"definitely not protobuf")
    manifest = json.loads((bundle_copy / MANIFEST_FILE).read_text())
    manifest["segments"][1]["sha256"] = sha256_file(segment)
    atomic_write_json(bundle_copy / MANIFEST_FILE, manifest)

    with app_client(bundle_copy, wait=False) as http:
        deadline = time.monotonic() + 180
        ready = http.get("/readyz")
        while ready.json().get("status") != "failed":
            assert time.monotonic() < deadline, ready.json()
            time.sleep(0.05)
            ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"]
        assert "bundle failed to load" in ready.json()["detail"]
        assert http.get("/healthz").status_code == 200
        response = http.post("/classify", content=pngs[0], headers={"Content-Type": "image/png"})
        assert response.status_code == 503 and "failed to load" in response.json()["detail"]
        assert http.get("/v1/model").status_code == 503
        assert "earlyexit_ready 0.0" in http.get("/metrics").text
    assert "bundle failed to load" in caplog.text
