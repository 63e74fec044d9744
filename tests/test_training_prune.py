"""Structured L1 channel pruning (training.prune): real channel removal, exact weights, costs
as planned, bit-exact resume, export + tune + serve of a pruned run, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.arch_helpers import export_and_check, tiny_trainer
from tests.cli_helpers import assert_train_refuses
from training.costs import measure_costs
from training.models import create_model
from training.prune import (
    PruneError,
    channel_scores,
    plan_pruning,
    prune_network,
    prune_sites,
    site_widths,
)

ROOT = Path(__file__).resolve().parents[1]
PRUNABLE = ["resnet18", "resnet50", "resnet18_kl", "wide_resnet16_4", "vgg16_bn"]


def _build(arch: str, widths=None, exits: int = 3, head: str = "lite"):
    return create_model(arch, 7, exits=exits, width=0.25, head=head, widths=widths)


def _kill_channels(model: nn.Module, fraction: float) -> dict[str, set[int]]:
    """Make `fraction` of every site's channels dead (BN γ = β = 0, tiny producing filters),
    so they carry exactly 0 and score lowest. Returns the dead channel indices per site."""
    modules = dict(model.named_modules())
    dead: dict[str, set[int]] = {}
    gen = torch.Generator().manual_seed(0)
    for site, (producers, _) in prune_sites(model).items():
        width = site_widths(model)[site]
        n = width - max(1, int(round(width * (1 - fraction))))
        idx = torch.randperm(width, generator=gen)[:n]
        dead[site] = set(idx.tolist())
        with torch.no_grad():
            for path in producers:
                module = modules[path]
                if isinstance(module, nn.BatchNorm2d):
                    module.weight[idx] = 0.0
                    module.bias[idx] = 0.0
                elif module.groups == 1:
                    module.weight[idx] *= 1e-3
    return dead


def _randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)


@pytest.mark.parametrize("arch", PRUNABLE)
def test_pruning_removes_exactly_the_planned_channels_and_keeps_the_function(arch):
    """Dead channels (exactly zero after their BN) are the ones removed, so the smaller network
    computes what the original did; and it is a new module of fewer channels, not a mask."""
    torch.manual_seed(0)
    model = _build(arch).eval()
    _randomise_bn(model)
    dead = _kill_channels(model, 0.5)
    before = site_widths(model)
    plan = plan_pruning(model, 0.5)
    for site, kept in plan.kept.items():
        assert plan.widths[site] == max(1, round(before[site] * 0.5)) == len(kept)
        assert set(kept.tolist()) == set(range(before[site])) - dead[site]
    pruned = prune_network(model, plan, lambda w: _build(arch, w))
    assert site_widths(pruned) == plan.widths
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, got = model(x), pruned(x)
    for a, b in zip(want.logits, got.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    modules = dict(pruned.named_modules())
    for site, (producers, consumers) in prune_sites(pruned).items():
        for path in producers:
            m = modules[path]
            assert (m.out_channels if isinstance(m, nn.Conv2d) else m.num_features) == plan.widths[
                site
            ]
        for path in consumers:
            assert modules[path].in_channels == plan.widths[site]


def test_pruned_model_equals_a_fresh_model_of_the_pruned_shape_with_the_surviving_weights():
    """Hand-copied for ResNet18's basic blocks: conv1 rows, bn1 entries, conv2 columns."""
    torch.manual_seed(0)
    model = _build("resnet18").eval()
    _randomise_bn(model)
    plan = plan_pruning(model, 0.3)
    pruned = prune_network(model, plan, lambda w: _build("resnet18", w)).eval()
    fresh = _build("resnet18", plan.widths).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for site, kept in plan.kept.items():
        block = "backbone." + site.removesuffix(".mid")
        state[f"{block}.conv1.weight"] = state[f"{block}.conv1.weight"][kept]
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            state[f"{block}.bn1.{leaf}"] = state[f"{block}.bn1.{leaf}"][kept]
        state[f"{block}.conv2.weight"] = state[f"{block}.conv2.weight"][:, kept]
    fresh.load_state_dict(state)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(fresh(x).logits, pruned(x).logits, strict=True):
            assert torch.equal(a, b)


