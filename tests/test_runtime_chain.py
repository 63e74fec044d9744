"""EarlyExitRuntime on the tiny 3-exit bundle: parity with torch and the early-exit rule."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from core.bundle import BundleError
from core.decision import decide
from serving.runtime import EarlyExitRuntime
from tests.conftest import normalise


@pytest.fixture(scope="module")
def runtime(tiny_bundle) -> EarlyExitRuntime:
    return EarlyExitRuntime(tiny_bundle, intra_op_threads=1)


@pytest.fixture(scope="module")
def batch(tiny_images) -> np.ndarray:
    return normalise(tiny_images.images)


@pytest.fixture(scope="module")
def torch_exit_probs(tiny_model, batch) -> np.ndarray:
    with torch.no_grad():
        logits = tiny_model(torch.from_numpy(batch)).logits
    return torch.stack([torch.softmax(z, dim=1) for z in logits], dim=1).numpy()


def test_fixture_thresholds_send_rows_to_every_exit_and_the_fallback(runtime, batch):
    result = runtime.classify(batch)
    counts = np.bincount(result.exits, minlength=4)
    assert (counts > 0).all(), f"exit counts (fallback first): {counts.tolist()}"


def test_full_mode_matches_torch_per_exit(runtime, batch, torch_exit_probs):
    result = runtime.classify(batch, full=True)
    assert result.exit_probs.shape == torch_exit_probs.shape
    assert np.abs(result.exit_probs - torch_exit_probs).max() <= 1e-4
    assert result.rows_per_segment == [len(batch)] * 3


def test_preprocess_matches_training_normalisation(runtime, tiny_images, batch):
    np.testing.assert_allclose(runtime.preprocess(tiny_images.images), batch, rtol=0, atol=1e-6)


def test_full_model_matches_torch_backbone(runtime, tiny_model, batch):
    with torch.no_grad():
        expected = torch.softmax(tiny_model.forward_backbone(torch.from_numpy(batch)), 1).numpy()
    assert np.abs(runtime.run_full_model(batch) - expected).max() <= 1e-4


def test_all_thresholds_one_means_every_row_gets_the_ensemble(runtime, batch, torch_exit_probs):
    result = runtime.classify(batch, thresholds=(1.0, 1.0, 1.0))
    assert (result.exits == 0).all()
    # Every exit's head ran: the ensemble needs all K exits' probabilities.
    assert result.rows_per_segment == [len(batch)] * 3
    assert runtime.stage_skips((1.0, 1.0, 1.0)) == [False, False, False]
    np.testing.assert_allclose(result.probs, torch_exit_probs.mean(axis=1), atol=1e-4)


def test_last_exit_only_equals_full_model_and_skips_heads(runtime, batch):
    thresholds = (1.0, 1.0, 0.0)
    assert runtime.stage_skips(thresholds) == [True, True, False]
    result = runtime.classify(batch, thresholds=thresholds)
    assert (result.exits == 3).all()
    assert result.rows_per_segment == [len(batch)] * 3
    np.testing.assert_allclose(result.probs, runtime.run_full_model(batch), atol=1e-5)
    assert (result.labels == runtime.run_full_model(batch).argmax(axis=1)).all()


def test_all_thresholds_zero_answers_at_exit_one(runtime, batch, torch_exit_probs):
    result = runtime.classify(batch, thresholds=(0.0, 0.0, 0.0))
    assert (result.exits == 1).all()
    assert result.rows_per_segment == [len(batch), 0, 0]
    assert result.segment_seconds[1:] == [0.0, 0.0]
    np.testing.assert_allclose(result.probs, torch_exit_probs[:, 0], atol=1e-4)


def test_mixed_batch_equals_rows_one_at_a_time(runtime, batch):
    result = runtime.classify(batch)
    singles = [runtime.classify(batch[i : i + 1]) for i in range(len(batch))]
    assert result.exits.tolist() == [int(s.exits[0]) for s in singles]
    np.testing.assert_allclose(result.probs, np.concatenate([s.probs for s in singles]), atol=1e-6)
    # Later segments ran only on the rows earlier exits left.
    reached = [int(np.sum((result.exits == 0) | (result.exits >= k))) for k in (1, 2, 3)]
    assert result.rows_per_segment == reached
    assert reached[0] > reached[1] > reached[2] > 0


@pytest.mark.parametrize("fallback", ["ensemble", "last"])
def test_single_row_fast_path_is_exactly_the_reference_rule(bundle_copy, batch, fallback):
    """Batch size 1 takes its own code path; its answers are bit-identical to `decide` on the
    same row's full-mode probabilities, disabled exits included."""
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["fallback"] = fallback
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    runtime = EarlyExitRuntime(bundle_copy, intra_op_threads=1)
    seen_exits = set()
    for thresholds in (runtime.thresholds, (1.0, runtime.thresholds[1], 0.0), (1.0, 1.0, 1.0)):
        for i in range(len(batch)):
            row = batch[i : i + 1]
            single = runtime.classify(row, thresholds=thresholds)
            full = runtime.classify(row, full=True, thresholds=thresholds)
            answers, exits = decide(full.exit_probs, thresholds, fallback)
            assert single.exits.tolist() == exits.tolist()
            np.testing.assert_array_equal(single.probs, answers)
            depth = runtime.manifest.num_exits if exits[0] == 0 else int(exits[0])
            assert single.rows_per_segment == [1] * depth + [0] * (3 - depth)
            seen_exits.add(int(exits[0]))
    assert seen_exits == {0, 1, 2, 3}


