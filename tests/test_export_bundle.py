"""export_bundle with the default (dynamo) exporter: files, manifest, parity, MACs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from core.bundle import load_manifest, read_thresholds
from tests.conftest import TINY_CLASSES, TINY_MEAN, TINY_SHAPE, TINY_STD, build_tiny_model
from training.costs import measure_costs
from training.export import ExportError, ExportOptions, export_bundle
from training.onnx_macs import count_onnx_macs


@pytest.fixture(scope="module")
def two_exit_model():
    return build_tiny_model(exits=2, seed=3)


@pytest.fixture(scope="module")
def dynamo_bundle(tmp_path_factory, two_exit_model):
    out = tmp_path_factory.mktemp("dynamo") / "bundle"
    result = export_bundle(
        two_exit_model,
        out,
        classes=TINY_CLASSES,
        input_shape=TINY_SHAPE,
        mean=TINY_MEAN,
        std=TINY_STD,
        provenance={"dataset": "fake"},
        options=ExportOptions(name="two", version="7", progress=False),
    )
    return result


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_bundle_layout_and_manifest(dynamo_bundle):
    out = dynamo_bundle.bundle
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "full_model.onnx",
        "manifest.json",
        "segment_1.onnx",
        "segment_2.onnx",
        "stage_1.onnx",
        "thresholds.json",
    ]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    manifest = load_manifest(out, verify=True)
    assert dynamo_bundle.exporter == "dynamo"
    assert (manifest.name, manifest.version, manifest.num_exits) == ("two", "7", 2)
    assert manifest.segments[0].stage_file == "stage_1.onnx"
    assert manifest.segments[1].stage_file is None and manifest.segments[1].feature_output is None
    prov = manifest.provenance
    assert prov["dataset"] == "fake" and prov["torch_version"] == torch.__version__
    thresholds = read_thresholds(out, 2)
    assert thresholds.values == (1.0, 1.0) and thresholds.tuned["method"] == "default"


def test_every_file_is_valid_onnx_with_dynamic_batch(dynamo_bundle):
    for path in dynamo_bundle.bundle.glob("*.onnx"):
        onnx.checker.check_model(str(path), full_check=True)
        session = _session(path)
        for value in session.get_inputs() + session.get_outputs():
            assert not isinstance(value.shape[0], int), (path.name, value.name, value.shape)


def test_segments_chain_and_match_torch(dynamo_bundle, two_exit_model):
    out = dynamo_bundle.bundle
    x = np.random.default_rng(5).standard_normal((4, *TINY_SHAPE)).astype(np.float32)
    features_1, probs_1 = _session(out / "segment_1.onnx").run(None, {"input": x})
    (probs_2,) = _session(out / "segment_2.onnx").run(None, {"features_1": features_1})
    (stage_features,) = _session(out / "stage_1.onnx").run(None, {"input": x})
    (full,) = _session(out / "full_model.onnx").run(None, {"input": x})
    with torch.no_grad():
        logits = two_exit_model(torch.from_numpy(x)).logits
    assert np.abs(probs_1 - torch.softmax(logits[0], 1).numpy()).max() <= 1e-4
    assert np.abs(probs_2 - torch.softmax(logits[1], 1).numpy()).max() <= 1e-4
    assert np.abs(full - probs_2).max() <= 1e-5
    np.testing.assert_allclose(stage_features, features_1, atol=1e-5)


def test_onnx_macs_match_torch_costs(dynamo_bundle, two_exit_model):
    costs = measure_costs(two_exit_model, TINY_SHAPE)
    manifest = dynamo_bundle.manifest
    out = dynamo_bundle.bundle
    for spec, torch_macs in zip(manifest.segments, costs.segment_macs, strict=True):
        assert spec.macs == torch_macs
        assert abs(count_onnx_macs(out / spec.file) - torch_macs) <= 0.01 * torch_macs
    assert (
        abs(count_onnx_macs(out / "stage_1.onnx") - costs.stage_macs[0])
        <= 0.01 * costs.stage_macs[0]
    )
    assert manifest.full_model.macs == costs.backbone_macs
    assert sum(c.torch_macs for c in dynamo_bundle.checks if c.file.startswith("segment")) > (
        manifest.full_model.macs
    )


@pytest.mark.usefixtures("dynamo_bundle")
def test_refuses_to_overwrite_then_force_replaces(two_exit_model, tmp_path):
    from training.export import CheckpointError

    kwargs = {
        "classes": TINY_CLASSES,
        "input_shape": TINY_SHAPE,
        "mean": TINY_MEAN,
        "std": TINY_STD,
    }
    out = tmp_path / "b"
    first = export_bundle(
        two_exit_model,
        out,
        options=ExportOptions(exporter="torchscript", version="1", progress=False),
        **kwargs,
    )
    with pytest.raises(CheckpointError, match="already exists"):
        export_bundle(two_exit_model, out, options=ExportOptions(exporter="torchscript"), **kwargs)
    export_bundle(
        two_exit_model,
        out,
        options=ExportOptions(exporter="torchscript", version="2", force=True, stage_files=False),
        **kwargs,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == "2" and first.manifest.version == "1"
    assert not (out / "stage_1.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_force_never_replaces_a_non_bundle_directory(two_exit_model, tmp_path):
    from training.export import CheckpointError

    victim = tmp_path / "notes"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not a bundle"):
        export_bundle(
            two_exit_model,
            victim,
            classes=TINY_CLASSES,
            input_shape=TINY_SHAPE,
            mean=TINY_MEAN,
            std=TINY_STD,
            options=ExportOptions(exporter="torchscript", force=True),
        )
    assert (victim / "keep.txt").read_text() == "precious"


def test_segment_that_computes_more_than_its_stage_fails_the_mac_check(tmp_path):
    model = build_tiny_model(exits=2, seed=4)
    original = model.run_stage

    def run_stage(k, x):
        out = original(k, x)
        if k == 1 and x.shape[1] == TINY_SHAPE[0]:
            out = out + 0.0 * original(2, out).mean()  # hidden work, same output
        return out

    model.run_stage = run_stage
    costs = measure_costs(build_tiny_model(exits=2, seed=4), TINY_SHAPE)  # honest counts
    with pytest.raises(ExportError, match="segment_1.onnx: ONNX graph counts"):
        export_bundle(
            model,
            tmp_path / "b",
            classes=TINY_CLASSES,
            input_shape=TINY_SHAPE,
            mean=TINY_MEAN,
            std=TINY_STD,
            options=ExportOptions(exporter="torchscript", progress=False),
            costs=costs,
        )
    assert list(tmp_path.iterdir()) == []  # the temporary bundle was removed


def test_parity_failure_is_an_export_error(tmp_path):
    # Python state read during tracing is frozen into the graph as a constant: the exported
    # graph then computes something else than the torch model does when verified.
    model = build_tiny_model(exits=2, seed=5)
    original = model.run_stage
    calls = [0]

    def run_stage(k, x):
        calls[0] += 1
        return original(k, x) + float(calls[0]) if k == 2 else original(k, x)

    model.run_stage = run_stage
    with pytest.raises(ExportError, match="onnxruntime probabilities differ from torch"):
        export_bundle(
            model,
            tmp_path / "b",
            classes=TINY_CLASSES,
            input_shape=TINY_SHAPE,
            mean=TINY_MEAN,
            std=TINY_STD,
            options=ExportOptions(exporter="torchscript", progress=False),
            costs=measure_costs(build_tiny_model(exits=2, seed=5), TINY_SHAPE),
        )
    assert list(tmp_path.iterdir()) == []
