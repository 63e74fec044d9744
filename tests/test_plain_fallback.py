"""Fallback "plain": a row no exit accepts is answered by the plain model (a cascade into the
model a user would otherwise deploy), and the chain stops after the last enabled exit. The same
rule in `decide`, the thresholds evaluator (accuracy and costs, GA and grid), the runtime's
batch, single-row and device-chain paths, and `earlyexit-tune`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from core.calibration import CalibrationError
from core.costs import plain_fallback_cost, plain_fallback_costs, row_macs
from core.decision import chain_segments, decide, skipped_heads
from serving.plain_runtime import PlainModelRuntime
from serving.runtime import EarlyExitRuntime
from tests.conftest import normalise
from tests.data_fixtures import write_tiny_cifar10
from tests.plain_fixtures import with_baseline
from tests.test_thresholds_cli import FAST
from thresholds import pipeline
from thresholds.baselines import grid_tables
from thresholds.cli import main
from thresholds.costs import CostModel
from thresholds.errors import TuningError
from thresholds.evaluate import build_exit_table, evaluate, evaluate_population
from thresholds.synthetic import synthetic_calibration

# Three rows, two exits, three classes; dyadic values so float32 probabilities compare exactly.
PROBS = np.array(
    [
        [[0.75, 0.125, 0.125], [0.25, 0.625, 0.125]],  # exit 1 confident
        [[0.5, 0.375, 0.125], [0.125, 0.75, 0.125]],  # exit 2 confident
        [[0.5, 0.25, 0.25], [0.25, 0.28125, 0.46875]],  # neither: falls back
    ],
    dtype=np.float32,
)
PLAIN = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=np.float32)
LABELS = np.array([0, 1, 2])


def test_decide_answers_fallback_rows_with_the_plain_model():
    answers, exits = decide(PROBS, (0.6, 0.7), "plain", PLAIN)
    assert exits.tolist() == [1, 2, 0]
    np.testing.assert_array_equal(answers, [PROBS[0, 0], PROBS[1, 1], PLAIN[2]])
    # Every exit disabled: the bundle is exactly the plain model.
    answers, exits = decide(PROBS, (1.0, 1.0), "plain", PLAIN)
    assert exits.tolist() == [0, 0, 0]
    np.testing.assert_array_equal(answers, PLAIN)


def test_plain_probabilities_are_needed_only_when_a_row_falls_back():
    _, exits = decide(PROBS, (0.6, 0.0), "plain")  # exit 2 takes every row it sees
    assert exits.tolist() == [1, 2, 2]
    with pytest.raises(CalibrationError, match="plain model's probabilities were not given"):
        decide(PROBS, (0.6, 0.7), "plain")
    with pytest.raises(CalibrationError, match="plain_probs must be 3×3"):
        decide(PROBS, (0.6, 0.7), "plain", PLAIN[:2])


def test_the_chain_stops_after_the_last_enabled_exit():
    assert chain_segments([0.5, 0.9, 0.2], "plain") == 3
    assert chain_segments([0.5, 1.0, 1.0], "plain") == 1
    assert chain_segments([1.0, 0.3, 1.0], "plain") == 2
    assert chain_segments([1.0, 1.0, 1.0], "plain") == 0
    assert chain_segments([1.0, 1.0, 1.0], "last") == 3
    rows = chain_segments(np.array([[1.0, 1.0], [0.1, 1.0], [1.0, 0.1]]), "plain")
    assert rows.tolist() == [0, 1, 2]
    # Disabled heads are never needed: their segments run as stage files.
    assert skipped_heads([1.0, 0.5, 1.0], "plain", 10).tolist() == [True, False, True]


def test_hand_computed_accuracy_and_cost():
    table = build_exit_table(PROBS, LABELS, "plain", plain_correct=np.array([False, False, True]))
    costs = CostModel((2.0, 3.0), 4.0, "macs", plain=6.0)
    m = evaluate(table, (0.6, 0.7), costs)
    # rows: exit 1 (right), exit 2 (right), plain (right); costs 2, 5 and 2 + 3 + 6
    assert m.accuracy == 100.0 and m.exit_fractions == (1 / 3, 1 / 3, 1 / 3)
    assert m.mean_cost == pytest.approx((2 + 5 + 11) / 3)
    # Exit 2 disabled: a fallback row stops after segment 1, then runs the plain graph.
    m = evaluate(table, (0.6, 1.0), costs)
    assert m.exit_fractions == (1 / 3, 0.0, 2 / 3)
    assert m.mean_cost == pytest.approx((2 + 8 + 8) / 3)
    assert m.accuracy == pytest.approx(200 / 3)  # row 1 gets the plain model's wrong answer
    # Every exit disabled: the plain model alone, acceleration full ÷ plain.
    m = evaluate(table, (1.0, 1.0), costs)
    assert m.mean_cost == pytest.approx(6.0) and m.acceleration == pytest.approx(4 / 6)
    assert m.accuracy == pytest.approx(100 / 3)
    # core.costs says the same for one row.
    assert plain_fallback_cost((2.0, 3.0), 1, 6.0) == 8.0
    # Vectorised over threshold vectors (one cost vector each, stage files differ): 0, 1, 2
    # segments before the plain graph.
    per_vector = np.array([[2.0, 3.0], [1.5, 3.0], [2.0, 2.5]])
    assert plain_fallback_costs(per_vector, [0, 1, 2], 6.0).tolist() == [6.0, 7.5, 10.5]
    assert row_macs([1, 0], (2.0, 3.0), 8.0).tolist() == [2.0, 8.0]


def test_the_table_needs_the_plain_models_answers():
    with pytest.raises(TuningError, match="fallback 'plain' needs the plain model's answers"):
        build_exit_table(PROBS, LABELS, "plain")
    with pytest.raises(TuningError, match="plain-model correctness must be 3 booleans"):
        build_exit_table(PROBS, LABELS, "plain", plain_correct=np.ones(2, dtype=bool))


def _plain_truth(probs: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic plain-model probabilities: one-hot on the label for 80 % of rows."""
    rng = np.random.default_rng(seed)
    guess = np.where(rng.uniform(size=labels.size) < 0.8, labels, rng.integers(0, 5, labels.size))
    plain = np.eye(probs.shape[2], dtype=np.float32)[guess]
    return plain, guess == labels


