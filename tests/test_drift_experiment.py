"""The drift experiment's corruptions: deterministic, shape/dtype/range preserved, and they shift."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "drift_experiment.py"


def load_script():
    spec = importlib.util.spec_from_file_location("drift_experiment", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


def tiny_images() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["gaussian_noise", "gaussian_blur", "low_contrast"])
@pytest.mark.parametrize("severity", [1, 2, 3])
def test_corruption_is_deterministic_and_keeps_the_format(script, name, severity) -> None:
    fn = script.CORRUPTIONS[name]
    images = tiny_images()
    before = images.copy()
    out = fn(images, severity, seed=3)
    np.testing.assert_array_equal(images, before)  # input untouched
    assert out.shape == images.shape and out.dtype == np.uint8
    assert int(out.min()) >= 0 and int(out.max()) <= 255
    np.testing.assert_array_equal(out, fn(images, severity, seed=3))
    assert not np.array_equal(out, images)
    # A single image (H×W×C) is corrupted the same way as in a batch, for the seedless ones.
    if name != "gaussian_noise":
        np.testing.assert_array_equal(fn(images[0], severity), out[0])


def test_severity_orders_the_shift(script) -> None:
    images = tiny_images()
    for name, fn in script.CORRUPTIONS.items():
        dist = [np.abs(fn(images, s).astype(int) - images).mean() for s in (1, 2, 3)]
        assert dist[0] < dist[1] < dist[2], name


def test_low_contrast_keeps_the_mean_and_blur_keeps_constants(script) -> None:
    flat = np.full((1, 6, 6, 3), 120, dtype=np.uint8)
    np.testing.assert_array_equal(script.gaussian_blur(flat, 3), flat)
    np.testing.assert_array_equal(script.low_contrast(flat, 3), flat)
    images = tiny_images()
    out = script.low_contrast(images, 2)
    assert abs(out.astype(float).mean() - images.astype(float).mean()) < 1.0
    assert out.astype(float).std() < images.astype(float).std()


def test_non_uint8_is_refused(script) -> None:
    with pytest.raises(ValueError):
        script.gaussian_noise(np.zeros((2, 4, 4, 3), dtype=np.float32), 1)
