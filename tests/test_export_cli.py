"""earlyexit-export: exit codes, one-line errors, calibration thresholds from --data-dir."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.bundle import load_manifest, read_thresholds
from core.decision import decide
from tests.conftest import build_tiny_model, tiny_checkpoint
from tests.data_fixtures import write_tiny_cifar10
from thresholds.greedy import greedy_thresholds
from training.export_cli import main


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    checkpoint = tiny_checkpoint(build_tiny_model(exits=2, seed=1), exits=2)
    checkpoint["config"]["val_size"] = 40  # the tiny CIFAR fixture has 200 training rows
    torch.save(checkpoint, path)
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "b")]) == 2
    assert "checkpoint not found" in _one_error_line(capsys)


def test_garbage_checkpoint_exits_2(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    assert main(["--checkpoint", str(garbage), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "not a readable torch checkpoint" in _one_error_line(capsys)
    assert not (tmp_path / "b").exists()


def test_checkpoint_without_required_keys_exits_2(tmp_path, capsys):
    path = tmp_path / "partial.pt"
    torch.save({"model": {}, "config": {"arch": "resnet18"}}, path)
    assert main(["--checkpoint", str(path), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "missing key(s)" in _one_error_line(capsys)


def test_export_then_refuse_overwrite_then_force(checkpoint_file, tmp_path, capsys):
    out = tmp_path / "bundle"
    args = ["--checkpoint", str(checkpoint_file), "--out", str(out), "--exporter", "torchscript"]
    assert main([*args, "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_exits"] == 2 and summary["bundle"] == str(out)
    manifest = load_manifest(out)
    assert manifest.name == "resnet18-cifar10"
    assert manifest.provenance["git_commit"] == "0" * 40
    assert manifest.provenance["training_config"]["arch"] == "resnet18"
    assert manifest.provenance["exit_val_accuracy"] == [10.0, 10.0]
    assert manifest.provenance["checkpoint_sha256"]

    assert main([*args, "--quiet"]) == 2
    assert "already exists" in _one_error_line(capsys)
    assert main([*args, "--quiet", "--force", "--version", "v2", "--fallback", "last"]) == 0
    manifest = load_manifest(out)
    assert (manifest.version, manifest.fallback) == ("v2", "last")


def test_data_dir_gives_export_greedy_thresholds(checkpoint_file, tmp_path, capsys):
    data = write_tiny_cifar10(tmp_path / "data", per_batch=40)
    out = tmp_path / "bundle"
    code = main(
        [
            "--checkpoint",
            str(checkpoint_file),
            "--out",
            str(out),
            "--exporter",
            "torchscript",
            "--data-dir",
            str(data),
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    thresholds = read_thresholds(out, 2)
    tuned = thresholds.tuned
    assert tuned["method"] == "export-greedy"
    assert tuned["data"] == {"dataset": "cifar10", "split": "val", "rows": 40}
    assert tuned["metrics"]["accuracy"] >= tuned["metrics"]["baseline_accuracy"]
    assert thresholds.values[-1] == 0.0
    # The drift reference the server compares live traffic with: the 40 val rows.
    assert tuned["reference"]["source"] == "val" and tuned["reference"]["rows"] == 40
    assert len(tuned["reference"]["quantiles"]) == 101
    assert tuned["reference"]["agreement"]["thresholds"] == list(thresholds.values)
    assert 0.0 <= tuned["reference"]["agreement"]["percent"] <= 100.0


def test_bad_dataset_dir_exits_2(checkpoint_file, tmp_path, capsys):
    code = main(
        [
            "--checkpoint",
            str(checkpoint_file),
            "--out",
            str(tmp_path / "b"),
            "--data-dir",
            str(tmp_path / "missing"),
            "--quiet",
        ]
    )
    assert code == 2
    assert "data directory not found" in _one_error_line(capsys)


def test_greedy_thresholds_never_lose_accuracy_against_the_final_exit():
    rng = np.random.default_rng(0)
    n, k, c = 400, 3, 5
    labels = rng.integers(0, c, n)
    logits = rng.standard_normal((n, k, c)) * 1.5
    logits[np.arange(n), :, labels] += np.array([1.0, 2.0, 3.0])  # deeper exits know more
    exit_probs = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    exit_probs = exit_probs.astype(np.float32)
    values = greedy_thresholds(exit_probs, labels)
    answers, exits = decide(exit_probs, values, "ensemble")
    accuracy = np.mean(answers.argmax(axis=1) == labels)
    final = np.mean(exit_probs[:, -1].argmax(axis=1) == labels)
    assert accuracy >= final
    assert values[-1] == 0.0 and (exits > 0).all()
    assert 0.0 < values[0] < 1.0 and (exits == 1).any() and (exits == 2).any()
    # The rule holds at the chosen threshold of exit 1 and fails at every lower grid value.
    max_1 = exit_probs[:, 0].max(axis=1).astype(np.float64)
    right = exit_probs.argmax(axis=2) == labels[:, None]
    if values[0] < 1.0:
        chosen = max_1 > values[0]
        assert right[chosen, 0].sum() >= right[chosen, -1].sum()
    for t in np.arange(0.0, values[0] - 1e-9, 0.01):
        lower = max_1 > round(float(t), 2)
        assert right[lower, 0].sum() < right[lower, -1].sum()


def test_lite_head_checkpoint_exports_with_its_own_heads(tmp_path, capsys):
    """The head variant travels in the checkpoint config; export rebuilds the same network."""
    from training.models import create_model

    torch.manual_seed(2)
    model = create_model("resnet18", 10, exits=2, width=0.125, head="lite").eval()
    checkpoint = tiny_checkpoint(model, exits=2)
    checkpoint["config"]["head"] = "lite"
    path = tmp_path / "lite.pt"
    torch.save(checkpoint, path)
    out = tmp_path / "bundle"
    args = ["--checkpoint", str(path), "--out", str(out), "--exporter", "torchscript", "--quiet"]
    assert main(args) == 0
    manifest = load_manifest(out)
    assert manifest.provenance["training_config"]["head"] == "lite"
    # Segment 1's MACs are the lite head's, not the seed head's.
    assert manifest.segments[0].macs == checkpoint["costs"]["segment_macs"][0]

    checkpoint["config"]["head"] = "attention"  # weights of one variant cannot fit the other
    torch.save(checkpoint, path)
    assert main([*args, "--force"]) == 2
    assert "do not fit" in _one_error_line(capsys)


# ----------------------------------------------------------------------------- baseline block


def _plain_run(root, *, seed: int, num_classes_override: int | None = None):
    """A run directory of a plain (one-exit) model: best.pt + test_metrics.json."""
    run = root / f"plain_s{seed}"
    run.mkdir()
    model = build_tiny_model(exits=1, seed=seed)
    state = tiny_checkpoint(model, exits=1)
    state["val_metrics"] = {"acc_exit1": 61.5, "acc_last": 61.5}
    if num_classes_override:
        state["num_classes"] = num_classes_override
        state["classes"] = [f"c{i}" for i in range(num_classes_override)]
    torch.save(state, run / "best.pt")
    (run / "test_metrics.json").write_text(
        json.dumps({"final": {"acc_last": 59.0}, "best": {"acc_last": 60.25}})
    )
    return run, model


def test_baseline_run_is_recorded_and_exported_as_its_own_graph(checkpoint_file, tmp_path):
    import onnxruntime as ort

    from tests.conftest import normalise, tiny_uint8_images

    run, plain = _plain_run(tmp_path, seed=7)
    out = tmp_path / "deeper" / "still" / "bundle"  # parents are created
    args = ["--checkpoint", str(checkpoint_file), "--out", str(out), "--exporter", "torchscript"]
    assert main([*args, "--baseline-run", str(run), "--baseline-recipe", "plain_fast"]) == 0
    manifest = load_manifest(out)
    assert manifest.baseline is not None
    assert manifest.baseline.recipe == "plain_fast"
    assert manifest.baseline.accuracy == {"val": 61.5, "test": 60.25}
    assert manifest.baseline.file == "baseline.onnx"
    # baseline.onnx is the plain model: its probabilities equal torch's.
    x = normalise(tiny_uint8_images(8, seed=3))
    session = ort.InferenceSession(str(out / "baseline.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = torch.softmax(plain.forward_backbone(torch.from_numpy(x)), dim=-1).numpy()
    assert np.abs(got - want).max() < 1e-4
    # No artifact carries an absolute path of the machine that made it.
    for name in ("manifest.json", "thresholds.json"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text, name
    assert json.loads((out / "manifest.json").read_text())["provenance"]["checkpoint"] == "last.pt"


def test_fallback_plain_exports_a_cascade_into_the_baseline_graph(checkpoint_file, tmp_path):
    """`--fallback plain --baseline-run`: rows no exit takes get baseline.onnx's answer; the
    export-greedy thresholds' agreement is measured against that plain model."""
    from serving.plain_runtime import PlainModelRuntime
    from serving.runtime import EarlyExitRuntime
    from tests.conftest import normalise, tiny_uint8_images

    run, _ = _plain_run(tmp_path, seed=5)
    data = write_tiny_cifar10(tmp_path / "data", per_batch=40)
    out = tmp_path / "bundle"
    assert main(["--checkpoint", str(checkpoint_file), "--out", str(out), "--exporter",
                 "torchscript", "--fallback", "plain", "--baseline-run", str(run),
                 "--data-dir", str(data), "--quiet"]) == 0  # fmt: skip
    manifest = load_manifest(out)
    assert manifest.fallback == "plain" and manifest.baseline.file == "baseline.onnx"
    agreement = read_thresholds(out, 2).tuned["reference"]["agreement"]
    assert 0.0 <= agreement["percent"] <= 100.0
    x = normalise(tiny_uint8_images(8, seed=4))
    runtime = EarlyExitRuntime(out, intra_op_threads=1)
    plain = PlainModelRuntime(out, intra_op_threads=1).run(x)
    np.testing.assert_array_equal(runtime.classify(x, thresholds=(1.0, 1.0)).probs, plain)


