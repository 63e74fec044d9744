"""scripts/fronts_on_heldout.py: fronts searched on one split, scored on another, against the
plain model; from cached calibration of hand-written bundles (no images, no onnxruntime)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from core.bundle import load_manifest
from core.calibration import save_calibration
from tests.test_thresholds_cli import write_fake_bundle
from thresholds.calibrate import cache_path
from thresholds.synthetic import synthetic_calibration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fronts_on_heldout  # noqa: E402

DATASET = "synthetic"


def _cache(bundle: Path, data_dir: Path, signal: float) -> None:
    """Fill `bundle`'s calibration cache for val and test, and its plain model's."""
    manifest = load_manifest(bundle)
    cache = bundle / "calibration_cache"
    for seed, split in enumerate(("val", "test")):
        probs, labels = synthetic_calibration(rows=2000, seed=seed, signal=signal)
        path = cache_path(cache, manifest, DATASET, split, data_dir)
        save_calibration(path, probs, labels, {"split": split})
        plain, _ = synthetic_calibration(rows=2000, seed=seed, exits=1, signal=14.0)
        sha = manifest.full_model.sha256
        path = cache_path(cache, manifest, DATASET, split, data_dir, plain=True)
        save_calibration(path, plain, labels, {"split": split, "plain_graph_sha256": sha})


@pytest.fixture
def bundles(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (tmp_path / "weak").mkdir()
    (tmp_path / "strong").mkdir()
    weak = write_fake_bundle(tmp_path / "weak")
    strong = write_fake_bundle(tmp_path / "strong")
    _cache(weak, data_dir, signal=10.0)
    _cache(strong, data_dir, signal=16.0)
    return weak, strong, data_dir


def test_fronts_are_scored_on_the_held_out_rows(bundles, tmp_path):
    weak, strong, data_dir = bundles
    out = tmp_path / "out"
    argv = ["--bundle", f"weak={weak}", "--bundle", f"strong={strong}", "--dataset", DATASET]
    assert fronts_on_heldout.main(argv + ["--data-dir", str(data_dir), "--out", str(out)]) == 0
    report = json.loads((out / "fronts.json").read_text())
    assert (out / "fronts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [b["name"] for b in report["bundles"]] == ["weak", "strong"]
    for entry in report["bundles"]:
        front = entry["front"]
        assert front
        # the front is non-dominated on the tuning split
        acc = np.array([p["tune_accuracy"] for p in front])
        speed = np.array([p["tune_acceleration"] for p in front])
        for a, s in zip(acc, speed, strict=True):
            assert not np.any((acc > a) & (speed > s))
        best = entry["best_held_out_acceleration_within"]
        floor = entry["plain_held_out_accuracy"]
        for drop, value in best.items():
            ok = [p for p in front if p["held_out_accuracy"] >= floor - float(drop)]
            assert value == (max(p["held_out_acceleration"] for p in ok) if ok else None)
    # the more separable bundle's exits stay more accurate on the held-out rows
    top = {b["name"]: max(p["held_out_accuracy"] for p in b["front"]) for b in report["bundles"]}
    assert top["strong"] > top["weak"]
    # both are compared with the same plain model (the same cached arrays)
    plains = {b["plain_held_out_accuracy"] for b in report["bundles"]}
    assert len(plains) == 1


def test_bad_input_is_one_line_and_exit_2(bundles, tmp_path, capsys):
    weak, _, data_dir = bundles
    base = ["--dataset", DATASET, "--data-dir", str(data_dir), "--out", str(tmp_path / "o")]
    assert fronts_on_heldout.main(base + ["--bundle", f"w={weak}", "--held-out", "val"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must differ" in err[0]
    assert fronts_on_heldout.main(base + ["--bundle", f"w={tmp_path / 'nope'}"]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
