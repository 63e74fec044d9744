"""scripts/recover_weights.py: trainable weights back from a bundle's BatchNorm-folded ONNX."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_SHAPE, normalise, tiny_checkpoint, tiny_uint8_images
from tests.data_fixtures import write_tiny_cifar10

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import recover_weights  # noqa: E402


@pytest.fixture(scope="module")
def lite_run(tmp_path_factory):
    """A 3-exit `lite`-head network with non-trivial BatchNorms, exported by the default
    (dynamo) exporter, and a CIFAR-10-shaped data directory for the statistics."""
    from training.export import ExportOptions, export_checkpoint
    from training.models import create_model

    torch.manual_seed(5)
    model = create_model("resnet18", 10, exits=3, head="lite", width=0.125, stem="cifar")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    model.eval()
    checkpoint = tiny_checkpoint(model)
    checkpoint["config"].update({"head": "lite", "val_size": 50})
    root = tmp_path_factory.mktemp("recover")
    bundle = root / "bundle"
    export_checkpoint(checkpoint, bundle, ExportOptions(name="lite", version="1", progress=False))
    data = write_tiny_cifar10(root / "data", per_batch=60)
    return model, bundle, data


def test_recovered_network_reproduces_every_exit_and_trains(lite_run, tmp_path):
    from training.models import create_model

    model, bundle, data = lite_run
    out = tmp_path / "network.pt"
    argv = ["--bundle", str(bundle), "--which", "network", "--data-dir", str(data)]
    assert recover_weights.main([*argv, "--out", str(out), "--batches", "4"]) == 0
    state = torch.load(out, weights_only=True)
    rebuilt = create_model("resnet18", 10, exits=3, head="lite", width=0.125, stem="cifar")
    rebuilt.load_state_dict(state)
    rebuilt.eval()
    x = torch.from_numpy(normalise(tiny_uint8_images(32, seed=9)))
    with torch.no_grad():
        for ours, theirs in zip(rebuilt(x).logits, model(x).logits, strict=True):
            np.testing.assert_allclose(
                torch.softmax(ours, 1).numpy(), torch.softmax(theirs, 1).numpy(), atol=1e-4
            )
    # Folded convolutions are rescaled to the expected norm of the backbone's own
    # initialisation (Kaiming, fan_out): E|W|² = numel · 2 / fan_out = 2 · in_channels ...
    conv = state["backbone.stages.0.0.conv1.weight"]
    assert float(conv.norm()) == pytest.approx((2.0 * conv.shape[1]) ** 0.5, rel=1e-4)
    # ... and each BatchNorm's running statistics are those of its input on training rows,
    # so train mode (batch statistics) stays close to eval mode on such rows.
    rebuilt.train()
    with torch.no_grad():
        train_mode = torch.softmax(rebuilt(x).logits[-1], 1)
    rebuilt.eval()
    with torch.no_grad():
        eval_mode = torch.softmax(rebuilt(x).logits[-1], 1)
    assert float((train_mode - eval_mode).abs().mean()) < 0.1
    # earlyexit-train --init FILE --init-heads accepts it.
    from training.config import TrainConfig
    from training.engine import load_backbone

    fresh = create_model("resnet18", 10, exits=3, head="lite", width=0.125, stem="cifar")
    cfg = TrainConfig(
        arch="resnet18", width=0.125, exits=3, head="lite", init=str(out), init_heads=True
    )
    load_backbone(fresh, cfg)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_bad_input_is_one_line_and_exit_2(lite_run, tiny_bundle, tmp_path, capsys):
    _model, bundle, data = lite_run
    out = tmp_path / "w.pt"

    def run(*argv: str) -> str:
        assert recover_weights.main([*argv, "--data-dir", str(data), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("recover_weights: ")
        assert not out.exists()
        return err

    # The shipped bundle names its plain model in `baseline`; this one has none.
    assert "names no plain model" in run("--bundle", str(bundle), "--which", "plain")
    # The TorchScript exporter names folded weights otherwise: refused, not guessed.
    assert "no folded weight" in run("--bundle", str(tiny_bundle), "--which", "network")
    assert "cannot read the manifest" in run("--bundle", str(tmp_path), "--which", "network")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["input"]["shape"] == list(TINY_SHAPE)
