"""scripts/parallel_runs.py: two runs side by side on one thread each, or in turn on N."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import parallel_runs  # noqa: E402

TINY = "arch: resnet18\nwidth: 0.125\nbatch_size: 4\nhead: lite\n"


def test_both_ways_are_timed_in_every_repetition(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text(TINY + "loss: baseline\nexits: 1\n")
    sd = tmp_path / "sd.yaml"
    sd.write_text(TINY + "loss: self_distillation\nexits: 4\n")
    out = tmp_path / "report"
    argv = ["--configs", str(sd), str(plain), "--steps", "2", "--reps", "2", "--threads", "2"]
    assert parallel_runs.main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "parallel_runs.json").read_text())
    assert (out / "parallel_runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["threads_in_turn"] == 2 and len(report["reps"]) == 2
    # the order alternates so that drift of the host's speed hits both ways alike
    assert [r["order"][0] for r in report["reps"]] == ["in_turn", "side_by_side"]
    for rep in report["reps"]:
        side, turn = rep["step_s_side_by_side"], rep["step_s_in_turn"]
        assert len(side) == len(turn) == 2 and all(s > 0 for s in side + turn)
        assert rep["pair_s_side_by_side"] == max(side)
        assert rep["pair_s_in_turn"] == pytest.approx(sum(turn))
        assert rep["in_turn_over_side_by_side"] == pytest.approx(sum(turn) / max(side))
    ratios = sorted(r["in_turn_over_side_by_side"] for r in report["reps"])
    assert report["median_in_turn_over_side_by_side"] == pytest.approx(sum(ratios) / 2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--configs", "a.yaml", "--out", "o", "--steps", "0"], "must be >= 1"),
        (["--out", "o"], "--configs and --out are required"),
        (["--configs", "missing.yaml", "--out", "o"], "recipe not found: missing.yaml"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parallel_runs.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