def test_baseline_of_the_bundles_own_backbone_needs_no_extra_graph(tmp_path):
    """Exits trained on a frozen backbone: full_model.onnx already is the plain model."""
    plain = build_tiny_model(exits=1, seed=3)
    multi = build_tiny_model(exits=2, seed=4)
    own = {k: v for k, v in plain.state_dict().items() if k.startswith("backbone.")}
    multi.load_state_dict({**multi.state_dict(), **own})
    ckpt = tmp_path / "exits.pt"
    torch.save(tiny_checkpoint(multi, exits=2), ckpt)
    run = tmp_path / "plain"
    run.mkdir()
    state = tiny_checkpoint(plain, exits=1)
    state["val_metrics"] = {"acc_last": 50.0}
    torch.save(state, run / "best.pt")
    (run / "test_metrics.json").write_text(json.dumps({"best": {"acc_last": 48.5}}))
    out = tmp_path / "bundle"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--exporter", "torchscript",
                 "--baseline-run", str(run), "--quiet"]) == 0  # fmt: skip
    manifest = load_manifest(out)
    assert manifest.baseline.file is None
    assert manifest.baseline.accuracy == {"val": 50.0, "test": 48.5}
    assert manifest.baseline.recipe == "plain"
    assert not (out / "baseline.onnx").exists()