def test_the_lowest_scored_channels_go_and_the_score_is_filter_l1_plus_bn_gamma():
    torch.manual_seed(0)
    model = _build("resnet18").eval()
    block = model.backbone.stages[1][0]
    site = "backbone.stages.1.0.mid"
    scores = channel_scores(model)["stages.1.0.mid"]
    l1 = block.conv1.weight.detach().abs().flatten(1).sum(1)
    gamma = block.bn1.weight.detach().abs()
    assert torch.allclose(scores, l1 / l1.mean() + gamma / gamma.mean())
    plan = plan_pruning(model, 0.25)
    kept = plan.kept["stages.1.0.mid"]
    dropped = sorted(set(range(len(scores))) - set(kept.tolist()))
    assert max(scores[dropped]) <= min(scores[kept])
    assert site.removeprefix("backbone.") in plan.widths


def test_parameters_and_macs_drop_as_planned():
    """ResNet18: each removed inner channel of a basic block takes conv1's filter (in·9), its
    BN pair and conv2's input column (out·9) with it; the residual widths stay."""
    torch.manual_seed(0)
    model = _build("resnet18")
    plan = plan_pruning(model, 0.5)
    pruned = prune_network(model, plan, lambda w: _build("resnet18", w))
    before, after = measure_costs(model, (3, 32, 32)), measure_costs(pruned, (3, 32, 32))
    want = 0
    modules = dict(model.named_modules())
    for site, removed in plan.removed(site_widths(model)).items():
        conv1 = modules[f"backbone.{site.removesuffix('.mid')}.conv1"]
        conv2 = modules[f"backbone.{site.removesuffix('.mid')}.conv2"]
        want += removed * (conv1.in_channels * 9 + 2 + conv2.out_channels * 9)
    assert before.backbone_params - after.backbone_params == want
    assert after.backbone_params / before.backbone_params == pytest.approx(0.51, abs=0.02)
    assert after.backbone_macs / before.backbone_macs == pytest.approx(0.51, abs=0.02)
    assert after.head_macs[:-1] == before.head_macs[:-1]  # stage widths kept: same heads
    assert pruned.backbone.stage_channels == model.backbone.stage_channels


def test_kept_widths_round_to_a_multiple_and_the_best_channels_stay():
    """ResNet18 x0.25 inner widths 16, 32, 64, 128; 30 % off keeps 11, 22, 45, 90 — rounded
    to multiples of 8: 8, 24, 48, 88. A site narrower than the multiple keeps its width."""
    torch.manual_seed(0)
    model = _build("resnet18")
    exact = plan_pruning(model, 0.3)
    rounded = plan_pruning(model, 0.3, round_to=8)
    by_width = {site_widths(model)[s]: w for s, w in rounded.widths.items()}
    assert {site_widths(model)[s]: w for s, w in exact.widths.items()} == {
        16: 11,
        32: 22,
        64: 45,
        128: 90,
    }
    assert by_width == {16: 8, 32: 24, 64: 48, 128: 88}
    # The same ranking: a rounded plan keeps a prefix of the scores' order.
    scores = channel_scores(model)
    for site, kept in rounded.kept.items():
        ranked = torch.sort(scores[site], descending=True, stable=True).indices
        assert set(kept.tolist()) == set(ranked[: len(kept)].tolist())
    wide = plan_pruning(model, 0.9, round_to=32)  # 16-wide sites cannot drop to a multiple
    assert {site_widths(model)[s]: w for s, w in wide.widths.items()}[16] == 16
    with pytest.raises(PruneError, match="prune_round_to"):
        plan_pruning(model, 0.3, round_to=0)


def test_pruning_refuses_what_it_cannot_rebuild():
    with pytest.raises(PruneError, match="prune ratio must be in"):
        plan_pruning(_build("resnet18"), 1.0)
    with pytest.raises(PruneError, match="no channel sites"):
        plan_pruning(create_model("mobilenetv2", 5, exits=2, width=0.125), 0.5)
    grouped = create_model("resnet18", 5, exits=2, width=0.25, groups=2)
    with pytest.raises(PruneError, match="grouped convolution"):
        plan_pruning(grouped, 0.5)
    with pytest.raises(ValueError, match="widths name no prunable site"):
        _build("resnet18", {"stages.9.0.mid": 3})
    with pytest.raises(ValueError, match="cannot be rebuilt pruned"):
        create_model("mobilenetv2", 5, exits=2, widths={"x": 1})


# ----------------------------------------------------------------------------- training


