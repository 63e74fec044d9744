"""`earlyexit-tune --from-server URL` against a real uvicorn server with shadow sampling on."""

from __future__ import annotations

import json
import time

import httpx

from core.bundle import THRESHOLDS_FILE
from tests.conftest import copy_bundle
from tests.serving_helpers import free_port, png_bytes, server_process
from thresholds.cli import main


def test_tune_from_a_live_server(tiny_bundle, tiny_images, tmp_path, capsys, monkeypatch) -> None:
    served = copy_bundle(tiny_bundle, tmp_path / "served")
    offline = copy_bundle(tiny_bundle, tmp_path / "offline")
    env = {"EARLYEXIT_STATE_DIR": str(tmp_path / "state"), "EARLYEXIT_SHADOW_RATE": "1",
           "EARLYEXIT_ADMIN_TOKEN": "live-token"}  # fmt: skip
    files = [("files", (f"{i}.png", png_bytes(im), "image/png"))
             for i, im in enumerate(tiny_images.images)]  # fmt: skip
    with server_process(served, env=env) as server:
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            assert client.post("/classify/batch", files=files).status_code == 200
            deadline = time.monotonic() + 60
            while client.get("/v1/shadow").json()["rows"] < len(files):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        # The rows are admin-only: without the token the server's 403/401 is one line, exit 2.
        monkeypatch.delenv("EARLYEXIT_ADMIN_TOKEN", raising=False)
        assert main(["--bundle", str(offline), "--from-server", server.url]) == 2
        assert "HTTP 401" in capsys.readouterr().err
        monkeypatch.setenv("EARLYEXIT_ADMIN_TOKEN", "live-token")
        argv = ["--bundle", str(offline), "--from-server", server.url, "--json",
                "--max-drop", "5", "--generations", "3", "--population", "10"]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        result = json.loads(capsys.readouterr().out)
        # Mixing the live sample with a dataset is refused before anything is fetched.
        assert main([*argv, "--dataset", "cifar10"]) == 2
        assert "--from-server replaces" in capsys.readouterr().err
    assert result["baseline_accuracy"] == 100.0  # the final exit agrees with itself
    written = json.loads((offline / THRESHOLDS_FILE).read_text())
    assert written["thresholds"] == result["thresholds"]
    assert written["tuned"]["data"]["dataset"] == "live"
    # The server's own bundle is untouched: tuning offline never writes to it.
    assert (served / THRESHOLDS_FILE).read_bytes() == (tiny_bundle / THRESHOLDS_FILE).read_bytes()


def test_from_server_errors_are_one_line(tiny_bundle, tmp_path, capsys, monkeypatch) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    monkeypatch.setenv("EARLYEXIT_ADMIN_TOKEN", "live-token")
    env = {"EARLYEXIT_STATE_DIR": str(tmp_path / "state"), "EARLYEXIT_ADMIN_TOKEN": "live-token"}
    with server_process(bundle, env=env) as server:  # sampling off
        assert main(["--bundle", str(bundle), "--from-server", server.url]) == 2
        assert "EARLYEXIT_SHADOW_RATE" in capsys.readouterr().err
    unreachable = f"http://127.0.0.1:{free_port()}"
    assert main(["--bundle", str(bundle), "--from-server", unreachable]) == 1
    assert "earlyexit-tune: error:" in capsys.readouterr().err
    assert main(["--bundle", str(bundle), "--from-server", "ftp://x"]) == 2
