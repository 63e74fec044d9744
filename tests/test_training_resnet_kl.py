"""ResNet-KL (seed 000): SepConv residual blocks, Mul Block, ST layer, eq. 2 + feature loss,
and CutMix with mixed targets in every loss."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.arch_helpers import checkpoint_for, export_and_check, staged_equals_full, tiny_trainer
from training.config import TrainConfig
from training.data import BatchLoader, apply_cutmix, cutmix, cutmix_box
from training.data.loader import AugmentConfig
from training.losses import LossInputs, TeacherOutputs, create_loss, list_losses
from training.models import create_backbone, create_model
from training.models.activations import TReLU
from training.models.resnet_kl import MulBlock, SepBasicBlock, SqueezeExcite

# ----------------------------------------------------------------------------- blocks


@pytest.mark.parametrize(("stride", "in_ch", "ch"), [(1, 8, 8), (2, 8, 16)])
@pytest.mark.parametrize("block", [SepBasicBlock, MulBlock])
def test_blocks_keep_or_halve_the_resolution_and_set_the_width(block, stride, in_ch, ch):
    out = block(in_ch, ch, stride).eval()(torch.randn(2, in_ch, 12, 12))
    assert out.shape == (2, ch, 12 // stride, 12 // stride)


def test_sep_block_convolutions_are_depthwise_then_pointwise():
    block = SepBasicBlock(8, 16, 2)
    assert block.dw1.groups == 8 and block.dw1.stride == (2, 2) and block.dw1.kernel_size == (3, 3)
    assert block.pw1.kernel_size == (1, 1) and block.pw1.out_channels == 16
    assert block.dw2.groups == 16 and block.pw2.kernel_size == (1, 1)
    assert isinstance(block.act, TReLU)
    # a narrower inside (what pruning builds) keeps the block's output width
    thin = SepBasicBlock(8, 16, 1, mid=5)
    assert thin.pw1.out_channels == 5 and thin.dw2.groups == 5
    assert thin(torch.randn(1, 8, 6, 6)).shape == (1, 16, 6, 6)


def test_mul_block_is_multi_scale_and_fuses_the_attention_with_itself():
    torch.manual_seed(0)
    block = MulBlock(8, 8, 1).eval()
    assert [c.kernel_size for c in block.scales] == [(3, 3), (5, 5), (7, 7)]
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        r = block.residual(x)
        want = block.act(r + r * block.attention(r) + x)
        assert torch.allclose(block(x), want)
        # the multi-scale front is the sum of the three depthwise kernels' outputs
        multi = sum(conv(x) for conv in block.scales)
        assert torch.allclose(
            block.bn2(block.pw2(block.dw2(block.act(block.bn1(block.pw1(multi)))))), r
        )


def test_squeeze_excite_gives_a_channel_gate_in_0_1():
    gate = SqueezeExcite(16)(torch.randn(3, 16, 5, 5))
    assert gate.shape == (3, 16, 1, 1) and bool(((gate > 0) & (gate < 1)).all())


def test_resnet18_kl_layout():
    net = create_backbone("resnet18_kl", 10)
    assert net.stage_channels == [64, 128, 256, 512]
    for stage in net.stages:
        assert [type(b) for b in stage] == [SepBasicBlock, MulBlock]
    acts = {type(m) for m in net.modules() if isinstance(m, nn.ReLU | TReLU)}
    assert acts == {TReLU}  # T-ReLU by default; --act relu swaps it
    relu = create_backbone("resnet18_kl", 10, act="relu")
    assert {type(m) for m in relu.modules() if isinstance(m, nn.ReLU | TReLU)} == {nn.ReLU}
    # depthwise-separable blocks: far fewer weights than ResNet18
    params = sum(p.numel() for p in net.parameters())
    plain = sum(p.numel() for p in create_backbone("resnet18", 10).parameters())
    assert params < 0.2 * plain


# ----------------------------------------------------------------------------- ST layer


@pytest.mark.parametrize("head", ["st", "lite", "attention"])
def test_st_maps_have_the_deepest_maps_shape_and_change_nothing_else(head):
    torch.manual_seed(0)
    model = create_model("resnet18_kl", 5, exits=4, width=0.125, head=head).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        out = model(x, with_maps=True)
    assert plain.maps is None and len(out.maps) == 4
    deepest = out.maps[-1]
    assert deepest.shape == (2, 64, 4, 4)
    assert all(m.shape == deepest.shape for m in out.maps)
    for a, b in zip(plain.logits, out.logits, strict=True):
        assert torch.equal(a, b)


def test_st_head_walks_sepconv_halvings_to_the_deepest_width():
    from training.models.exits import SepConv, STExit

    head = STExit([16, 32, 64, 128], 10)
    assert [type(m) for m in head.align] == [SepConv] * 3
    feat, logits, fmap = head(torch.randn(2, 16, 32, 32), with_map=True)
    assert fmap.shape == (2, 128, 4, 4) and feat.shape == (2, 128) and logits.shape == (2, 10)


def test_a_head_without_a_map_is_refused_for_the_map_loss():
    model = create_model("resnet18_kl", 5, exits=2, width=0.125, head="pool")
    with pytest.raises(ValueError, match="no aligned map"):
        model(torch.randn(1, 3, 32, 32), with_maps=True)
    with pytest.raises(ValueError, match="compares feature maps; head 'pool' has none"):
        TrainConfig(loss="resnet_kl", head="pool").validate()


@pytest.mark.parametrize(("exits", "head"), [(4, "st"), (2, "st"), (3, "attention")])
def test_resnet18_kl_exports_with_parity(tmp_path, exits, head):
    torch.manual_seed(0)
    model = create_model("resnet18_kl", 6, exits=exits, width=0.125, head=head).eval()
    staged_equals_full(model, torch.randn(2, 3, 32, 32))
    ckpt = checkpoint_for(model, {"arch": "resnet18_kl", "width": 0.125, "exits": exits,
                                  "head": head})  # fmt: skip
    assert export_and_check(ckpt, tmp_path / "b").manifest.num_exits == exits


# ----------------------------------------------------------------------------- loss (eq. 2)


@pytest.fixture
def maps_batch():
    torch.manual_seed(0)
    logits = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    maps = [torch.randn(4, 6, 2, 2, requires_grad=True) for _ in range(3)]
    target = torch.tensor([0, 1, 2, 4])
    return logits, maps, target


def test_resnet_kl_loss_matches_eq_2_plus_feature_mse(maps_batch):
    logits, maps, target = maps_batch
    x, lam = 0.4, 0.7
    loss = create_loss("resnet_kl", alpha=x, lam=lam)
    terms = loss(logits, maps, target)
    with torch.no_grad():
        last = F.softmax(logits[-1], dim=1).detach()
        want = float(F.cross_entropy(logits[-1], target))
        for i in range(2):
            soft_ce = float(-(last * F.log_softmax(logits[i], dim=1)).sum(1).mean())
            want += x * soft_ce + (1 - x) * float(F.cross_entropy(logits[i], target))
            want += lam * float(((maps[i] - maps[-1]) ** 2).mean())
    assert float(terms.total.detach()) == pytest.approx(want, rel=1e-6)
    terms.total.backward()
    # the deepest map and logits are teachers for the distillation terms: the deepest map
    # gets no gradient from the feature loss (detached), the deepest logits only their CE's
    assert maps[-1].grad is None
    ce_only = torch.autograd.grad(F.cross_entropy(logits[-1], target), logits[-1])[0]
    assert torch.allclose(logits[-1].grad, ce_only)


def test_resnet_kl_loss_pools_a_larger_st_map_to_the_deepest_size():
    torch.manual_seed(0)
    logits = [torch.randn(2, 3) for _ in range(2)]
    big, deep = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2)
    terms = create_loss("resnet_kl", alpha=0.0, lam=1.0)(logits, [big, deep], torch.tensor([0, 1]))
    assert float(terms.feature) == pytest.approx(float(F.mse_loss(F.avg_pool2d(big, 2), deep)))


def test_resnet_kl_weights_off_and_bad_weights():
    logits = [torch.randn(2, 3) for _ in range(2)]
    maps = [torch.randn(2, 4, 2, 2) for _ in range(2)]
    y = torch.tensor([0, 1])
    terms = create_loss("resnet_kl", alpha=0.5, lam=1.0)(logits, maps, y, alpha=0.0, lam=0.0)
    assert float(terms.kl) == 0.0 and float(terms.feature) == 0.0
    want = F.cross_entropy(logits[0], y) + F.cross_entropy(logits[1], y)
    assert float(terms.total) == pytest.approx(float(want))
    with pytest.raises(ValueError, match=r"alpha \(eq. 2's x\) must be in \[0, 1\]"):
        create_loss("resnet_kl", alpha=1.5)
    with pytest.raises(ValueError, match="temperature do"):  # T is not eq. 2's
        TrainConfig(loss="resnet_kl", head="st", temperature=2.0).validate()


# ----------------------------------------------------------------------------- CutMix


def test_cutmix_targets_by_hand_on_a_tiny_batch():
    """Two 4×4 images (all 0, all 1), labels 0 and 2 of 3 classes, λ = 0.75 at the centre:
    a 2×2 box (a quarter of the pixels) swaps, so each row keeps 3/4 of its own label."""
    x = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    labels = torch.tensor([0, 2])
    box = cutmix_box(4, 4, 0.75, 2, 2)
    assert box == (1, 3, 1, 3)
    mixed, target = apply_cutmix(x, F.one_hot(labels, 3).float(), torch.tensor([1, 0]), box)
    assert torch.equal(target, torch.tensor([[0.75, 0.0, 0.25], [0.25, 0.0, 0.75]]))
    assert float(mixed[0].sum()) == 4.0 and float(mixed[1].sum()) == 12.0
    assert torch.equal(mixed[0, 0, 1:3, 1:3], torch.ones(2, 2))
    assert torch.equal(mixed[1, 0, 1:3, 1:3], torch.zeros(2, 2))
    # a box cut by the border is clipped, and the label share follows the pixels pasted
    assert cutmix_box(4, 4, 0.75, 0, 0) == (0, 1, 0, 1)


def test_cutmix_label_share_equals_the_pasted_pixel_share():
    n, c = 6, 4
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 8, 8).clone()
    labels = torch.arange(n) % c
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        mixed, target = cutmix(x, labels, c, gen, prob=1.0)
        assert torch.allclose(target.sum(1), torch.ones(n))
        for i in range(n):
            own = float((mixed[i] == i).float().mean())
            assert float(target[i, labels[i]]) >= own - 1e-6  # partner may share the label
            if own < 1.0:
                partner = int(mixed[i][mixed[i] != i][0])
                if labels[partner] != labels[i]:
                    assert float(target[i, labels[i]]) == pytest.approx(own)
                    assert float(target[i, labels[partner]]) == pytest.approx(1 - own)
    unmixed, onehot = cutmix(x, labels, c, gen, prob=0.0)
    assert unmixed is x and torch.equal(onehot, F.one_hot(labels, c).float())


def test_loader_with_cutmix_yields_probability_targets_reproducibly():
    from tests.arch_helpers import tiny_arrays

    data = tiny_arrays(16, 0)

    def batches():
        loader = BatchLoader(data, 8, (0.5,) * 3, (0.25,) * 3, train=True,
                             augment=AugmentConfig(cutmix=1.0), seed=1)  # fmt: skip
        return list(loader.epoch(0))

    first, again = batches(), batches()
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert ya.shape == (8, 4) and ya.dtype == torch.float32
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.allclose(ya.sum(1), torch.ones(8))


@pytest.mark.parametrize("name", list_losses())
def test_every_loss_takes_mixed_targets_as_the_mix_of_its_labels(name):
    """Every term is linear in the target: loss(λ·a + (1−λ)·b) = λ·loss(a) + (1−λ)·loss(b)."""
    torch.manual_seed(0)
    k = 1 if name == "baseline" else 3
    logits = [torch.randn(4, 5) for _ in range(k)]
    feats = [torch.randn(4, 6, 2, 2) for _ in range(k)]
    if name not in ("resnet_kl", "sfr"):  # the map losses take the maps
        feats = [f.flatten(1) for f in feats]
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 4, 0, 1])
    lam = 0.3
    mixed = lam * F.one_hot(a, 5).float() + (1 - lam) * F.one_hot(b, 5).float()
    kwargs = {"label_smoothing": 0.1}
    if name == "resnet_kl":
        kwargs["lam"] = 0.5
    if name == "sfr":
        kwargs["feature_dim"] = 6
    teacher = TeacherOutputs(torch.randn(4, 5), stage_maps=[torch.randn(4, 6, 2, 2)])
    stage_maps = [torch.randn(4, 3, 2, 2)]

    def total(target: torch.Tensor) -> float:
        # A fresh loss per call (stateful losses, dsr, compare with the previous call), its
        # parameters (sfr's projections) initialised alike.
        torch.manual_seed(1)
        inputs = LossInputs(
            logits, feats, target, maps=feats, stage_maps=stage_maps, teacher=teacher
        )
        return float(create_loss(name, **kwargs)(inputs).total.detach())

    assert total(mixed) == pytest.approx(lam * total(a) + (1 - lam) * total(b), rel=1e-5)
    # one-hot rows are the labels themselves
    assert total(F.one_hot(a, 5).float()) == pytest.approx(total(a), rel=1e-5)


# ----------------------------------------------------------------------------- training


def test_resnet_kl_with_cutmix_trains_resumes_bit_exactly_and_exports(tmp_path):
    kw = {"arch": "resnet18_kl", "loss": "resnet_kl", "head": "st", "lam": 1.0, "alpha": 0.5,
          "cutmix": 0.5, "exits": 4}  # fmt: skip
    straight = tiny_trainer(tmp_path / "a", **kw)
    stats = straight.train_step(*next(iter(straight.train_loader.epoch(0))))
    assert stats["feature"] > 0 and stats["kl"] > 0
    straight = tiny_trainer(tmp_path / "a2", **kw)
    straight.fit(max_steps=3, progress=False)
    first = tiny_trainer(tmp_path / "b", **kw)
    first.fit(max_steps=2, progress=False)
    resumed = tiny_trainer(tmp_path / "b", **kw)
    assert resumed.resume()
    resumed.fit(max_steps=3, progress=False)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    from training.export import ExportOptions, export_checkpoint

    export_checkpoint(tmp_path / "b" / "best.pt", tmp_path / "bundle",
                      ExportOptions(exporter="torchscript", progress=False))  # fmt: skip
