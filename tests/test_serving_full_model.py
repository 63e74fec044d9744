"""`earlyexit-serve --full-model`: the bundle's plain single graph behind the same routes,
batching, decoding and metrics (in-process app, `TestClient`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from core.bundle import MANIFEST_FILE, THRESHOLDS_FILE, BundleError, load_manifest
from tests.conftest import normalise
from tests.plain_fixtures import BASELINE_FILE, with_baseline
from tests.serving_helpers import metric_value, png_bytes

TOKEN = "full-model-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Starlette's TestClient warns about its own use of httpx; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient.")


@pytest.fixture(scope="module")
def plain_bundle(tiny_bundle, plain_graph, tmp_path_factory) -> Path:
    return with_baseline(tiny_bundle, plain_graph, tmp_path_factory.mktemp("plain") / "bundle")


def _client(bundle: Path, **settings_kwargs):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import Settings

    settings = Settings(bundle=bundle, providers=["cpu"], intra_op_threads=1, access_log=False,
                        admin_token=TOKEN, max_batch_size=8, **settings_kwargs)  # fmt: skip
    return TestClient(create_app(settings))


def _wait_ready(http) -> None:
    deadline = time.monotonic() + 120
    while http.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, http.get("/readyz").json()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def plain_client(plain_bundle) -> Iterator:
    with _client(plain_bundle, full_model=True) as http:
        _wait_ready(http)
        yield http


def _onnx_probs(path: Path, images: np.ndarray) -> np.ndarray:
    """onnxruntime run directly on a single graph, on the images normalised by hand."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probs"], {"input": normalise(images)})[0]


def _post(http, png: bytes, params: dict | None = None) -> dict:
    response = http.post(
        "/classify", content=png, headers={"Content-Type": "image/png"}, params=params
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_answers_are_the_plain_graphs_own(plain_client, plain_bundle, tiny_images) -> None:
    images = tiny_images.images[:16]
    want = _onnx_probs(plain_bundle / BASELINE_FILE, images)
    answers = [_post(plain_client, png_bytes(image)) for image in images]
    for answer, probs in zip(answers, want, strict=True):
        assert answer["exit"] == "full"
        assert answer["num_exits"] == 3  # as for the bundle
        assert answer["class_index"] == int(probs.argmax())
        assert answer["label"] == tiny_images.classes[int(probs.argmax())]
        assert answer["confidence"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert "exits" not in answer
    # The baseline block's graph answered, not the jointly trained backbone (full_model.onnx).
    backbone = _onnx_probs(plain_bundle / "full_model.onnx", images)
    served = np.array([a["confidence"] for a in answers])
    assert not np.allclose(served, backbone.max(axis=1), atol=1e-3)


def test_batch_full_and_top_k(plain_client, plain_bundle, tiny_images) -> None:
    images = tiny_images.images[16:22]
    want = _onnx_probs(plain_bundle / BASELINE_FILE, images)
    files = [("files", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)]
    response = plain_client.post("/classify/batch", files=files, params={"top_k": 3})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["class_index"] for r in results] == want.argmax(axis=1).tolist()
    for result, probs in zip(results, want, strict=True):
        assert result["exit"] == "full"
        assert [c["class_index"] for c in result["top_k"]] == np.argsort(-probs)[:3].tolist()
    # full=true: the same answer (there is no early decision to override), and no exits to list.
    plain = _post(plain_client, png_bytes(images[0]))
    full = _post(plain_client, png_bytes(images[0]), {"full": "true"})
    assert full["exits"] == []
    assert {k: full[k] for k in ("label", "class_index", "confidence", "exit")} == {
        k: plain[k] for k in ("label", "class_index", "confidence", "exit")
    }
    assert plain_client.post("/classify", params={"full": "maybe"}, content=b"x",
                             headers={"Content-Type": "image/png"}).status_code == 400  # fmt: skip


def test_model_says_what_is_served(plain_client, plain_bundle) -> None:
    model = plain_client.get("/v1/model").json()
    assert model["mode"] == "full_model"
    manifest = json.loads((plain_bundle / MANIFEST_FILE).read_text())
    assert model["served_graph"] == {
        "file": BASELINE_FILE,
        "sha256": manifest["baseline"]["sha256"],
        "source": "baseline",
        "macs": None,  # the fixture's manifest records no count for it
    }
    assert model["thresholds"] == [] and model["num_exits"] == 3


def test_metrics_count_the_single_graph(plain_client, tiny_images) -> None:
    def scrape() -> str:
        return plain_client.get("/metrics").text

    before = scrape()
    for image in tiny_images.images[:5]:
        _post(plain_client, png_bytes(image))
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, labels) - metric_value(before, name, labels)

    assert delta("earlyexit_exit_total", exit="full") == 5
    assert delta("earlyexit_segment_duration_seconds_count", segment="full") >= 1
    assert delta("earlyexit_requests_total", code="200") == 5
    # No series of exits or segments the plain model does not have.
    assert 'exit="1"' not in after and 'exit="fallback"' not in after
    assert 'segment="1"' not in after and "earlyexit_threshold{" not in after


