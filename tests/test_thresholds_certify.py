"""--certify: candidates from the search rows, a fixed-sequence check on the held-back rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.bundle import read_thresholds
from tests.test_thresholds_cli import EXITS, FAST, tune_inputs
from thresholds.certify import split_rows
from thresholds.cli import main
from thresholds.costs import CostModel
from thresholds.errors import TuningError
from thresholds.evaluate import build_exit_table, evaluate, evaluate_population
from thresholds.objectives import accuracy_bound
from thresholds.search import GAConfig
from thresholds.synthetic import synthetic_calibration
from thresholds.tuning import TuneOptions, tune

COSTS = CostModel(segment_costs=(1.0, 1.0, 1.0, 1.0), full_model=4.0, unit="macs")
GA = GAConfig(population=40, generations=25, seed=3, progress=False)


def _table(rows: int = 3000, seed: int = 0, flip: np.ndarray | None = None):
    probs, labels = synthetic_calibration(rows=rows, seed=seed)
    if flip is not None:  # other labels on these rows only
        labels = labels.copy()
        labels[flip] = (labels[flip] + 1) % probs.shape[2]
    return build_exit_table(probs, labels, "ensemble")


def test_split_rows_is_a_seeded_partition():
    search, check = split_rows(1000, 0.3, seed=7)
    assert len(check) == 300 and len(search) == 700
    assert np.array_equal(np.sort(np.concatenate([search, check])), np.arange(1000))
    again = split_rows(1000, 0.3, seed=7)
    assert np.array_equal(again[1], check)
    assert not np.array_equal(split_rows(1000, 0.3, seed=8)[1], check)
    with pytest.raises(TuningError, match="each part needs at least 100"):
        split_rows(150, 0.5, seed=0)


def test_the_written_vector_is_the_fastest_to_pass_in_sequence_on_the_held_back_rows():
    table = _table()
    options = TuneOptions(max_drop=0.5, confidence=1.0, certify=0.5, ga=GA, compare=False)
    outcome = tune(table, COSTS, options)
    cert = outcome.certification
    assert outcome.method == "nsga2_certified" and cert is not None and outcome.pareto is not None
    search_rows, check_rows = split_rows(table.num_rows, 0.5, GA.seed)
    search, check = table.take(search_rows), table.take(check_rows)
    assert (cert.search_rows, cert.check_rows) == (1500, 1500)

    def lower_bounds(part, vectors):
        scored = evaluate_population(part, vectors, COSTS)
        bound = accuracy_bound(
            scored.accuracy, part.baseline_accuracy, part.num_rows, 1.0, scored.discordant_counts
        )
        return bound.lower_bound, scored.acceleration

    # By hand: the search part's front plus "final exit only" and "every exit off", ordered
    # by their lower bound on the search rows (ties: faster first), tested on the check rows
    # until the first failure; the fastest that passed is written.
    anchors = [(1.0,) * 4, (1.0, 1.0, 1.0, 0.0)]
    front = [m.thresholds for m in outcome.pareto.front if m.thresholds not in anchors]
    assert cert.candidates == len(front) + 2

    vectors = np.array(anchors + front)
    lower, speed = lower_bounds(search, vectors)
    same = evaluate_population(search, vectors, COSTS).discordant_counts == 0
    ordered = vectors[np.lexsort((-speed, -lower, ~same))]
    # Against the final exit, "final exit only" is the baseline itself: bound exactly 0.
    assert tuple(ordered[0]) == (1.0, 1.0, 1.0, 0.0)
    check_lower, check_speed = lower_bounds(check, ordered)
    passes = check_lower >= -0.5 - 1e-9
    first_failure = int(np.argmin(passes)) if not passes.all() else len(passes)
    assert cert.passed == first_failure >= 1
    best = int(np.argmax(check_speed[:first_failure]))
    assert outcome.thresholds == tuple(ordered[best])
    # What it reports about the check rows is what those rows say.
    on_check = evaluate(check, np.asarray(outcome.thresholds), COSTS)
    assert cert.check.accuracy == pytest.approx(on_check.accuracy)
    assert cert.check.acceleration == pytest.approx(on_check.acceleration)
    assert (
        cert.bound.lower_bound == pytest.approx(check_lower[best])
        and cert.bound.lower_bound >= -0.5
    )
    assert cert.check_baseline == pytest.approx(check.baseline_accuracy)


def test_the_candidates_never_see_the_held_back_rows():
    """Other labels on the check rows change the check, never the search part's front."""
    table = _table()
    _, check_rows = split_rows(table.num_rows, 0.5, GA.seed)
    other = _table(flip=check_rows[: len(check_rows) // 3])
    options = TuneOptions(max_drop=0.5, confidence=1.0, certify=0.5, ga=GA, compare=False)
    a, b = tune(table, COSTS, options), tune(other, COSTS, options)
    assert a.pareto is not None and b.pareto is not None
    assert [m.thresholds for m in a.pareto.front] == [m.thresholds for m in b.pareto.front]
    assert a.certification is not None and b.certification is not None
    assert a.certification.check.accuracy != b.certification.check.accuracy


def test_nothing_passing_is_an_infeasible_floor():
    """Exits far below the baseline given as a number: not even the safest vector passes."""
    table = _table()
    options = TuneOptions(
        max_drop=0.0, confidence=1.645, certify=0.5, baseline=99.9, ga=GA, compare=False
    )
    with pytest.raises(TuningError, match="no candidate passes"):
        tune(table, COSTS, options)


def test_cli_writes_the_certification(tmp_path, capsys):
    bundle, val, test = tune_inputs(tmp_path)
    argv = ["--bundle", str(bundle), "--calibration", str(val), "--test-calibration", str(test)]
    argv += FAST + ["--max-drop", "0.5", "--confidence", "1", "--certify", "0.5"]
    assert main(argv + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    cert = result["certification"]
    assert result["method"] == "nsga2_certified"
    assert cert["check_rows"] + cert["search_rows"] == result["rows"]
    assert cert["check"]["lower_bound"] >= -0.5 - 1e-9 and 1 <= cert["passed"] <= cert["candidates"]
    tuned = read_thresholds(bundle, EXITS).tuned
    assert tuned["certification"] == cert and tuned["method"] == "nsga2_certified"
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"certified on {cert['check_rows']} held-back rows" in text, text
