"""scripts/head_overhead.py: what a row reaching the last exit pays, split by cause."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import head_overhead  # noqa: E402


def test_bundle_mode_reports_the_deep_row_budget(tiny_bundle, tmp_path):
    out = tmp_path / "report"
    argv = ["--bundle", str(tiny_bundle), "--rows", "3", "--repeats", "3", "--out", str(out)]
    assert head_overhead.main(argv) == 0
    report = json.loads((out / "head_overhead.json").read_text())
    assert (out / "deep_row_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["bundle"] == str(tiny_bundle) and report["rows"] == 3
    variants = {"full_model", "chain_with_heads", "chain_stage_files"}
    variants |= {"raw_segments", "raw_stage_files", "session_floor"}
    assert set(report["ms"]) == variants and all(v > 0 for v in report["ms"].values())
    budget = report["deep_row_budget"]
    assert set(budget) == {
        "allowed",
        "total",
        "chaining",
        "session_calls",
        "heads",
        "runtime_overhead",
    }
    assert budget["allowed"] == pytest.approx(0.05 * 1e3 * report["ms"]["full_model"])
    # two session calls (3 exits) of a graph that computes nothing
    assert budget["session_calls"] == pytest.approx(2 * 1e3 * report["ms"]["session_floor"])
    # thresholds that no untrained exit clears: every timed row reached the last exit
    assert report["rows_reaching_last_exit"] == 1.0


def test_raw_chain_gives_the_runtime_answer_for_a_deep_row(tiny_bundle):
    """The bare session chain the budget subtracts computes what the runtime does."""
    import numpy as np

    from serving.runtime import EarlyExitRuntime

    runtime = EarlyExitRuntime(tiny_bundle, intra_op_threads=1)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    deep = runtime.classify(x, thresholds=(1.0, 1.0, 0.0))
    np.testing.assert_array_equal(head_overhead.raw_chain(runtime.sessions())(x), deep.probs)
    stages = [*runtime.sessions(stage_files=True)[:-1], runtime.sessions()[-1]]
    np.testing.assert_array_equal(head_overhead.raw_chain(stages)(x), deep.probs)


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert head_overhead.main(["--bundle", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text("{}")
    assert head_overhead.main(["--bundle", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert head_overhead.main(["--rows", "0", "--out", str(tmp_path / "o")]) == 2
    assert head_overhead.main(["--widths", "a,b", "--out", str(tmp_path / "o")]) == 2
