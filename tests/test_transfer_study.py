"""scripts/transfer_study.py: the resampling study of tuning-split → held-out accuracy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from core.calibration import save_calibration
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


def _plain_files(tmp_path, bundle, val, test):
    """The plain model on val's and test's rows: the final exit's probabilities with a little
    noise (so it disagrees on some rows), tagged as collected from the bundle's plain graph."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    sha = manifest["full_model"]["sha256"]
    rng = np.random.default_rng(7)
    files = []
    for source, name in ((val, "plain_val.npz"), (test, "plain_test.npz")):
        with np.load(source) as z:
            probs, labels = z["exit_probs"][:, -1:], z["labels"]
        probs = probs + rng.uniform(0.0, 0.3, probs.shape).astype(probs.dtype)
        probs /= probs.sum(axis=2, keepdims=True)
        files.append(save_calibration(tmp_path / name, probs, labels, {"plain_graph_sha256": sha}))
    return files


def test_against_the_plain_model_pairs_every_partition(tmp_path):
    bundle, val, test = tune_inputs(tmp_path)
    plain_val, plain_test = _plain_files(tmp_path, bundle, val, test)
    out = tmp_path / "study"
    argv = ["--bundle", str(bundle), "--calibration", str(val), "--test-calibration", str(test)]
    argv += ["--plain-calibration", str(plain_val), "--plain-test-calibration", str(plain_test)]
    argv += ["--tune-rows", "2000", "--confidence", "0,1", "--splits", "3", "--max-drop", "1"]
    assert transfer_study.main(argv + ["--out", str(out)]) == 0
    report = json.loads((out / "transfer_study.json").read_text())
    assert report["against"] == "plain model"
    assert (out / "transfer_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r in report["results"]:
        feasible = r["feasible_partitions"]
        assert feasible == round(3 * (1 - r["infeasible"]))
        assert len(r["partitions"]) == feasible
        drops = [d for d, _ in r["partitions"]]
        assert r["drop_within_max_drop"] == pytest.approx(np.mean(np.asarray(drops) <= 1 + 1e-9))
        assert r["held_out_drop"]["mean"] == pytest.approx(np.mean(drops), abs=1e-3)
        assert 0.0 <= r["pool_drop_within_max_drop"] <= 1.0
        # the pool holds the held-out rows (4 000 of its 6 000 here): its drop lies near theirs
        assert abs(r["pool_drop"]["mean"] - r["held_out_drop"]["mean"]) < 1.0


def test_plain_files_must_come_in_pairs_and_match_the_rows(tmp_path, capsys):
    bundle, val, test = tune_inputs(tmp_path)
    plain_val, plain_test = _plain_files(tmp_path, bundle, val, test)
    base = ["--bundle", str(bundle), "--calibration", str(val), "--test-calibration", str(test)]
    base += ["--out", str(tmp_path / "o")]
    assert transfer_study.main(base + ["--plain-calibration", str(plain_val)]) == 2
    assert "go together" in capsys.readouterr().err
    swapped = ["--plain-calibration", str(plain_test), "--plain-test-calibration", str(plain_val)]
    assert transfer_study.main(base + swapped) == 2
    assert "same rows" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_plain_fallback_bundle_is_studied_with_its_plain_model(tmp_path, capsys):
    """Fallback "plain": the plain files also answer the rows no exit takes, so every partition
    can reach the plain model's accuracy (every exit off); without them the study refuses."""
    bundle, val, test = tune_inputs(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["fallback"] = "plain"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    plain_val, plain_test = _plain_files(tmp_path, bundle, val, test)
    argv = ["--bundle", str(bundle), "--calibration", str(val), "--test-calibration", str(test)]
    argv += ["--tune-rows", "2000", "--confidence", "1", "--splits", "3", "--max-drop", "0"]
    out = tmp_path / "study"
    assert transfer_study.main(argv + ["--out", str(out)]) == 2
    assert "plain model's answers" in capsys.readouterr().err
    argv += ["--plain-calibration", str(plain_val), "--plain-test-calibration", str(plain_test)]
    assert transfer_study.main(argv + ["--out", str(out)]) == 0
    report = json.loads((out / "transfer_study.json").read_text())
    assert report["results"][0]["infeasible"] == 0.0  # every exit disabled is the plain model
    assert report["sources"] == ["val.npz", "test.npz"]  # names, not machine paths