@pytest.mark.parametrize("stages", [None, (0.75, 1.0, 2.5)])
def test_population_and_grid_match_the_reference_rule_and_row_costs(stages):
    probs, labels = synthetic_calibration(rows=1500, exits=3, classes=5, seed=5)
    plain, right = _plain_truth(probs, labels, 0)
    table = build_exit_table(probs, labels, "plain", plain_correct=right)
    costs = CostModel((1.0, 1.5, 2.5), 4.0, "macs", stage_costs=stages, plain=3.5)
    rng = np.random.default_rng(1)
    thresholds = rng.random((30, 3))
    thresholds[:6, 1:] = 1.0  # trailing exits disabled: the chain stops early
    thresholds[6:9] = 1.0  # every exit disabled
    scored = evaluate_population(table, thresholds, costs)
    for p in range(len(thresholds)):
        th = list(thresholds[p])
        answers, exits = decide(probs, th, "plain", plain)
        assert scored.correct_counts[p] == int((answers.argmax(axis=1) == labels).sum())
        skip = skipped_heads(th, "plain", 5)
        seg = [s if not (skip[j] and stages) else stages[j] for j, s in enumerate((1.0, 1.5, 2.5))]
        rest = plain_fallback_cost(seg, int(chain_segments(th, "plain")), 3.5)
        assert scored.mean_cost[p] == pytest.approx(row_macs(exits, seg, rest).mean())
    grid, correct, total_cost = grid_tables(table, costs, 7)
    index = rng.integers(0, 7, size=(60, 3))
    index[:10, 1:] = 6
    index[10:14] = 6
    on_grid = evaluate_population(table, grid[index], costs)
    assert np.array_equal(on_grid.correct_counts, correct[tuple(index.T)])
    assert np.allclose(on_grid.mean_cost * table.num_rows, total_cost[tuple(index.T)])


