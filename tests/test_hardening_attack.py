"""scripts/hardening_attack.py runs end to end (tiny numbers) and writes its report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import hardening_attack  # noqa: E402


def test_a_short_attack_writes_every_measurement(tiny_bundle, tmp_path):
    argv = ["--out", str(tmp_path), "--bundle", str(tiny_bundle), "--sockets", "40",
            "--idle-seconds", "1", "--attack-seconds", "1", "--ramp-seconds", "0.5",
            "--flood-per-s", "200", "--settle-seconds", "0.5", "--memory-uploads", "2",
            "--memory-side", "1024", "--server-env", "EARLYEXIT_MAX_CONNECTIONS=16"]  # fmt: skip
    hardening_attack.main(argv)  # exit code depends on this machine's load: not asserted
    report = json.loads((tmp_path / "hardening.json").read_text())
    assert report["idle"]["classify"]["count"] > 0 and report["attack"]["healthz"]["count"] > 0
    assert report["flood"]["healthz"]["count"] > 0
    kinds = {a["attacker"] for a in report["attackers"]}
    assert kinds == {"idle_sockets", "endless_header", "upload image/png", "upload image/jpeg"}
    endless = next(a for a in report["attackers"] if a["attacker"] == "endless_header")
    assert set(endless["answers"]) <= {"431", "closed"} and endless["cut_off"] > 0
    assert report["memory"]["answers"] == {"200": 2}
    assert report["server_alive_throughout"]
    assert isinstance(report["targets"]["healthz_within_50ms"], bool)