class _NaNInLastClass:
    """Wraps segment 1's session: its probabilities get a NaN in the last class, the rest
    untouched (Python's max skips a NaN that is not first)."""

    def __init__(self, session) -> None:
        self.session = session

    def run(self, names, feed):
        outputs = self.session.run(names, feed)
        probs = outputs[0].copy()
        probs[:, -1] = np.nan
        return [probs, *outputs[1:]]


def test_a_nan_probability_is_never_accepted_at_any_batch_size(tiny_bundle, batch):
    """numpy's max of a row holding a NaN is NaN, so `decide` accepts no such row; the batch-1
    path reads Python floats and must agree even when another class clears the threshold."""
    runtime = EarlyExitRuntime(tiny_bundle, intra_op_threads=1)
    runtime._segments[0] = _NaNInLastClass(runtime._segments[0])
    thresholds = (0.0, 0.0, 0.0)
    full = runtime.classify(batch[:2], full=True, thresholds=thresholds)
    assert np.isnan(full.exit_probs[:, 0, -1]).all() and (full.exit_probs[:, 0, :-1] > 0).any()
    _, exits = decide(full.exit_probs, thresholds, runtime.manifest.fallback)
    assert exits.tolist() == [2, 2]
    assert runtime.classify(batch[:2], thresholds=thresholds).exits.tolist() == [2, 2]
    for i in range(2):
        single = runtime.classify(batch[i : i + 1], thresholds=thresholds)
        assert single.exits.tolist() == [2]
        assert single.rows_per_segment == [1, 1, 0]


def test_dynamic_answers_equal_the_reference_rule_on_full_mode(runtime, batch):
    full = runtime.classify(batch, full=True)
    answers, exits = decide(full.exit_probs, runtime.thresholds, runtime.manifest.fallback)
    dynamic = runtime.classify(batch)
    assert dynamic.exits.tolist() == exits.tolist() == full.exits.tolist()
    np.testing.assert_allclose(dynamic.probs, answers, atol=1e-6)


