import pytest
import torch

import training
from training.models import UnknownModelError, create_backbone, create_model, stage_groups
from training.models.exits import EXIT_HEADS, AttentionModule, LiteExit, ShallowExit


def _arch_exits():
    for name in training.list_models():
        stages = create_backbone(name, 10, width=0.125).num_stages
        for k in range(1, stages + 1):
            yield name, k


@pytest.mark.parametrize(("arch", "exits"), list(_arch_exits()))
def test_every_arch_and_exit_count_builds_and_staged_equals_full(arch, exits):
    torch.manual_seed(0)
    model = create_model(arch, 7, exits=exits, width=0.125).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert len(out.logits) == exits and len(out.features) == exits
        for logits, feat in zip(out.logits, out.features, strict=True):
            assert logits.shape == (2, 7)
            assert feat.shape == (2, model.backbone.feature_dim)
        feats = x
        for k in range(1, exits + 1):
            feats, logits = model.forward_stage(k, feats)
            assert torch.equal(logits, out.logits[k - 1])
        assert torch.equal(model.forward_backbone(x), out.logits[-1])


@pytest.mark.parametrize("head", sorted(EXIT_HEADS))
def test_every_exit_head_keeps_staged_equal_to_full(head):
    torch.manual_seed(0)
    model = create_model("resnet18", 10, exits=4, width=0.125, head=head).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        feats = x
        for k in range(1, 5):
            feats, logits = model.forward_stage(k, feats)
            assert torch.equal(logits, out.logits[k - 1])
    # Every head ends in the deepest width, so the L2 hint compares like with like.
    assert {tuple(f.shape) for f in out.features} == {(3, model.backbone.feature_dim)}
    assert all(isinstance(h, EXIT_HEADS[head]) for h in model.heads[:-1])


def test_lite_heads_have_fewer_layers_and_macs_than_the_seed_heads():
    from training.costs import measure_costs

    seed = create_model("resnet18", 10, exits=4, width=0.25, head="attention")
    lite = create_model("resnet18", 10, exits=4, width=0.25, head="lite")
    assert isinstance(lite.heads[0], LiteExit)

    def convs(head):
        return sum(isinstance(m, torch.nn.Conv2d) for m in head.modules())

    for k in range(3):
        # one depthwise-pointwise pair per halving against two, plus the attention's pair
        assert convs(lite.heads[k]) == 2 * (3 - k)
        assert convs(seed.heads[k]) == 4 * (3 - k) + 2
    seed_macs = measure_costs(seed, (3, 32, 32)).segment_macs
    lite_macs = measure_costs(lite, (3, 32, 32)).segment_macs
    assert all(a < b for a, b in zip(lite_macs[:3], seed_macs[:3], strict=True))
    assert lite_macs[3] == seed_macs[3]  # exit K is the backbone's own head in both


def test_pool_heads_have_no_convolution_and_almost_no_macs():
    from training.costs import measure_costs

    pool = create_model("resnet18", 10, exits=4, width=0.25, head="pool")
    lite = create_model("resnet18", 10, exits=4, width=0.25, head="lite")
    for head in pool.heads[:3]:
        assert not any(isinstance(m, torch.nn.Conv2d) for m in head.modules())
    pool_costs = measure_costs(pool, (3, 32, 32))
    lite_costs = measure_costs(lite, (3, 32, 32))
    head_macs = sum(pool_costs.head_macs[:3])
    # two small FC layers per exit: under 0.1 % of the model, a twentieth of the lite heads'
    assert 0 < head_macs < 0.001 * pool_costs.backbone_macs
    assert head_macs < sum(lite_costs.head_macs[:3]) / 20


def test_unknown_exit_head_lists_valid_names():
    with pytest.raises(ValueError, match="attention, lite, pool"):
        create_model("resnet18", 10, exits=4, width=0.125, head="transformer")


def test_imagenet_stem_and_width_multiplier():
    small = create_model("resnet18", 10, exits=4, width=0.25)
    full = create_model("resnet18", 10, exits=4, width=0.5, stem="imagenet")
    assert small.backbone.stage_channels == [16, 32, 64, 128]
    assert full.backbone.stage_channels == [32, 64, 128, 256]
    with torch.no_grad():
        out = full.eval()(torch.randn(1, 3, 64, 64))
    assert out.logits[-1].shape == (1, 10)
    # ImageNet stem: stride-2 conv + max-pool
    assert isinstance(full.backbone.stem[-1], torch.nn.MaxPool2d)


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownModelError, match="resnet18"):
        create_model("resnet9000", 10)


def test_too_many_exits_is_an_error():
    with pytest.raises(ValueError, match="exits must be in 1..3"):
        create_model("wide_resnet16_4", 10, exits=4, width=0.125)


def test_stage_groups_merge_the_first_stages():
    assert stage_groups(4, 4) == [[0], [1], [2], [3]]
    assert stage_groups(4, 2) == [[0, 1, 2], [3]]
    assert stage_groups(4, 1) == [[0, 1, 2, 3]]


def test_shallow_exit_halves_resolution_per_block_and_reaches_deepest_width():
    head = ShallowExit([16, 32, 64, 128], num_classes=10)
    assert len(head.align) == 3  # N_i = K - i blocks for exit 1 of 4
    x = torch.randn(2, 16, 32, 32)
    assert head.align(head.attention(x)).shape == (2, 128, 4, 4)
    feat, logits = head(x)
    assert feat.shape == (2, 128) and logits.shape == (2, 10)


def test_attention_mask_is_a_sigmoid_gate():
    att = AttentionModule(8).eval()
    x = torch.rand(1, 8, 9, 9) + 0.1  # odd size: upsampling must restore it exactly
    y = att(x)
    assert y.shape == x.shape
    ratio = y / x
    assert bool(((ratio > 0) & (ratio < 1)).all())
