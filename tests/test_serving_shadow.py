"""Shadow sampling, live signals and the guarded retune on copies of the tiny bundle: against real
uvicorn servers wherever rows are sampled (the sampler's thread runs at a lower priority, which an
in-process app shares with the test driving it), in process where nothing is sampled, and on the
serving state itself for branches forced by hand."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from core.bundle import THRESHOLDS_FILE
from core.drift import confidence_reference
from serving.runtime import EarlyExitRuntime
from serving.shadow_store import ShadowStore
from tests.conftest import copy_bundle, tiny_uint8_images
from tests.serving_helpers import app_client, metric_value, png_bytes, server_process

TOKEN = "shadow-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def shadow_env(state_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        "EARLYEXIT_STATE_DIR": str(state_dir),
        "EARLYEXIT_SHADOW_RATE": "1",
        "EARLYEXIT_SHADOW_QUEUE_SIZE": "4096",
        "EARLYEXIT_ADMIN_TOKEN": TOKEN,
        "EARLYEXIT_MAX_BATCH_WAIT_MS": "2",
    }
    env.update(extra)
    return env


def wait_rows(client: httpx.Client, rows: int, seconds: float = 60.0) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        signals = client.get("/v1/shadow").json()
        if signals["rows"] >= rows or time.monotonic() > deadline:
            return signals
        time.sleep(0.05)


def classify_batch(client: httpx.Client, pngs: list[bytes]) -> list[dict]:
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(pngs)]
    response = client.post("/classify/batch", files=files)
    assert response.status_code == 200, response.text
    return response.json()["results"]


@pytest.fixture(scope="module")
def pngs(tiny_images):
    return [png_bytes(image) for image in tiny_images.images]


# Distinct images, so the held-out rows of a retune are not copies of the tuning rows.
@pytest.fixture(scope="module")
def many_pngs():
    return [png_bytes(image) for image in tiny_uint8_images(704, seed=7)]


def test_sample_holds_exactly_the_answered_rows_full_depth_results(
    tiny_bundle, tiny_images, pngs, tmp_path
) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    runtime = EarlyExitRuntime(tiny_bundle, providers=["cpu"])
    expected = runtime.classify(runtime.preprocess(tiny_images.images[:20]), full=True)
    # thresholds.json carries a drift reference made from these very rows: no drift.
    stored = json.loads((bundle / THRESHOLDS_FILE).read_text())
    stored["tuned"]["reference"] = confidence_reference(
        expected.exit_probs,
        "val",
        thresholds=stored["thresholds"],
        fallback=runtime.manifest.fallback,
    )
    (bundle / THRESHOLDS_FILE).write_text(json.dumps(stored))
    with server_process(bundle, env=shadow_env(tmp_path / "state")) as server:
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            answers = []
            for data in pngs[:20]:
                response = client.post(
                    "/classify", content=data, headers={"Content-Type": "image/png"}
                )
                answers.append(response.json())
            signals = wait_rows(client, 20)
            assert signals["rows"] == 20 and signals["dropped"] == 0
            drift = signals["drift"]
            assert drift["reference"] == "val" and drift["reference_rows"] == 20
            # 20 rows against the linear CDF through their own quantiles: at most a step apart.
            assert 0.0 <= drift["statistic"] <= 0.05 + 1e-9
            # Tuned on these rows, so the disagreement at tuning time is today's: the alert
            # level sits the budget above it and clean traffic stays under.
            tuned_drop = 100.0 - stored["tuned"]["reference"]["agreement"]["percent"]
            assert signals["tuned_drop"] == pytest.approx(tuned_drop, abs=1e-3)
            assert signals["tuned_drop"] == pytest.approx(
                signals["live"]["estimated_drop"], abs=1e-3
            )
            assert signals["alert_level"] == pytest.approx(
                signals["drop_budget"] + tuned_drop, abs=1e-3
            )
            assert signals["over_budget"] == (
                signals["live"]["estimated_drop_lower"] > signals["alert_level"]
            )
            # The public answer names the store file, never the server's directories.
            assert "/" not in signals["store"]["file"] and str(tmp_path) not in json.dumps(signals)
            # The rows themselves are admin-only; the signals are not.
            assert client.get("/v1/shadow", params={"rows": 1}).status_code == 401
            sample = client.get("/v1/shadow", params={"rows": 100}, headers=AUTH).json()["sample"]
            metrics = client.get("/metrics").text
    probs = np.asarray(sample["exit_probs"], dtype=np.float32)
    assert probs.shape == (20, 3, 10)
    np.testing.assert_allclose(probs, expected.exit_probs, atol=1e-5)
    served = [0 if a["exit"] == "fallback" else a["exit"] for a in answers]
    assert sample["served_exits"] == served
    assert metric_value(metrics, "earlyexit_shadow_rows_total") == 20
    assert metric_value(metrics, "earlyexit_shadow_store_rows") == 20
    assert metric_value(metrics, "earlyexit_shadow_alert_level_points") == pytest.approx(
        signals["alert_level"]
    )


def test_store_caps_survive_restart_and_a_corrupt_store_starts_empty(
    tiny_bundle, pngs, tmp_path
) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    env = shadow_env(tmp_path / "state", EARLYEXIT_SHADOW_CAPACITY="12")
    with server_process(bundle, env=env) as server:
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            classify_batch(client, pngs[:30])
            deadline = time.monotonic() + 60
            while client.get("/v1/shadow").json()["sampled"] < 30 and time.monotonic() < deadline:
                time.sleep(0.05)
            signals = client.get("/v1/shadow").json()
            assert signals["sampled"] == 30
            assert signals["rows"] == signals["max_rows"] == 12  # the newest 12 kept
            (store,) = (tmp_path / "state").rglob(signals["store"]["file"])
    with server_process(bundle, env=env) as server:
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            assert client.get("/v1/shadow").json()["rows"] == 12
    # A byte cap below the row cap wins: 3 rows' worth of bytes keeps 3 rows.
    small = ShadowStore(store, 3, 10, capacity=12, max_bytes=3 * (4 * 3 * 10 + 40))
    assert small.count() == 3 and small.max_rows == 3
    small.close()
    for suffix in ("-wal", "-shm"):
        Path(str(store) + suffix).unlink(missing_ok=True)
    store.write_bytes(b"this is not a database" * 100)
    with server_process(bundle, env=env) as server:
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            signals = client.get("/v1/shadow").json()
            assert signals["rows"] == 0
            assert "unreadable" in signals["store"]["recovered"]
            classify_batch(client, pngs[:2])
            assert wait_rows(client, 2)["rows"] == 2
        assert "starting with an empty sample" in server.logs()
    kept = [p for p in store.parent.iterdir() if ".corrupt-" in p.name]
    assert kept and kept[0].read_bytes().startswith(b"this is not a database")


def test_tiny_queue_under_load_drops_shadow_work_and_answers_stay_fast(
    tiny_bundle, pngs, tmp_path
) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    env = shadow_env(tmp_path / "state", EARLYEXIT_SHADOW_QUEUE_SIZE="1")
    with server_process(bundle, env=env) as server:
        latencies: list[float] = []
        lock = threading.Lock()
        stop = time.monotonic() + 3.0

        def worker(offset: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30.0) as client:
                i = offset
                while time.monotonic() < stop:
                    started = time.perf_counter()
                    response = client.post(
                        "/classify",
                        content=pngs[i % len(pngs)],
                        headers={"Content-Type": "image/png"},
                    )
                    assert response.status_code == 200
                    with lock:
                        latencies.append(time.perf_counter() - started)
                    i += 1

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            metrics = client.get("/metrics").text
            signals = client.get("/v1/shadow").json()
    assert metric_value(metrics, "earlyexit_shadow_dropped_total", {"reason": "queue_full"}) > 0
    assert signals["dropped"] > 0
    # Generous for a shared 2-core host: the point is that no answer waits on shadow work.
    assert sorted(latencies)[int(0.99 * (len(latencies) - 1))] < 2.0


def test_retune_auth_bad_input_and_too_small_sample(tiny_bundle, pngs, tmp_path) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    before = (bundle / THRESHOLDS_FILE).read_bytes()
    with server_process(bundle, env=shadow_env(tmp_path / "state")) as server:
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            assert client.post("/v1/thresholds/retune").status_code == 401
            wrong = {"Authorization": "Bearer nope"}
            assert client.post("/v1/thresholds/retune", headers=wrong).status_code == 401
            classify_batch(client, pngs[:10])
            wait_rows(client, 10)
            small = client.post("/v1/thresholds/retune", headers=AUTH, json={})
            assert small.status_code == 409
            assert "needs at least 667" in small.json()["detail"]
            for body in ({"eps": -1}, {"eps": 101}, {"confidence": 11}, {"held_out_fraction": 1}):
                bad = client.post("/v1/thresholds/retune", headers=AUTH, json=body)
                assert bad.status_code == 422, body
                assert bad.json()["detail"].startswith("malformed retune body")
    assert (bundle / THRESHOLDS_FILE).read_bytes() == before


def test_bad_settings_and_modes_without_a_sample(tiny_bundle, tmp_path) -> None:
    import subprocess
    import sys

    from pydantic import ValidationError

    from serving.settings import Settings
    from tests.serving_helpers import REPO, server_env

    for rate in ("-0.1", "1.5", "abc"):
        with pytest.raises(ValidationError):
            Settings(shadow_rate=rate)
    refused = subprocess.run(
        [sys.executable, "-m", "serving.cli", "--bundle", str(tiny_bundle)],
        env=server_env({"EARLYEXIT_SHADOW_RATE": "1.5"}), cwd=REPO, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "EARLYEXIT_SHADOW_RATE" in refused.stderr
    # Sampling off (the default): the endpoint says how to turn it on.
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    with app_client(bundle, state_dir=tmp_path / "state", admin_token=TOKEN) as client:
        response = client.get("/v1/shadow")
        assert response.status_code == 409
        assert "EARLYEXIT_SHADOW_RATE" in response.json()["detail"]
    assert not (tmp_path / "state" / "shadow").exists()
    with app_client(
        bundle, full_model=True, shadow_rate=1.0, state_dir=tmp_path / "state", admin_token=TOKEN
    ) as client:
        assert client.get("/v1/shadow").status_code == 409
        retune = client.post("/v1/thresholds/retune", headers=AUTH)
        assert retune.status_code == 409 and "--full-model" in retune.json()["detail"]


def consistent(answer: dict, thresholds: list[float]) -> bool:
    """Whether a full=true answer's exit is what `thresholds` pick from its exits' confidences."""
    for entry in answer["exits"]:
        if entry["confidence"] > thresholds[entry["exit"] - 1]:
            return answer["exit"] == entry["exit"]
    return answer["exit"] == "fallback"


def test_retune_swaps_atomically_under_traffic_and_persists_provenance(
    tiny_bundle, many_pngs, tmp_path
) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    with server_process(bundle, env=shadow_env(tmp_path / "state")) as server:
        with httpx.Client(base_url=server.url, timeout=120.0) as client:
            for start in range(0, len(many_pngs), 64):
                classify_batch(client, many_pngs[start : start + 64])
            assert wait_rows(client, len(many_pngs))["rows"] == len(many_pngs)
            old = client.get("/v1/model").json()["thresholds"]
            answers: list[dict] = []
            done = threading.Event()

            def traffic() -> None:
                with httpx.Client(base_url=server.url, timeout=60.0) as http:
                    i = 0
                    while not done.is_set():
                        response = http.post(
                            "/classify?full=true",
                            content=many_pngs[i % 64],
                            headers={"Content-Type": "image/png"},
                        )
                        answers.append(response.json())
                        i += 1

            threads = [threading.Thread(target=traffic) for _ in range(4)]
            for thread in threads:
                thread.start()
            try:
                # Any agreement is allowed (EPS 100, Z 0): the guard holds, the swap is visible.
                first = client.post(
                    "/v1/thresholds/retune",
                    headers=AUTH,
                    json={"eps": 100, "confidence": 0, "generations": 5},
                )
                time.sleep(0.3)
            finally:
                done.set()
                for thread in threads:
                    thread.join()
            assert first.status_code == 200, first.text
            result = first.json()
            assert result["swapped"] is True and result["guard"]["guard_holds"] is True
            new = result["after"]["thresholds"]
            assert new != old and result["before"]["thresholds"] == old
            assert client.get("/v1/model").json()["thresholds"] == pytest.approx(new)
            assert answers and all(consistent(a, old) or consistent(a, new) for a in answers)
            # The retune tunes on the window it reads when it starts: the loaded rows plus any
            # traffic already sampled by then (a slow host lets some in first).
            window_rows = result["window"]["rows"]
            assert len(many_pngs) <= window_rows <= len(many_pngs) + len(answers)
            signals = client.get("/v1/shadow").json()
            assert signals["drift"]["reference_rows"] == window_rows
            # The recent window is the tuned one plus a few of the same images: little drift.
            assert 0.0 <= signals["drift"]["statistic"] < 0.2
            metrics = client.get("/metrics").text
    written = json.loads((bundle / THRESHOLDS_FILE).read_text())
    assert written["thresholds"] == pytest.approx(new)
    tuned = written["tuned"]
    assert tuned["method"] == "live-retune" and tuned["data"]["source"] == "live"
    assert tuned["data"]["window"] == result["window"]
    assert tuned["reference"]["source"] == "live"
    assert tuned["reference"]["rows"] == window_rows
    assert tuned["reference"]["agreement"]["thresholds"] == pytest.approx(new)
    assert tuned["data"]["tune_rows"] + tuned["data"]["held_out_rows"] == window_rows
    assert metric_value(metrics, "earlyexit_retunes_total", {"outcome": "swapped"}) == 1


def test_a_failed_guard_or_a_concurrent_retune_changes_nothing(
    tiny_bundle, tmp_path, monkeypatch
) -> None:
    """In process: the guard's outcome is forced, so the branch is tested deterministically."""
    import asyncio

    import thresholds.agreement as agreement
    from serving.service import RetuneBusyError, ServingState
    from serving.settings import Settings

    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    before = (bundle / THRESHOLDS_FILE).read_bytes()
    real = agreement.guarded_retune

    def failing(*args, **kwargs):
        time.sleep(0.5)  # long enough for a second retune to arrive meanwhile
        return agreement.GuardedRetune(**{**real(*args, **kwargs).__dict__, "guard_holds": False})

    monkeypatch.setattr(agreement, "guarded_retune", failing)
    settings = Settings(
        bundle=bundle, state_dir=tmp_path / "state", shadow_rate=1.0, providers=["cpu"],
        warmup=False,
    )  # fmt: skip

    async def scenario() -> None:
        state = ServingState(settings)
        await state.load()
        rng = np.random.default_rng(0)
        probs = rng.dirichlet(np.ones(10), size=(700, 3)).astype(np.float32)
        state.shadow.store.append(np.arange(700.0), np.zeros(700, dtype=np.int64), probs)
        old = state.thresholds
        first = asyncio.create_task(state.retune(eps=1.0, confidence=1.0, generations=3))
        await asyncio.sleep(0.05)
        with pytest.raises(RetuneBusyError):
            await state.retune(eps=1.0, confidence=1.0)
        result = await first
        assert result["swapped"] is False
        assert state.thresholds == old
        await state.shutdown()

    asyncio.run(scenario())
    assert (bundle / THRESHOLDS_FILE).read_bytes() == before
    stores = list((tmp_path / "state" / "shadow").glob("*.sqlite"))
    with sqlite3.connect(stores[0]) as db:
        assert db.execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 700


