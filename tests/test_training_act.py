"""T-ReLU (seed 000, eq. 6) and `--act`: values, gradient, every backbone and head, export."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import training
from tests.arch_helpers import checkpoint_for, export_and_check, staged_equals_full
from training.config import TrainConfig
from training.models import create_model
from training.models.activations import TReLU, make_activation, set_activation

ROOT = Path(__file__).resolve().parents[1]


def test_trelu_values_are_x_above_zero_and_tanh_below():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 2.0, 50.0])
    want = torch.tensor([math_tanh(-3.0), math_tanh(-1.0), math_tanh(-0.5), 0.0, 0.5, 2.0, 50.0])
    assert torch.allclose(TReLU()(x), want, atol=1e-7)
    assert float(TReLU()(torch.tensor(-1e4))) == -1.0  # bounded below, unlike the identity


def math_tanh(v: float) -> float:
    import math

    return (math.exp(v) - math.exp(-v)) / (math.exp(v) + math.exp(-v))  # eq. 6 as printed


def test_trelu_gradient_is_one_above_zero_and_one_minus_tanh_squared_below():
    x = torch.tensor([-2.0, -0.3, 0.4, 3.0], requires_grad=True)
    TReLU()(x).sum().backward()
    t = torch.tanh(torch.tensor([-2.0, -0.3]))
    assert torch.allclose(x.grad, torch.cat([1 - t**2, torch.ones(2)]))
    # Negative inputs still pass a gradient, which ReLU does not.
    assert bool((x.grad > 0).all())


def _activations(module: nn.Module) -> set[type]:
    return {type(m) for m in module.modules() if isinstance(m, nn.ReLU | nn.ReLU6 | TReLU)}


@pytest.mark.parametrize("arch", training.list_models())
def test_act_trelu_reaches_every_backbone_and_head(arch):
    torch.manual_seed(0)
    model = create_model(arch, 5, exits=2, width=0.125, act="trelu").eval()
    assert _activations(model) == {TReLU}
    staged_equals_full(model, torch.randn(2, 3, 32, 32))
    # The activation holds no weights: the state dict is the default model's.
    default = create_model(arch, 5, exits=2, width=0.125)
    assert model.state_dict().keys() == default.state_dict().keys()


def test_act_relu_replaces_mobilenet_relu6_and_none_keeps_it():
    assert nn.ReLU6 in _activations(create_model("mobilenetv2", 5, exits=2, width=0.125))
    relu = create_model("mobilenetv2", 5, exits=2, width=0.125, act="relu")
    assert _activations(relu) == {nn.ReLU}


def test_set_activation_keeps_a_shared_module_shared():
    relu = nn.ReLU()
    net = nn.Sequential(relu, nn.Sequential(relu))
    set_activation(net, "trelu")
    assert isinstance(net[0], TReLU) and net[0] is net[1][0]


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown activation 'swish'; valid: relu, trelu"):
        make_activation("swish")
    with pytest.raises(ValueError, match="unknown activation"):
        create_model("resnet18", 5, exits=2, width=0.125, act="swish")
    with pytest.raises(ValueError, match="unknown activation"):
        TrainConfig(act="swish").validate()


def test_trelu_model_exports_with_parity_from_its_checkpoint(tmp_path):
    """export.build_model rebuilds the activation from the checkpoint's config: a ReLU rebuild
    of T-ReLU weights would fail parity."""
    torch.manual_seed(0)
    model = create_model("resnet18", 4, exits=3, width=0.125, head="lite", act="trelu").eval()
    ckpt = checkpoint_for(model, {"arch": "resnet18", "width": 0.125, "exits": 3, "head": "lite",
                                  "act": "trelu"})  # fmt: skip
    result = export_and_check(ckpt, tmp_path / "b")
    assert result.manifest.num_exits == 3
    from training.export import build_model

    assert _activations(build_model(ckpt)) == {TReLU}


def test_cli_unknown_act_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "training.cli", "--out", str(tmp_path / "run"),
         "--data-dir", str(tmp_path), "--act", "swish"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "unknown activation" in lines[0]
    assert not (tmp_path / "run").exists()
