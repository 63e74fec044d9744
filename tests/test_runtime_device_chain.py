"""The device-resident path (IOBinding, features kept where they were computed, continuing rows
selected by the embedded Gather graph) is what runs under CUDA. `device_chain=True` runs the same
code with the CPU as the device, so its row bookkeeping is checked on machines without a GPU:
it must give the host path's answers, exits and per-segment row counts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.runtime import EarlyExitRuntime
from tests.conftest import normalise


@pytest.fixture(scope="module")
def batch(tiny_images) -> np.ndarray:
    return normalise(tiny_images.images)


def _pair(bundle) -> tuple[EarlyExitRuntime, EarlyExitRuntime]:
    host = EarlyExitRuntime(bundle, intra_op_threads=1)
    device = EarlyExitRuntime(bundle, intra_op_threads=1, device_chain=True)
    return host, device


@pytest.mark.parametrize("fallback", ["ensemble", "last"])
def test_device_path_equals_the_host_path(bundle_copy, batch, fallback):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["fallback"] = fallback
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    host, device = _pair(bundle_copy)
    assert device._gather is not None and host._gather is None
    tuned = host.thresholds
    seen = set()
    for thresholds in (tuned, (1.0, tuned[1], 0.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)):
        for rows in (batch, batch[:1], batch[7:8], batch[:0]):
            expected = host.classify(rows, thresholds=thresholds)
            got = device.classify(rows, thresholds=thresholds)
            assert got.exits.tolist() == expected.exits.tolist()
            np.testing.assert_allclose(got.probs, expected.probs, rtol=0, atol=1e-6)
            assert got.rows_per_segment == expected.rows_per_segment
            seen.update(expected.exits.tolist())
    assert seen == {0, 1, 2, 3}  # every exit and the fallback were exercised


def test_device_path_really_drops_rows_between_segments(tiny_bundle, batch):
    _, device = _pair(tiny_bundle)
    result = device.classify(batch)
    counts = result.rows_per_segment
    assert counts[0] == len(batch) and counts[0] > counts[1] > counts[2] > 0
    exited_before = [int((result.exits == k).sum()) for k in (1, 2)]
    assert counts[1] == counts[0] - exited_before[0]
    assert counts[2] == counts[1] - exited_before[1]