def test_iterative_pruning_during_early_epochs(tmp_path):
    """Seed 000: rounds before epochs 1 and 2; the widths shrink twice, the costs follow and
    the checkpoint rebuilds through export."""
    trainer = tiny_trainer(tmp_path, prune_ratio=0.5, prune_epochs=(1, 2), epochs=3)
    full = site_widths(trainer.model)
    trainer.fit(progress=False)
    assert trainer.pruned_epochs == [1, 2]
    assert trainer.widths == {k: max(1, round(round(v * 0.5) * 0.5)) for k, v in full.items()}
    costs = json.loads((tmp_path / "costs.json").read_text())
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["widths"] == trainer.widths and state["pruned_epochs"] == [1, 2]
    assert costs["backbone_params"] == state["costs"]["backbone_params"]
    assert (
        costs["backbone_params"]
        < 0.5 * measure_costs(_build_like(trainer), (3, 16, 16)).backbone_params
    )
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["widths"] == trainer.widths  # best.pt is picked after the last round
    export_and_check(best, tmp_path / "bundle")


def _build_like(trainer):
    return trainer.create_network()


@pytest.mark.parametrize("stop_at", [3, 5])  # before and after the round at step 4
def test_a_pruned_run_resumes_bit_exactly(tmp_path, stop_at):
    kw = {"prune_ratio": 0.4, "prune_epochs": (1,), "ema_decay": 0.9}
    straight = tiny_trainer(tmp_path / "a", **kw)
    straight.fit(max_steps=7, progress=False)
    first = tiny_trainer(tmp_path / "b", **kw)
    first.fit(max_steps=stop_at, progress=False)
    resumed = tiny_trainer(tmp_path / "b", **kw)
    assert resumed.resume()
    resumed.fit(max_steps=7, progress=False)
    assert resumed.widths == straight.widths and resumed.widths
    for a_mod, b_mod in [
        (straight.model, resumed.model),
        (straight.eval_model, resumed.eval_model),
    ]:
        a, b = a_mod.state_dict(), b_mod.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert all(
        torch.equal(oa["state"][k]["momentum_buffer"], ob["state"][k]["momentum_buffer"])
        for k in oa["state"]
    )


def test_a_trained_model_pruned_then_fine_tuned(tmp_path):
    """Seed 004 §4.6: --init a trained multi-exit model with its heads, prune before the first
    epoch, fine-tune. The surviving weights are the trained ones; the heads (whose widths the
    block-internal pruning leaves alone) carry over whole."""
    from training.engine import InitError

    sd = tiny_trainer(tmp_path / "sd")
    sd.fit(max_steps=2, progress=False)
    trained = sd.model.state_dict()
    init = str(tmp_path / "sd" / "best.pt")
    tuned = tiny_trainer(tmp_path / "tuned", init=init, init_heads=True, prune_ratio=0.5,
                         prune_epochs=(0,))  # fmt: skip
    tuned.prune()  # what fit does before epoch 0
    conv = tuned.model.backbone.stages[0][0].conv1.weight.detach()
    full = trained["backbone.stages.0.0.conv1.weight"]
    assert conv.shape[0] == round(full.shape[0] * 0.5)
    assert all(any(torch.equal(row, other) for other in full) for row in conv)
    heads = tuned.model.heads.state_dict()
    assert all(torch.equal(v, trained[f"heads.{k}"]) for k, v in heads.items())
    tuned.fit(max_steps=2, progress=False)
    assert tuned.pruned_epochs == [0]
    with pytest.raises(InitError, match="exit heads of .* do not fit this run's 3 attention"):
        tiny_trainer(tmp_path / "other", init=init, init_heads=True, head="attention")


