"""Tuning against the plain model: the manifest's baseline block per split, a given accuracy,
a plain-model bundle; and the consistency ceiling (first exit agreeing with the final one)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.data_fixtures import write_tiny_cifar10
from tests.test_thresholds_cli import FAST, tune_inputs
from thresholds.ceiling import consistency_ceiling
from thresholds.cli import main
from thresholds.costs import CostModel
from thresholds.evaluate import build_exit_table, evaluate_population
from thresholds.synthetic import synthetic_calibration

# Three rows, two exits: exit 1 agrees with exit 2 on rows 0 and 2.
PROBS = np.array(
    [
        [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]],
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]],
        [[0.1, 0.2, 0.7], [0.2, 0.2, 0.6]],
    ],
    dtype=np.float32,
)
LABELS = np.array([0, 1, 1])


def test_consistency_ceiling_by_hand():
    table = build_exit_table(PROBS, LABELS, "ensemble")
    # All exits on: rows 0 and 2 stop at exit 1 (cost 2), row 1 runs to exit 2 (cost 5).
    got = consistency_ceiling(table, CostModel((2.0, 3.0), 4.0, "macs"))
    assert got.acceleration == pytest.approx(4 / 3) and got.enabled_exits == (1, 2)
    assert got.accuracy == pytest.approx(200 / 3)  # the final exit's: rows 0 and 1 right
    # Exit 1's head is dear (stage alone 1.0 vs segment 5.0): switching it off costs 3 a row.
    dear = CostModel((5.0, 2.0), 6.0, "macs", stage_costs=(1.0, 2.0))
    got = consistency_ceiling(table, dear)
    assert got.acceleration == pytest.approx(2.0) and got.enabled_exits == (2,)


def test_no_answer_preserving_threshold_vector_beats_the_consistency_ceiling():
    probs, labels = synthetic_calibration(rows=1500, exits=3, classes=10, seed=2)
    table = build_exit_table(probs, labels, "last")
    costs = CostModel((5.0, 2.0, 2.0), 6.0, "macs", stage_costs=(1.0, 1.5, 2.0))
    ceiling = consistency_ceiling(table, costs)
    preds = probs.argmax(axis=2)
    rng = np.random.default_rng(1)
    population = rng.uniform(0.3, 1.0, size=(400, 3))
    population[:, 2] = 0.0
    population[rng.uniform(size=population.shape) < 0.3] = 1.0
    population[:, 2] = 0.0
    scored = evaluate_population(table, population, costs)
    checked = 0
    for vector, acceleration in zip(population, scored.acceleration, strict=True):
        exit_of_row = np.argmax(probs.max(axis=2) > vector[None, :], axis=1)
        answers = preds[np.arange(len(preds)), exit_of_row]
        if np.array_equal(answers, preds[:, -1]):  # changes no answer of the final exit
            checked += 1
            assert acceleration <= ceiling.acceleration + 1e-9
    assert checked > 0


def _with_baseline_block(bundle, block):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["baseline"] = block
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _tune(capsys, argv):
    code = main(argv + ["--json", "-q"])
    out, err = capsys.readouterr()
    return code, out, err


def test_max_drop_is_measured_against_the_manifest_baseline_per_split(tmp_path, capsys):
    bundle, val, test = tune_inputs(tmp_path)
    _with_baseline_block(bundle, {"recipe": "plain_fast", "accuracy": {"val": 40.0, "test": 41.5}})
    argv = ["--bundle", str(bundle), "--calibration", str(val), "--test-calibration", str(test)]
    code, out, err = _tune(capsys, argv + FAST + ["--max-drop", "0.5"])
    assert code == 0, err
    result = json.loads(out)
    assert result["baseline"]["source"] == "manifest"
    assert result["baseline"]["recipe"] == "plain_fast"
    # Calibration files hold no images to run a plain graph on: the recorded numbers, unpaired.
    assert result["baseline"]["paired"] is False and result["margin"]["paired_with"] is None
    assert result["mcnemar"] is None and result["test"]["mcnemar"] is None
    assert result["baseline_accuracy"] == 40.0 and result["test"]["baseline_accuracy"] == 41.5
    assert result["accuracy"] >= 40.0 - 0.5
    assert result["consistency_ceiling"]["acceleration"] > 1.0
    stored = json.loads((bundle / "thresholds.json").read_text())["tuned"]
    assert stored["baseline"]["source"] == "manifest"
    # An explicit number wins; --against-final-exit restores the bundle's own final exit.
    code, out, err = _tune(capsys, argv + FAST + ["--max-drop", "0.5", "--baseline-accuracy", "30"])
    assert code == 0, err
    assert json.loads(out)["baseline_accuracy"] == 30.0
    code, out, err = _tune(capsys, argv + FAST + ["--max-drop", "0.5", "--against-final-exit"])
    assert code == 0, err
    result = json.loads(out)
    assert result["baseline"]["source"] == "final_exit"
    assert result["baseline_accuracy"] == pytest.approx(result["exit_accuracies"][3])


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--baseline-accuracy", "150"], "baseline accuracy must be in [0, 100]"),
        (["--baseline-accuracy", "-1"], "baseline accuracy must be in [0, 100]"),
        (["--baseline-accuracy", "80", "--against-final-exit"], "give one of"),
        (["--baseline-bundle", "somewhere"], "needs --dataset/--data-dir"),
    ],
)
def test_bad_baseline_input_is_one_line_exit_2(tmp_path, capsys, extra, needle):
    bundle, val, test = tune_inputs(tmp_path)
    before = (bundle / "manifest.json").read_bytes()
    code, _, err = _tune(capsys, ["--bundle", str(bundle), "--calibration", str(val), *extra])
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (bundle / "thresholds.json").exists()
    assert (bundle / "manifest.json").read_bytes() == before


def test_baseline_bundle_is_run_on_the_same_splits(bundle_copy, tmp_path, capsys):
    data_dir = tmp_path / "data"
    write_tiny_cifar10(data_dir, per_batch=60)
    plain = tmp_path / "plain"
    shutil.copytree(bundle_copy, plain)
    base = ["--bundle", str(bundle_copy), "--dataset", "cifar10", "--data-dir", str(data_dir),
            "--split", "test", "--max-drop", "0", "--threads", "1"] + FAST  # fmt: skip
    code, out, err = _tune(capsys, base + ["--baseline-bundle", str(plain)])
    assert code == 0, err
    result = json.loads(out)
    # The "plain model" here is the bundle itself: its final exit on the same rows.
    assert result["baseline"]["source"] == "bundle"
    assert result["baseline_accuracy"] == pytest.approx(result["exit_accuracies"][-2])
    # Its final exit ran on the same rows, so the bound is paired with its answers.
    assert result["baseline"]["paired"] is True
    assert result["margin"]["paired_with"] == "reference"
    other = tmp_path / "other"
    shutil.copytree(bundle_copy, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["labels"] = [f"x{i}" for i in range(len(manifest["labels"]))]
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = _tune(capsys, base + ["--baseline-bundle", str(other)])
    assert code == 2 and "labels differ" in err
