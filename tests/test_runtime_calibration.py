"""Calibration arrays: collected through the runtime, saved and loaded atomically."""

from __future__ import annotations

import numpy as np
import pytest

from core.calibration import (
    CalibrationError,
    collect_calibration,
    load_calibration,
    save_calibration,
)
from core.decision import decide
from serving.runtime import EarlyExitRuntime


@pytest.fixture(scope="module")
def runtime(tiny_bundle) -> EarlyExitRuntime:
    return EarlyExitRuntime(tiny_bundle, intra_op_threads=1)


def test_collect_matches_full_mode_whatever_the_batch_size(runtime, tiny_images):
    exit_probs, labels = collect_calibration(
        runtime, tiny_images.images, tiny_images.labels, batch_size=10, progress=False
    )
    assert exit_probs.shape == (len(tiny_images), 3, 10) and exit_probs.dtype == np.float32
    assert labels.dtype == np.int64 and (labels == tiny_images.labels).all()
    full = runtime.classify(runtime.preprocess(tiny_images.images), full=True)
    np.testing.assert_allclose(exit_probs, full.exit_probs, atol=1e-6)


def test_save_load_round_trip_leaves_no_temp_files(runtime, tiny_images, tmp_path):
    exit_probs, labels = collect_calibration(
        runtime, tiny_images.images, tiny_images.labels, progress=False
    )
    meta = {"dataset": "fake", "split": "val", "num_exits": 3, "num_classes": 10}
    path = save_calibration(tmp_path / "cal.npz", exit_probs, labels, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.npz"]
    loaded_probs, loaded_labels, loaded_meta = load_calibration(path)
    assert np.array_equal(loaded_probs, exit_probs) and np.array_equal(loaded_labels, labels)
    assert loaded_meta == meta


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(CalibrationError, match="calibration file not found"):
        load_calibration(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00not a zip")
    with pytest.raises(CalibrationError, match="not a calibration .npz file"):
        load_calibration(garbage)
    partial = tmp_path / "partial.npz"
    np.savez(partial, exit_probs=np.zeros((2, 3, 4), np.float32))
    with pytest.raises(CalibrationError, match="missing array"):
        load_calibration(partial)


def test_save_rejects_inconsistent_arrays(tmp_path):
    with pytest.raises(CalibrationError, match="labels must have shape"):
        save_calibration(tmp_path / "x.npz", np.zeros((4, 2, 3), np.float32), np.zeros(3), {})
    with pytest.raises(CalibrationError, match="exit_probs must be float32"):
        save_calibration(tmp_path / "x.npz", np.zeros((4, 3)), np.zeros(4, np.int64), {})


def test_decide_rule_first_accepting_exit_then_fallback():
    exit_probs = np.array(
        [
            [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]],  # exit 1 accepts (0.9 > 0.8)
            [[0.6, 0.4], [0.1, 0.9], [0.5, 0.5]],  # exit 2 accepts (0.9 > 0.8)
            [[0.6, 0.4], [0.3, 0.7], [0.55, 0.45]],  # nobody: ensemble
        ],
        dtype=np.float32,
    )
    answers, exits = decide(exit_probs, [0.8, 0.8, 0.8], "ensemble")
    assert exits.tolist() == [1, 2, 0]
    np.testing.assert_allclose(answers[2], exit_probs[2].mean(axis=0))
    answers, exits = decide(exit_probs, [0.8, 0.8, 0.8], "last")
    assert exits.tolist() == [1, 2, 0]
    np.testing.assert_allclose(answers[2], exit_probs[2, 2])
    # Strictly greater, compared in float64: a probability equal to the threshold is rejected.
    _, exits = decide(exit_probs, [0.9, 1.0, 0.0], "ensemble")
    assert exits.tolist() == [3, 3, 3]