def test_periodic_retune_swaps_on_its_own(tiny_bundle, many_pngs, tmp_path) -> None:
    from pydantic import ValidationError

    from serving.settings import Settings

    with pytest.raises(ValidationError, match="EARLYEXIT_SHADOW_RATE"):
        Settings(retune_interval=60)  # no sample to tune on
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    # Any agreement is within budget (EPS 100, Z 0): the first retune with enough rows swaps.
    env = shadow_env(
        tmp_path / "state",
        EARLYEXIT_RETUNE_INTERVAL="1",
        EARLYEXIT_SHADOW_DROP_BUDGET="100",
        EARLYEXIT_SHADOW_CONFIDENCE="0",
    )
    with server_process(bundle, env=env) as server:
        with httpx.Client(base_url=server.url, timeout=120.0) as client:
            old = client.get("/v1/model").json()["thresholds"]
            for start in range(0, len(many_pngs), 64):
                classify_batch(client, many_pngs[start : start + 64])
            deadline = time.monotonic() + 90
            while client.get("/v1/model").json()["tuned"].get("method") != "live-retune":
                assert time.monotonic() < deadline, server.logs()[-3000:]
                time.sleep(0.2)
            model = client.get("/v1/model").json()
    assert model["thresholds"] != old
    assert model["tuned"]["source"] == "EARLYEXIT_RETUNE_INTERVAL"
    written = json.loads((bundle / THRESHOLDS_FILE).read_text())
    assert written["thresholds"] == pytest.approx(model["thresholds"])