# ------------------------------------------------------------------------------- runtime


@pytest.fixture
def plain_bundle(tiny_bundle, plain_graph, tmp_path) -> Path:
    bundle = with_baseline(tiny_bundle, plain_graph, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["fallback"] = "plain"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


@pytest.mark.parametrize("device_chain", [False, True])
def test_runtime_answers_as_decide_with_the_plain_graph(plain_bundle, tiny_images, device_chain):
    batch = normalise(tiny_images.images)
    runtime = EarlyExitRuntime(plain_bundle, intra_op_threads=1, device_chain=device_chain)
    plain = PlainModelRuntime(plain_bundle, intra_op_threads=1).run(batch)
    t = runtime.thresholds
    seen = set()
    for thresholds in (t, (t[0], 1.0, 1.0), (1.0, t[1], 1.0), (1.0, 1.0, 1.0), (t[0], t[1], 0.0)):
        full = runtime.classify(batch, full=True, thresholds=thresholds)
        answers, exits = decide(full.exit_probs, thresholds, "plain", plain)
        rows = runtime.classify(batch, thresholds=thresholds)
        assert rows.exits.tolist() == exits.tolist()
        np.testing.assert_allclose(rows.probs, answers, rtol=0, atol=1e-6)
        ran = int(chain_segments(thresholds, "plain"))
        assert rows.rows_per_segment[ran:] == [0] * (3 - ran)  # nothing after the last exit
        assert (rows.plain_seconds > 0) == bool((exits == 0).any())
        seen.update(exits.tolist())
        if device_chain:
            continue
        for i in range(0, len(batch), 7):  # the batch-1 path
            single = runtime.classify(batch[i : i + 1], thresholds=thresholds)
            assert int(single.exits[0]) == int(exits[i])
            np.testing.assert_allclose(single.probs[0], answers[i], rtol=0, atol=1e-6)
    assert seen == {0, 1, 2, 3}
    # Every exit disabled: exactly the plain model, no segment run.
    alone = runtime.classify(batch, thresholds=(1.0, 1.0, 1.0))
    np.testing.assert_array_equal(alone.probs, plain)
    assert alone.rows_per_segment == [0, 0, 0]


def test_the_shadow_sample_keeps_the_plain_models_answers(plain_bundle, tiny_images, tmp_path):
    """Full depth of a plain-fallback bundle is the plain model: every sampled row keeps its
    answer (store, /v1/shadow export) and agreement is measured against it."""
    from tests.serving_helpers import app_client, png_bytes
    from tests.test_serving_shadow import AUTH, TOKEN, classify_batch
    from thresholds.agreement import agreement_table

    images = tiny_images.images[:24]
    with app_client(
        plain_bundle, shadow_rate=1.0, state_dir=tmp_path / "state", admin_token=TOKEN
    ) as client:
        classify_batch(client, [png_bytes(image) for image in images])
        deadline = time.monotonic() + 60
        while client.get("/v1/shadow").json()["sampled"] < len(images):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        signals = client.get("/v1/shadow", params={"rows": 100}, headers=AUTH).json()
        thresholds = client.get("/v1/model").json()["thresholds"]
    sample = signals["sample"]
    exit_probs = np.asarray(sample["exit_probs"], dtype=np.float32)
    plain = np.asarray(sample["plain_probs"], dtype=np.float32)
    assert exit_probs.shape == (len(images), 3, 10) and plain.shape == (len(images), 10)
    expected = PlainModelRuntime(plain_bundle, intra_op_threads=1).run(normalise(images))
    np.testing.assert_allclose(plain, expected, rtol=0, atol=1e-5)
    # Agreement with full depth = with the plain model, as the tuner's agreement table counts it.
    table = agreement_table(exit_probs, "plain", plain)
    costs = CostModel((1.0, 1.0, 1.0), 3.0, "macs")
    agree = evaluate(table, thresholds, costs).accuracy
    assert signals["live"]["agreement"] == pytest.approx(agree)
    assert evaluate(table, (1.0, 1.0, 1.0), costs).accuracy == 100.0  # the plain model itself


def test_a_guarded_retune_pairs_the_sample_with_the_plain_model():
    from thresholds.agreement import guarded_retune

    probs, labels = synthetic_calibration(rows=900, exits=3, classes=5, seed=7)
    plain, _ = _plain_truth(probs, labels, 3)
    costs = CostModel((1.0, 1.0, 1.0), 3.0, "macs")
    with pytest.raises(TuningError, match="needs the plain model's N×C answers"):
        guarded_retune(probs, "plain", costs, eps=1.0, confidence=1.0)
    outcome = guarded_retune(probs, "plain", costs, eps=1.0, confidence=1.0, plain_probs=plain)
    assert outcome.tune_agreement >= 99.0 and outcome.tune_rows + outcome.held_out_rows == 900


def test_tune_pairs_the_fallback_with_the_plain_graph_and_refuses_saved_calibration(
    plain_bundle, tmp_path, capsys, monkeypatch
):
    data_dir = tmp_path / "data"
    write_tiny_cifar10(data_dir, per_batch=1010)
    argv = ["--bundle", str(plain_bundle), "--dataset", "cifar10", "--data-dir", str(data_dir),
            "--limit", "2000", "--max-drop", "0", "--confidence", "0", "--threads", "1",
            "--json", "-q"] + FAST  # fmt: skip
    # The plain graph serves as the baseline and as the fallback: read once per split.
    plain_reads: list[str] = []
    collect = pipeline.load_or_collect

    def counting(*args, **kwargs):
        if kwargs.get("plain"):
            plain_reads.append(args[4])
        return collect(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load_or_collect", counting)
    assert main(argv) == 0
    assert sorted(plain_reads) == ["test", "val"]
    result = json.loads(capsys.readouterr().out)
    # Every exit disabled is exactly the plain model, so "no loss" is always feasible.
    assert result["accuracy"] >= result["baseline_accuracy"]
    assert result["baseline"]["source"] == "manifest"
    # What was written is what the runtime serves: the accuracy the tuner reported on val.
    runtime = EarlyExitRuntime(plain_bundle, intra_op_threads=1)
    assert list(runtime.thresholds) == pytest.approx(result["thresholds"])
    # A saved calibration holds no images: the plain model cannot run on its rows.
    cached = sorted((plain_bundle / "calibration_cache").glob("calibration-cifar10-val-*.npz"))
    assert len(cached) == 1
    assert main(["--bundle", str(plain_bundle), "--calibration", str(cached[0]), "-q"]) == 2
    assert "falls back to its plain model" in capsys.readouterr().err


def test_the_plain_graphs_time_is_a_segment_metric():
    """Fallback "plain": the plain graph's run is observed under segment `full`, as the plain
    model served alone is."""
    from prometheus_client import generate_latest

    from serving.metrics import ServingMetrics

    metrics = ServingMetrics()
    exits, confidences = np.array([1, 0]), np.array([0.9, 0.4])
    metrics.observe_batch(exits, confidences, [2, 1, 0], [0.001, 0.002, 0.0], 0.004)
    metrics.observe_batch(exits[:1], confidences[:1], [1, 0, 0], [0.001, 0.0, 0.0], 0.0)
    text = generate_latest(metrics.registry).decode()
    assert 'earlyexit_segment_duration_seconds_count{segment="full"} 1.0' in text
    assert 'earlyexit_segment_duration_seconds_sum{segment="full"} 0.004' in text
    assert 'earlyexit_segment_duration_seconds_count{segment="1"} 2.0' in text


def test_consistency_ceiling_routes_to_the_plain_models_answer_by_hand():
    """Full depth is the plain model: a row stops at the first enabled exit predicting its
    class, else the plain model answers it, for the cheapest set of enabled exits."""
    from thresholds.ceiling import consistency_ceiling

    # Exit predictions: rows 0, 1, 2 -> exit 1 says 0, 0, 0; exit 2 says 1, 1, 2.
    plain = np.array([1, 2, 2])  # agrees with exit 2 on rows 0 and 2, with no exit on row 1
    table = build_exit_table(PROBS, LABELS, "plain", plain_predictions=plain)
    assert table.agrees_final.tolist() == [[False, True], [False, False], [False, True]]
    costs = CostModel((2.0, 3.0), 4.0, "macs", plain=12.0)
    ceiling = consistency_ceiling(table, costs)
    # none enabled: 12 a row; exit 1 only: 2 + 12; exit 2 only or both: rows 0 and 2 stop at
    # exit 2 (5), row 1 runs both segments and the plain model (17): 27 / 3 = 9.
    assert ceiling.enabled_exits == (2,) and ceiling.acceleration == pytest.approx(4 / 9)
    assert ceiling.to_dict()["agrees_with"] == "plain model"
    assert ceiling.accuracy == pytest.approx(100 / 3)  # the plain model's: row 2 only
    # Without the plain model's predictions there is no ceiling to report.
    assert (
        consistency_ceiling(
            build_exit_table(PROBS, LABELS, "plain", plain_correct=plain == LABELS), costs
        )
        is None
    )


def test_the_oracle_ceiling_may_send_rows_to_the_plain_model_with_any_exits_on():
    """With every exit off the oracle is the plain model alone (its accuracy at 1 plain pass a
    row); with the exits it can only do better, and never worse than the consistency router."""
    from thresholds.ceiling import consistency_ceiling, oracle_ceiling

    probs, labels = synthetic_calibration(rows=1200, exits=3, classes=5, seed=9)
    plain, right = _plain_truth(probs, labels, 4)
    table = build_exit_table(probs, labels, "plain", plain_predictions=plain.argmax(axis=1))
    assert np.array_equal(table.correct[:, 3], right)
    costs = CostModel((1.0, 1.5, 2.5), 5.0, "macs", plain=5.0)
    floor = 100.0 * right.mean()
    oracle = oracle_ceiling(table, costs, floor)
    consistency = consistency_ceiling(table, costs)
    assert consistency.accuracy == pytest.approx(floor)
    assert oracle.acceleration >= consistency.acceleration - 1e-12
    # A floor only the plain model alone meets is met at no more than its cost.
    assert oracle.acceleration >= 1.0


def test_bench_times_exit_k_rows_apart_from_the_rows_the_plain_model_answers(
    plain_bundle, tmp_path, capsys
):
    """Past exit K-1 a plain-fallback bundle has two costs: exit K's rows run the chain, the
    rest also run the plain graph. Mixing them would quote neither."""
    from benchmarks.cli import main as bench_main

    data = write_tiny_cifar10(tmp_path / "cifar", per_batch=48)
    argv = ["--bundle", str(plain_bundle), "--dataset", "cifar10", "--data-dir", str(data)]
    argv += ["--batch-sizes", "1", "--repeats", "1", "--timing-rows", "8", "--threads", "1"]
    assert bench_main([*argv, "--last-exit-rows", "48", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    fractions = report["dynamic"]["exit_fractions"]  # exits 1..K, then the plain model
    rows = report["data"]["rows"]
    assert fractions[-2] > 0 and fractions[-1] > 0  # the fixture's thresholds: both kinds occur
    assert report["last_exit_latency"]["rows"] == round(fractions[-2] * rows)
    assert report["plain_fallback_latency"]["rows"] == round(fractions[-1] * rows)
    assert bench_main([*argv, "--last-exit-rows", "48"]) == 0
    assert "rows the plain model answers, at batch 1" in capsys.readouterr().out
