"""scripts/transfer_study.py: the resampling study of tuning-split → held-out accuracy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.test_thresholds_cli import tune_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import transfer_study  # noqa: E402


def test_study_reports_every_cell_over_the_same_partitions(tmp_path):
    bundle, val, test = tune_inputs(tmp_path)
    out = tmp_path / "study"
    argv = ["--bundle", str(bundle), "--calibration", str(val), "--test-calibration", str(test)]
    argv += ["--tune-rows", "1000,2000", "--confidence", "0,1", "--splits", "3", "--out", str(out)]
    assert transfer_study.main(argv) == 0
    report = json.loads((out / "transfer_study.json").read_text())
    assert (out / "transfer_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pooled = report["pooled_rows"]
    cells = {(r["tune_rows"], r["confidence"]): r for r in report["results"]}
    assert set(cells) == {(1000, 0.0), (1000, 1.0), (2000, 0.0), (2000, 1.0)}
    for (rows, _), r in cells.items():
        assert r["held_out_rows"] == pooled - rows
        assert 0.0 <= r["within_0_5"] <= 1.0 and 0.0 <= r["drop_within_0_5"] <= 1.0
        assert r["difference"]["p05"] <= r["difference"]["mean"] <= r["difference"]["p95"]
        assert r["binomial_se"] > 0
    # the final exit ignores thresholds: the same partitions give it the same difference
    for rows in (1000, 2000):
        assert (
            cells[(rows, 0.0)]["final_exit_difference"]
            == cells[(rows, 1.0)]["final_exit_difference"]
        )
    # a margin never raises the tuned acceleration on the same rows
    for rows in (1000, 2000):
        assert (
            cells[(rows, 1.0)]["acceleration"]["mean"]
            <= cells[(rows, 0.0)]["acceleration"]["mean"] + 1e-9
        )


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--tune-rows", "999999"], "below the"), (["--splits", "1"], "--splits >= 2")],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    bundle, val, test = tune_inputs(tmp_path)
    argv = ["--bundle", str(bundle), "--calibration", str(val), "--test-calibration", str(test)]
    assert transfer_study.main(argv + extra + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