def test_a_pruned_run_exports_tunes_and_serves(tmp_path, capsys):
    from serving.runtime import EarlyExitRuntime
    from tests.data_fixtures import write_tiny_cifar10
    from thresholds.cli import main as tune_main

    data = tmp_path / "data"
    write_tiny_cifar10(data, per_batch=20)
    run = tmp_path / "run"
    proc = _cli("--out", str(run), "--data-dir", str(data), "--width", "0.125", "--exits", "3",
                "--head", "lite", "--epochs", "2", "--batch-size", "8", "--val-size", "20",
                "--prune-ratio", "0.5", "--prune-epochs", "1", "--threads", "1", "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    state = torch.load(run / "best.pt", weights_only=False)
    assert state["widths"] and state["pruned_epochs"] == [1]
    bundle = tmp_path / "bundle"
    proc = subprocess.run(
        [sys.executable, "-m", "training.export_cli", "--checkpoint", str(run / "best.pt"),
         "--out", str(bundle), "--exporter", "torchscript", "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["full_model"]["macs"] == state["costs"]["backbone_macs"]
    code = tune_main(["--bundle", str(bundle), "--dataset", "cifar10", "--data-dir", str(data),
                      "--split", "test", "--max-drop", "0", "--generations", "5",
                      "--population", "10", "--grid-steps", "5", "--threads", "1", "--json", "-q"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and len(json.loads(out)["thresholds"]) == 3
    runtime = EarlyExitRuntime(bundle, intra_op_threads=1)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    result = runtime.classify(runtime.preprocess(images))
    assert len(result.labels) == 4


# ----------------------------------------------------------------------------- bad input


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.cli", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--prune-ratio", "1.5", "--prune-epochs", "1"], "prune_ratio must be in (0, 1)"),
        (["--prune-ratio", "0", "--prune-epochs", "1"], "prune_ratio must be in (0, 1)"),
        (["--prune-ratio", "0.5"], "needs prune_epochs"),
        (["--prune-ratio", "0.5", "--prune-epochs", "2,1"], "must increase strictly"),
        (["--prune-ratio", "0.5", "--prune-epochs", "1", "--arch", "mobilenetv2"],
         "pruning cannot rebuild mobilenetv2"),
        (["--prune-ratio", "0.5", "--prune-epochs", "1", "--arch", "resnet18_g2"],
         "pruning cannot rebuild resnet18_g2"),
        (["--prune-ratio", "0.5", "--prune-epochs", "1", "--groups", "2"], "grouped convolutions"),
        (["--prune-ratio", "0.5", "--prune-epochs", "1", "--prune-round-to", "0"],
         "prune_round_to must be a positive integer"),
        (["--prune-round-to", "8"], "prune_round_to applies only with prune_ratio"),
    ],
)  # fmt: skip
def test_cli_bad_pruning_is_one_line_exit_2(tmp_path, capsys, args, needle):
    assert_train_refuses(tmp_path, capsys, args, needle)


def test_wide_resnet40_2_builds_exports_and_prunes(tmp_path):
    """Seed 004 §4.6's network: 3 stages of 6 blocks, widths 32/64/128, 2.2 M parameters."""
    from tests.arch_helpers import checkpoint_for
    from training.models import create_backbone

    net = create_backbone("wide_resnet40_2", 10)
    assert [len(s) for s in net.stages] == [6, 6, 8]  # + the closing BN-ReLU
    assert net.stage_channels == [32, 64, 128]
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(2.24e6, rel=0.01)
    torch.manual_seed(0)
    model = create_model("wide_resnet40_2", 6, exits=3, width=0.25, head="lite").eval()
    plan = plan_pruning(model, 0.5)
    assert len(plan.widths) == 18  # one inner width per block
    pruned = prune_network(
        model,
        plan,
        lambda w: create_model("wide_resnet40_2", 6, exits=3, width=0.25, head="lite", widths=w),
    ).eval()
    ckpt = checkpoint_for(pruned, {"arch": "wide_resnet40_2", "width": 0.25, "exits": 3,
                                   "head": "lite"})  # fmt: skip
    ckpt["widths"] = plan.widths
    export_and_check(ckpt, tmp_path / "b")


def test_a_vgg_layer_an_exit_reads_keeps_its_width(tmp_path):
    """An exit after the first of VGG13's two module-1 layers reads that layer's output: its
    channels stay, the other inner layers are pruned, and the result exports with parity."""
    from tests.arch_helpers import checkpoint_for

    torch.manual_seed(0)

    def build(widths=None):
        return create_model("vgg13_bn", 6, exits=3, exit_blocks=(1, 4), width=0.25, head="lite",
                            widths=widths)  # fmt: skip

    model = build().eval()
    sites = prune_sites(model)
    assert "stages.0.0.out" not in sites  # exit 1 follows layer1.0, inside module 1
    assert "stages.1.0.out" in sites  # exit 2 follows layer2.1, the module's end
    plan = plan_pruning(model, 0.5)
    pruned = prune_network(model, plan, build).eval()
    ckpt = checkpoint_for(pruned, {"arch": "vgg13_bn", "width": 0.25, "exits": 3,
                                   "exit_blocks": [1, 4], "head": "lite"})  # fmt: skip
    ckpt["widths"] = plan.widths
    export_and_check(ckpt, tmp_path / "b")