def test_baseline_run_with_other_classes_exits_2(checkpoint_file, tmp_path, capsys):
    run, _ = _plain_run(tmp_path, seed=1, num_classes_override=4)
    out = tmp_path / "bundle"
    code = main(["--checkpoint", str(checkpoint_file), "--out", str(out), "--quiet",
                 "--baseline-run", str(run)])  # fmt: skip
    assert code == 2 and "differs from the checkpoint" in _one_error_line(capsys)
    assert not out.exists()


def test_unfinished_baseline_run_exits_2(checkpoint_file, tmp_path, capsys):
    run, _ = _plain_run(tmp_path, seed=2)
    (run / "test_metrics.json").unlink()
    out = tmp_path / "bundle"
    code = main(["--checkpoint", str(checkpoint_file), "--out", str(out), "--quiet",
                 "--baseline-run", str(run)])  # fmt: skip
    assert code == 2 and "records no test accuracy" in _one_error_line(capsys)
    assert not out.exists()


def test_baseline_run_without_best_pt_exits_2(checkpoint_file, tmp_path, capsys):
    out = tmp_path / "bundle"
    code = main(["--checkpoint", str(checkpoint_file), "--out", str(out), "--quiet",
                 "--baseline-run", str(tmp_path)])  # fmt: skip
    assert code == 2 and "no best.pt" in _one_error_line(capsys)
    assert not out.exists()