def test_threshold_endpoints_answer_409(plain_client, plain_bundle) -> None:
    stored = (plain_bundle / THRESHOLDS_FILE).read_bytes()
    response = plain_client.put("/v1/thresholds", json={"thresholds": [0.5] * 3}, headers=AUTH)
    assert response.status_code == 409
    assert "plain model" in response.json()["detail"]
    assert "no thresholds" in response.json()["detail"]
    # Also with a body that would be malformed: the mode is the problem, not the body.
    assert plain_client.put("/v1/thresholds", content=b"{", headers=AUTH).status_code == 409
    assert plain_client.post("/v1/thresholds/reload", headers=AUTH).status_code == 409
    # Admin auth still comes first.
    assert plain_client.put("/v1/thresholds", json={"thresholds": [0.5] * 3}).status_code == 401
    assert (plain_bundle / THRESHOLDS_FILE).read_bytes() == stored


def test_without_a_baseline_file_full_model_onnx_is_served(tiny_bundle, tiny_images) -> None:
    images = tiny_images.images[:4]
    want = _onnx_probs(tiny_bundle / "full_model.onnx", images)
    with _client(tiny_bundle, full_model=True) as http:
        _wait_ready(http)
        graph = http.get("/v1/model").json()["served_graph"]
        assert graph["file"] == "full_model.onnx" and graph["source"] == "full_model"
        assert graph["macs"] == load_manifest(tiny_bundle).full_model.macs
        for image, probs in zip(images, want, strict=True):
            answer = _post(http, png_bytes(image))
            assert answer["exit"] == "full" and answer["class_index"] == int(probs.argmax())


def test_the_early_exit_server_of_the_same_bundle_is_unchanged(plain_bundle, tiny_images) -> None:
    with _client(plain_bundle) as http:
        _wait_ready(http)
        model = http.get("/v1/model").json()
        assert model["mode"] == "early_exit" and model["served_graph"] is None
        assert len(model["thresholds"]) == 3
        answer = _post(http, png_bytes(tiny_images.images[0]))
        assert answer["exit"] in (1, 2, 3, "fallback")


def test_setting_from_the_environment(monkeypatch) -> None:
    from serving.settings import Settings

    monkeypatch.setenv("EARLYEXIT_FULL_MODEL", "true")
    assert Settings().full_model is True
    monkeypatch.setenv("EARLYEXIT_FULL_MODEL", "")  # set but empty: the default
    assert Settings().full_model is False


@pytest.fixture
def tampered_bundle(plain_bundle, tmp_path) -> Path:
    """The plain bundle with baseline.onnx replaced (one byte appended)."""
    import shutil

    bundle = shutil.copytree(plain_bundle, tmp_path / "tampered")
    with open(bundle / BASELINE_FILE, "ab") as fh:
        fh.write(b"\0")
    return bundle


@pytest.mark.parametrize("mode", [["--full-model"], []], ids=["full-model", "early-exit"])
def test_a_replaced_baseline_graph_is_refused_at_start_up(
    tampered_bundle, mode, capsys, monkeypatch
) -> None:
    from serving.cli import main

    for key in [k for k in os.environ if k.startswith("EARLYEXIT_")]:
        monkeypatch.delenv(key)
    code = main(["--bundle", str(tampered_bundle), "--providers", "cpu", "--port", "0", *mode])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("earlyexit-serve: bad bundle: sha256 mismatch for baseline.onnx")


def test_load_manifest_verifies_the_baseline_graph(tampered_bundle) -> None:
    with pytest.raises(BundleError, match="sha256 mismatch for baseline.onnx"):
        load_manifest(tampered_bundle)
    (tampered_bundle / BASELINE_FILE).unlink()
    with pytest.raises(BundleError, match="bundle file missing: baseline.onnx"):
        load_manifest(tampered_bundle)
    assert load_manifest(tampered_bundle, verify=False).baseline.file == BASELINE_FILE


def test_plain_runtime_matches_onnxruntime(plain_bundle, tiny_images) -> None:
    from serving.metrics import FULL_EXIT
    from serving.plain_runtime import PlainModelRuntime

    runtime = PlainModelRuntime(plain_bundle, intra_op_threads=1)
    images = tiny_images.images[:8]
    want = _onnx_probs(plain_bundle / BASELINE_FILE, images)
    result = runtime.classify(runtime.preprocess(images))
    np.testing.assert_allclose(result.probs, want, rtol=0, atol=1e-6)
    assert result.exits.tolist() == [FULL_EXIT] * 8
    assert result.rows_per_segment == [8] and len(result.segment_seconds) == 1
    assert runtime.warm_up(5) == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="no exits"):
        runtime.classify(runtime.preprocess(images), thresholds=[0.5, 0.5, 0.5])