def test_ensemble_fallback_rows_get_the_mean_of_all_exits(runtime, batch):
    full = runtime.classify(batch, full=True)
    dynamic = runtime.classify(batch)
    fallback = dynamic.exits == 0
    assert fallback.any()
    np.testing.assert_allclose(
        dynamic.probs[fallback], full.exit_probs[fallback].mean(axis=1), atol=1e-6
    )
    answered = ~fallback
    picked = full.exit_probs[np.flatnonzero(answered), dynamic.exits[answered] - 1]
    np.testing.assert_allclose(dynamic.probs[answered], picked, atol=1e-6)


def test_last_fallback_uses_stage_files_for_disabled_exits(bundle_copy, batch):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["fallback"] = "last"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    runtime = EarlyExitRuntime(bundle_copy, intra_op_threads=1)
    assert runtime.stage_skips((1.0, 1.0, 1.0)) == [True, True, False]
    result = runtime.classify(batch, thresholds=(1.0, 1.0, 1.0))
    assert (result.exits == 0).all()
    np.testing.assert_allclose(result.probs, runtime.run_full_model(batch), atol=1e-5)
    mixed = runtime.classify(batch, thresholds=(1.0, runtime.thresholds[1], 1.0))
    full = runtime.classify(batch, full=True, thresholds=(1.0, runtime.thresholds[1], 1.0))
    assert mixed.exits.tolist() == full.exits.tolist()
    np.testing.assert_allclose(mixed.probs, full.probs, atol=1e-6)


def test_set_thresholds_validates_and_swaps(runtime):
    before = runtime.thresholds
    with pytest.raises(BundleError, match="expected 3 thresholds"):
        runtime.set_thresholds([0.5, 0.5])
    with pytest.raises(BundleError, match=r"must be in \[0, 1\]"):
        runtime.set_thresholds([0.5, 1.5, 0.1])
    assert runtime.thresholds == before
    try:
        runtime.set_thresholds([0.2, 0.3, 0.4])
        assert runtime.thresholds == (0.2, 0.3, 0.4)
    finally:
        runtime.set_thresholds(before)


def test_concurrent_threshold_swaps_never_mix_vectors(tiny_bundle, batch):
    runtime = EarlyExitRuntime(tiny_bundle, intra_op_threads=1)
    vectors = [(0.0, 0.0, 0.0), (1.0, 1.0, 0.0)]
    expected = {v: runtime.classify(batch[:16], thresholds=v).exits.tolist() for v in vectors}
    stop = threading.Event()

    def swapper() -> None:
        i = 0
        while not stop.is_set():
            runtime.set_thresholds(vectors[i % 2])
            i += 1

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        for _ in range(40):
            exits = runtime.classify(batch[:16]).exits.tolist()
            assert exits in expected.values()
    finally:
        stop.set()
        thread.join()


def test_bad_batches_are_rejected(runtime, batch):
    with pytest.raises(ValueError, match="batch must be N×3×32×32"):
        runtime.classify(batch[:, :, :16])
    with pytest.raises(ValueError, match="images must be N×32×32×3"):
        runtime.preprocess(np.zeros((2, 32, 32), dtype=np.uint8))
    empty = runtime.classify(batch[:0])
    assert empty.probs.shape == (0, 10) and empty.exits.shape == (0,)
    assert empty.rows_per_segment == [0, 0, 0]


@pytest.mark.parametrize(
    ("max_batch", "sizes"), [(1, [1]), (6, [1, 2, 4, 6]), (32, [1, 2, 4, 8, 16, 32])]
)
def test_warm_up_runs_powers_of_two_up_to_the_largest_batch(tiny_bundle, batch, max_batch, sizes):
    runtime = EarlyExitRuntime(tiny_bundle, intra_op_threads=1)
    before = runtime.classify(batch)
    assert runtime.warm_up(max_batch) == sizes
    after = runtime.classify(batch)  # warming changes nothing about answers
    assert after.exits.tolist() == before.exits.tolist()
    np.testing.assert_array_equal(after.probs, before.probs)
    with pytest.raises(ValueError):
        runtime.warm_up(0)