def test_retune_without_the_tune_extra_is_501_and_changes_nothing(
    tiny_bundle, tmp_path, monkeypatch
) -> None:
    """In process: the server install has no deap; `thresholds.agreement` cannot be imported."""
    import asyncio
    import sys

    from serving.service import ServingState, TuneUnavailableError
    from serving.settings import Settings

    monkeypatch.setitem(sys.modules, "thresholds.agreement", None)  # import raises ImportError
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    before = (bundle / THRESHOLDS_FILE).read_bytes()
    settings = Settings(
        bundle=bundle, state_dir=tmp_path / "state", shadow_rate=1.0, providers=["cpu"],
        warmup=False,
    )  # fmt: skip

    async def scenario() -> None:
        state = ServingState(settings)
        await state.load()
        with pytest.raises(TuneUnavailableError, match=r"earlyexit\[tune\]"):
            await state.retune(eps=1.0, confidence=1.0)
        await state.shutdown()

    asyncio.run(scenario())
    assert (bundle / THRESHOLDS_FILE).read_bytes() == before


def test_drop_alert_measures_the_rise_above_the_tuned_disagreement(
    tiny_bundle, tiny_images, pngs, tmp_path
) -> None:
    """Exit 1 answering every row disagrees with full depth on many of them. Thresholds tuned to
    do so (their record says how much) do not alert on the same traffic; without that record,
    or once the thresholds change, the budget is absolute and the same traffic alerts."""
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    runtime = EarlyExitRuntime(tiny_bundle, providers=["cpu"])
    expected = runtime.classify(runtime.preprocess(tiny_images.images[:24]), full=True)
    stored = json.loads((bundle / THRESHOLDS_FILE).read_text())
    stored["thresholds"] = thresholds = [0.0, 1.0, 1.0]
    stored["tuned"]["reference"] = confidence_reference(
        expected.exit_probs, "val", thresholds=thresholds, fallback=runtime.manifest.fallback
    )
    (bundle / THRESHOLDS_FILE).write_text(json.dumps(stored))
    tuned_drop = 100.0 - stored["tuned"]["reference"]["agreement"]["percent"]
    assert tuned_drop > 10.0  # the tiny model's exit 1 disagrees often: the test has teeth
    with app_client(
        bundle,
        shadow_rate=1.0,
        shadow_drop_budget=0.5,
        shadow_confidence=0.0,
        state_dir=tmp_path / "state",
        admin_token=TOKEN,
        max_batch_wait_ms=2,
    ) as client:
        classify_batch(client, pngs[:24])
        signals = wait_rows(client, 24)
        assert signals["live"]["estimated_drop"] == pytest.approx(tuned_drop, abs=1e-3)
        assert signals["tuned_drop"] == pytest.approx(tuned_drop, abs=1e-3)
        assert signals["alert_level"] == pytest.approx(0.5 + tuned_drop, abs=1e-3)
        assert signals["over_budget"] is False
        # An admin sets other thresholds: the record no longer describes them.
        changed = client.put("/v1/thresholds", json={"thresholds": [0.0, 1.0, 0.999]}, headers=AUTH)
        assert changed.status_code == 200, changed.text
        signals = client.get("/v1/shadow").json()
        assert signals["tuned_drop"] is None and signals["alert_level"] == 0.5
        assert signals["over_budget"] is True
