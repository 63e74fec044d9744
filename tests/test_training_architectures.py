"""The seed papers' backbones: group-conv ResNet18 and VGG-BN (seed 001 §3.4)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.arch_helpers import checkpoint_for, export_and_check, staged_equals_full
from tests.cli_helpers import assert_train_refuses
from training.costs import measure_costs
from training.models import block_names, create_backbone, create_model

ROOT = Path(__file__).resolve().parents[1]

VGG_NAMES = [f"vgg{d}_bn{g}" for d in (11, 13, 16, 19) for g in ("", "_g2")]
NEW_NAMES = ["resnet18_g2", *VGG_NAMES]


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize(
    ("depth", "per_module"),
    [(11, (1, 1, 2, 2, 2)), (13, (2, 2, 2, 2, 2)), (16, (2, 2, 3, 3, 3)), (19, (2, 2, 4, 4, 4))],
)
def test_vgg_bn_has_the_papers_five_modules(depth, per_module):
    plain = create_backbone(f"vgg{depth}_bn", 10)
    grouped = create_backbone(f"vgg{depth}_bn_g2", 10)
    assert plain.num_stages == 5 and plain.stage_channels == [64, 128, 256, 512, 512]
    for s, n in enumerate(per_module):
        assert len(_convs(plain.stages[s])) == n
        assert all(isinstance(layer.bn, nn.BatchNorm2d) for layer in plain.stages[s])
        # the module closes with its max-pool
        assert isinstance(plain.stages[s][-1].pool, nn.MaxPool2d)
        # every convolution of the last two modules, and only those, is grouped
        assert {c.groups for c in _convs(grouped.stages[s])} == {2 if s >= 3 else 1}
    assert len(block_names(f"vgg{depth}_bn")) == sum(per_module)
    assert plain(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_resnet18_g2_groups_only_the_residual_3x3_convolutions():
    net = create_backbone("resnet18_g2", 10)
    assert net.stem[0].groups == 1
    for conv in _convs(net.stages):
        assert conv.groups == (2 if conv.kernel_size == (3, 3) else 1)
    # the same through --groups 2 on resnet18
    same = create_backbone("resnet18", 10, groups=2)
    assert [tuple(p.shape) for p in same.parameters()] == [tuple(p.shape) for p in net.parameters()]


def _reduction(name: str, base: str, exits: int) -> tuple[float, float]:
    a = create_model(base, 10, exits=exits)
    b = create_model(name, 10, exits=exits)
    ca, cb = measure_costs(a, (3, 32, 32)), measure_costs(b, (3, 32, 32))

    def params(m):
        return sum(p.numel() for p in m.parameters())

    return 100 * (params(b) / params(a) - 1), 100 * (
        sum(cb.segment_macs) / sum(ca.segment_macs) - 1
    )


def test_group_conv_resnet18_cuts_params_as_the_paper_reports():
    """Seed 001 §4.7: −45.4 % parameters (CIFAR-10). The plain backbone loses 49 %; with the
    paper's four exits (attention heads, not grouped) the network loses 45.7 %."""
    params, macs = _reduction("resnet18_g2", "resnet18", exits=1)
    assert -50.0 < params < -48.5 and -50.0 < macs < -48.5
    params, macs = _reduction("resnet18_g2", "resnet18", exits=4)
    assert -46.5 < params < -45.0 and macs < -45.0


def test_group_conv_vgg_cuts_the_last_two_modules():
    params, macs = _reduction("vgg11_bn_g2", "vgg11_bn", exits=1)
    # the last two modules hold 89 % of VGG11-BN's weights; grouping halves them
    assert -46.0 < params < -43.0 and -26.0 < macs < -23.0


@pytest.mark.parametrize("name", NEW_NAMES)
def test_new_backbones_export_with_parity_at_every_stage(name, tmp_path):
    torch.manual_seed(0)
    exits = create_backbone(name, 10, width=0.125).num_stages
    model = create_model(name, 6, exits=exits, width=0.125, head="lite").eval()
    staged_equals_full(model, torch.randn(2, 3, 32, 32))
    ckpt = checkpoint_for(model, {"arch": name, "width": 0.125, "exits": exits, "head": "lite"})
    result = export_and_check(ckpt, tmp_path / "b")
    assert result.manifest.num_exits == exits


@pytest.mark.parametrize(
    ("name", "exits"), [("vgg11_bn_g2", 2), ("vgg11_bn_g2", 3), ("vgg19_bn", 4), ("resnet18_g2", 2)]
)
def test_merged_stage_segments_export_with_parity(name, exits, tmp_path):
    """With fewer exits than stages the first segment runs several stages (VGG: up to four)."""
    torch.manual_seed(0)
    model = create_model(name, 6, exits=exits, width=0.125, head="attention").eval()
    staged_equals_full(model, torch.randn(2, 3, 32, 32))
    ckpt = checkpoint_for(model, {"arch": name, "width": 0.125, "exits": exits})
    assert export_and_check(ckpt, tmp_path / "b").manifest.num_exits == exits


def test_groups_flag_is_stored_and_rebuilt_by_export(tmp_path):
    torch.manual_seed(0)
    model = create_model("vgg11_bn", 6, exits=2, width=0.125, groups=4, head="pool").eval()
    ckpt = checkpoint_for(model, {"arch": "vgg11_bn", "width": 0.125, "exits": 2, "head": "pool",
                                  "groups": 4})  # fmt: skip
    export_and_check(ckpt, tmp_path / "b")


def test_groups_that_do_not_divide_or_a_backbone_without_groups_are_errors():
    with pytest.raises(ValueError, match="groups 3 do not divide 8 channels"):
        create_model("resnet18", 10, exits=2, width=0.125, groups=3)
    with pytest.raises(ValueError, match="mobilenetv2 takes no groups"):
        create_model("mobilenetv2", 10, exits=2, width=0.125, groups=2)
    with pytest.raises(ValueError, match="positive integer"):
        create_backbone("resnet18", 10, groups=0)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--groups", "3", "--width", "0.125"], "groups 3 do not divide 8 channels"),
        (["--groups", "2", "--arch", "mobilenetv2"], "takes no groups"),
        (["--groups", "0"], "positive integer"),
    ],
)
def test_cli_bad_groups_is_one_line_exit_2(tmp_path, capsys, args, needle):
    assert_train_refuses(tmp_path, capsys, args, needle)


def test_a_grouped_trelu_run_trains_and_exports_from_its_checkpoint(tmp_path):
    """config → engine → checkpoint → export: groups and act survive the whole chain."""
    from tests.arch_helpers import tiny_trainer
    from training.export import ExportOptions, build_model, export_checkpoint
    from training.models.activations import TReLU

    trainer = tiny_trainer(tmp_path / "run", arch="vgg11_bn", groups=2, act="trelu", exits=2)
    trainer.fit(max_steps=2, progress=False)
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    rebuilt = build_model(state)
    assert {c.groups for c in _convs(rebuilt.backbone.stages[4])} == {2}
    assert any(isinstance(m, TReLU) for m in rebuilt.heads[0].modules())
    export_checkpoint(
        tmp_path / "run" / "best.pt",
        tmp_path / "b",
        ExportOptions(exporter="torchscript", progress=False),
    )
