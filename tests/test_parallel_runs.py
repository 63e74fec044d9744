"""scripts/parallel_runs.py: two runs side by side on one thread each, or in turn on N."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import parallel_runs  # noqa: E402

TINY = "arch: resnet18\nwidth: 0.125\nbatch_size: 4\nhead: lite\n"


def test_both_ways_are_timed_by_real_training_processes(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text(TINY + "loss: baseline\nexits: 1\n")
    sd = tmp_path / "sd.yaml"
    sd.write_text(TINY + "loss: self_distillation\nexits: 4\n")
    out = tmp_path / "report"
    argv = ["--configs", str(sd), str(plain), "--steps", "2", "--reps", "1", "--threads", "2"]
    assert parallel_runs.main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "parallel_runs.json").read_text())
    assert (out / "parallel_runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["threads_in_turn"] == 2 and len(report["reps"]) == 1
    rep = report["reps"][0]
    side, turn = rep["step_s_side_by_side"], rep["step_s_in_turn"]
    assert len(side) == len(turn) == 2 and all(s > 0 for s in side + turn)
    assert rep["pair_s_side_by_side"] == max(side)
    assert rep["pair_s_in_turn"] == pytest.approx(sum(turn))
    assert rep["in_turn_over_side_by_side"] == pytest.approx(sum(turn) / max(side))


def test_the_order_alternates_and_the_median_is_over_repetitions(tmp_path, monkeypatch):
    # Which way runs first alternates so that drift of the host's speed hits both alike; the
    # timings here are stand-ins (the process test above times real runs).
    calls = []
    side = iter([[1.0, 2.0], [1.5, 2.5], [1.0, 3.0]])
    turn = iter([[1.0, 1.5], [1.0, 2.0], [2.0, 2.0]])

    def fake(way: str, timings):
        def measure(*_args):
            calls.append(way)
            return next(timings)

        return measure

    monkeypatch.setattr(parallel_runs, "side_by_side", fake("s", side))
    monkeypatch.setattr(parallel_runs, "in_turn", fake("t", turn))
    config = tmp_path / "a.yaml"
    config.write_text(TINY)
    argv = ["--configs", str(config), "--reps", "3", "--out", str(tmp_path / "o")]
    assert parallel_runs.main(argv) == 0
    report = json.loads((tmp_path / "o" / "parallel_runs.json").read_text())
    assert calls == ["t", "s", "s", "t", "t", "s"]
    assert [r["order"][0] for r in report["reps"]] == ["in_turn", "side_by_side", "in_turn"]
    assert [r["in_turn_over_side_by_side"] for r in report["reps"]] == [1.25, 1.2, 4 / 3]
    assert report["median_in_turn_over_side_by_side"] == pytest.approx(1.25)


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
