"""The HTTP API on the tiny bundle: routes, answers and errors in process (`app_client`);
concurrent requests, their metrics and the access log against a real uvicorn server."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving_helpers import app_client, metric_value, png_bytes, server_process

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    # A 20 ms batch window makes concurrent requests share batches, as under real load.
    env = {"EARLYEXIT_MAX_BATCH_WAIT_MS": "20"}
    with server_process(tiny_bundle, env=env, log_dir=tmp_path_factory.mktemp("http")) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=300.0) as http:
        yield http


@pytest.fixture(scope="module")
def app(tiny_bundle):
    """The app in process, for what a route answers (no process, no sockets)."""
    with app_client(tiny_bundle, max_batch_wait_ms=20.0) as http:
        yield http


@pytest.fixture(scope="module")
def expected(tiny_bundle, tiny_images):
    """What the in-process runtime answers for each tiny image (exit, class, confidence)."""
    from serving.runtime import EarlyExitRuntime

    runtime = EarlyExitRuntime(tiny_bundle, providers=["cpu"], intra_op_threads=1)
    result = runtime.classify(runtime.preprocess(tiny_images.images))
    return {
        "class_index": result.probs.argmax(axis=1).tolist(),
        "confidence": result.probs.max(axis=1).tolist(),
        "exit": [int(e) if e > 0 else "fallback" for e in result.exits],
    }


@pytest.fixture(scope="module")
def pngs(tiny_images):
    return [png_bytes(image) for image in tiny_images.images]


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 99))
            + chunk(b"IEND", b""))  # fmt: skip


def post_image(client: httpx.Client, data: bytes, content_type: str = "image/png", params=None):
    return client.post("/classify", content=data, headers={"Content-Type": content_type},
                       params=params)  # fmt: skip


def check_answer(body: dict, num_exits: int) -> None:
    assert set(body) >= {"label", "class_index", "confidence", "exit", "num_exits", "latency_ms",
                         "model"}  # fmt: skip
    assert body["num_exits"] == num_exits
    assert body["exit"] == "fallback" or 1 <= body["exit"] <= num_exits
    assert 0.0 < body["confidence"] <= 1.0 and body["latency_ms"] > 0
    assert body["model"] == {"name": "tiny-resnet18", "version": "1"}


# ------------------------------------------------------------------ endpoints


def test_health_ready_model_and_metrics(app, tiny_bundle) -> None:
    from core.bundle import read_thresholds

    assert app.get("/healthz").json() == {"status": "ok"}
    assert app.get("/readyz").status_code == 200
    model = app.get("/v1/model").json()
    assert model["name"] == "tiny-resnet18" and model["num_exits"] == 3
    assert model["labels"] == [f"class{i}" for i in range(10)]
    assert model["input"]["shape"] == [3, 32, 32]
    assert model["thresholds"] == pytest.approx(list(read_thresholds(tiny_bundle, 3).values))
    metrics = app.get("/metrics", follow_redirects=False)
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("earlyexit_queue_depth", "earlyexit_batch_size_bucket", "earlyexit_exit_total",
                 "earlyexit_threshold", "earlyexit_model_info"):  # fmt: skip
        assert name in metrics.text
    page = app.get("/")
    assert page.status_code == 200 and "file-input" in page.text
    assert app.get("/static/app.js").status_code == 200
    schema = app.get("/openapi.json").json()
    assert {"/classify", "/classify/batch", "/v1/model", "/v1/thresholds"} <= set(schema["paths"])
    for path in ("/classify", "/classify/batch"):  # query options parsed by hand, still documented
        params = {p["name"]: p for p in schema["paths"][path]["post"]["parameters"]}
        assert params["full"]["schema"]["type"] == "boolean"
        assert params["top_k"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 10_000}


def test_answers_match_the_in_process_runtime(app, pngs, expected) -> None:
    seen_exits = set()
    for i, data in enumerate(pngs):
        response = post_image(app, data)
        assert response.status_code == 200, response.text
        body = response.json()
        check_answer(body, 3)
        assert body["class_index"] == expected["class_index"][i]
        assert body["label"] == f"class{body['class_index']}"
        assert body["exit"] == expected["exit"][i]
        assert body["confidence"] == pytest.approx(expected["confidence"][i], abs=1e-5)
        seen_exits.add(body["exit"])
    # The fixture's thresholds make every exit and the fallback answer some images.
    assert seen_exits == {1, 2, 3, "fallback"}


def test_multipart_full_mode_and_top_k(app, pngs, expected) -> None:
    response = app.post("/classify", params={"full": "true", "top_k": 3},
                           files={"file": ("x.png", pngs[0], "image/png")})  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    check_answer(body, 3)
    assert [e["exit"] for e in body["exits"]] == [1, 2, 3]
    accepted = [e["exit"] for e in body["exits"] if e["accepted"]]
    assert body["exit"] == (accepted[0] if accepted else "fallback") == expected["exit"][0]
    if body["exit"] != "fallback":
        assert body["exits"][body["exit"] - 1]["label"] == body["label"]
    ranked = body["top_k"]
    assert len(ranked) == 3 and ranked[0]["class_index"] == body["class_index"]
    assert ranked[0]["confidence"] >= ranked[1]["confidence"] >= ranked[2]["confidence"]
    # top_k larger than the class count is clamped, not an error.
    everything = post_image(app, pngs[0], params={"top_k": 50}).json()["top_k"]
    assert sorted(e["class_index"] for e in everything) == list(range(10))
    assert sum(e["confidence"] for e in everything) == pytest.approx(1.0, abs=1e-4)


def test_batch_endpoint_keeps_order(app, pngs, expected) -> None:
    files = [("files", (f"{i}.png", pngs[i], "image/png")) for i in range(5)]
    response = app.post("/classify/batch", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["class_index"] for r in results] == expected["class_index"][:5]
    assert [r["exit"] for r in results] == expected["exit"][:5]
    assert app.post("/classify/batch", files={"other": ("a.png", pngs[0])}).status_code == 422
    bad = [("files", ("0.png", pngs[0], "image/png")), ("files", ("1.png", b"junk", "image/png"))]
    response = app.post("/classify/batch", files=bad)
    assert response.status_code == 400 and "files[1]" in response.json()["detail"]


# ------------------------------------------------------------------ bad and odd inputs


def test_odd_but_valid_images_are_classified(app) -> None:
    frames = [Image.new("RGB", (20, 20), c) for c in ((0, 0, 255), (255, 0, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=40)
    valid = {
        "1x1": encode(noise((1, 1)), "PNG"),
        "10000x10": encode(noise((10000, 10)), "PNG"),
        "animated gif": gif.getvalue(),
        "16-bit png": encode(Image.fromarray(np.full((24, 24), 40000, np.uint16)), "PNG"),
        "cmyk jpeg": encode(Image.new("CMYK", (40, 30), (10, 200, 30, 0)), "JPEG"),
        "webp": encode(noise((50, 50)), "WEBP"),
        "bmp": encode(noise((33, 17)), "BMP"),
        "rgba png": encode(noise((40, 40)).convert("RGBA"), "PNG"),
        "la png": encode(noise((40, 40)).convert("LA"), "PNG"),
        "palette png": encode(noise((40, 40)).convert("P"), "PNG"),
    }
    for name, data in valid.items():
        response = post_image(app, data, content_type="image/*")
        assert response.status_code == 200, (name, response.text)
        check_answer(response.json(), 3)


def test_bad_inputs_get_the_right_status_and_json(app, pngs) -> None:
    png = pngs[0]
    cases = [
        ("empty body", post_image(app, b""), 400),
        ("text as image", post_image(app, b"hello, world"), 400),
        ("text content type", post_image(app, b"hello", "text/plain"), 415),
        ("json content type", post_image(app, png, "application/json"), 415),
        ("no content type", app.post("/classify", content=png), 415),
        ("truncated png", post_image(app, encode(noise((64, 64)), "PNG")[:700]), 400),
        ("declared 100000x100000", post_image(app, png_claiming(100_000, 100_000)), 413),
        ("declared 5000x5000", post_image(app, png_claiming(5000, 5000)), 413),
        ("oversized body", post_image(app, b"\0" * (10 * 1024 * 1024 + 1)), 413),
        ("tiff", post_image(app, encode(noise((8, 8)), "TIFF"), "image/tiff"), 415),
        ("missing field", app.post("/classify", files={"image": ("a.png", png)}), 422),
        ("text part", app.post("/classify", files={"file": ("a.txt", b"x", "text/plain")}), 415),
        ("bad top_k", post_image(app, png, params={"top_k": 0}), 400),
        ("top_k not a number", post_image(app, png, params={"top_k": "ten"}), 400),
        ("full as a number", post_image(app, png, params={"full": "2"}), 400),
        ("bad full", post_image(app, png, params={"full": "maybe"}), 400),
        ("unknown path", app.get("/nope"), 404),
        ("wrong method", app.get("/classify"), 405),
    ]
    for name, response, status in cases:
        assert response.status_code == status, (name, response.status_code, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail, name
    assert app.get("/healthz").status_code == 200
    assert post_image(app, png).status_code == 200


def test_streamed_oversized_body_is_cut_off(app) -> None:
    def chunks():
        for _ in range(12):
            yield b"\0" * (1024 * 1024)

    response = app.post("/classify", content=chunks(), headers={"Content-Type": "image/png"})
    assert response.status_code == 413
    assert app.get("/healthz").status_code == 200


# ------------------------------------------------------------------ concurrency and metrics


async def _burst(url: str, payloads: list[bytes], params=None) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(payloads))
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as http:
        return await asyncio.gather(*(
            http.post("/classify", content=p, headers={"Content-Type": "image/png"}, params=params)
            for p in payloads
        ))  # fmt: skip


def test_fifty_concurrent_requests_get_their_single_answers(server, client, pngs) -> None:
    payloads = [pngs[i % len(pngs)] for i in range(50)]
    alone = [post_image(client, p).json() for p in payloads[: len(pngs)]]
    before = client.get("/metrics").text
    responses = asyncio.run(_burst(server.url, payloads))
    after = client.get("/metrics").text
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        body, ref = response.json(), alone[i % len(alone)]
        assert (body["class_index"], body["exit"]) == (ref["class_index"], ref["exit"])
        assert body["confidence"] == pytest.approx(ref["confidence"], abs=1e-5)
    batches = metric_value(after, "earlyexit_batch_size_count") - metric_value(
        before, "earlyexit_batch_size_count"
    )
    rows = metric_value(after, "earlyexit_batch_size_sum") - metric_value(
        before, "earlyexit_batch_size_sum"
    )
    assert rows == 50
    assert batches < 50, "concurrent requests never shared a batch"


def test_metrics_count_exactly_the_requests_sent(server, client, pngs) -> None:
    before = client.get("/metrics").text
    answers = [post_image(client, p).json() for p in pngs[:12]]
    full_answers = asyncio.run(_burst(server.url, pngs[12:20], params={"full": "true"}))
    bad = [post_image(client, b"junk") for _ in range(3)] + [post_image(client, b"x", "text/plain")]
    after = client.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, labels) - metric_value(before, name, labels)

    assert [r.status_code for r in bad] == [400, 400, 400, 415]
    assert delta("earlyexit_requests_total", code="200") == 20
    assert delta("earlyexit_requests_total", code="400") == 3
    assert delta("earlyexit_requests_total", code="415") == 1
    assert delta("earlyexit_request_duration_seconds_count") == 24
    exits = [a["exit"] for a in answers] + [r.json()["exit"] for r in full_answers]
    for label in ("1", "2", "3", "fallback"):
        want = sum(1 for e in exits if str(e) == label)
        assert delta("earlyexit_exit_total", exit=label) == want, label
        assert delta("earlyexit_exit_confidence_count", exit=label) == want, label
    assert delta("earlyexit_batch_size_sum") == 20
    # Every answered image ran segment 1; each batch observes each segment it ran once.
    assert 1 <= delta("earlyexit_segment_duration_seconds_count", segment="1") <= 20
    assert metric_value(after, "earlyexit_queue_depth") == 0


def test_access_log_has_one_json_line_per_request(server, client, pngs) -> None:
    import json
    import time

    marker = f"/nope-{time.time_ns()}"
    client.get(marker)
    post_image(client, pngs[1])
    deadline = time.monotonic() + 5
    lines = []
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
        if any(entry.get("path") == marker for entry in lines):
            break
        time.sleep(0.1)
    access = [e for e in lines if e.get("logger") == "serving.access"]
    miss = [e for e in access if e["path"] == marker]
    assert len(miss) == 1 and miss[0]["status"] == 404 and miss[0]["method"] == "GET"
    classified = [e for e in access if e["path"] == "/classify" and e["status"] == 200]
    assert classified and all(e["exit"] in (1, 2, 3, "fallback") for e in classified)
    assert all(e["duration_ms"] >= 0 for e in access)
