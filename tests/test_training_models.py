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
    with pytest.raises(ValueError, match="attention, ckdf, lite, pool"):
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


# ----------------------------------------------------------------------------- exits at any block


def test_resnet18_block_names_and_parsing():
    from training.models import block_names, parse_exit_blocks

    names = block_names("resnet18")
    assert names == [f"layer{s}.{j}" for s in range(1, 5) for j in range(2)]
    assert parse_exit_blocks("1,2,3,5,7", "resnet18") == (1, 2, 3, 5, 7)
    assert parse_exit_blocks("layer1.0,layer2.1,8", "resnet18") == (1, 4)  # last block implied
    for spec, needle in [
        ("0,3", "outside"),
        ("3,9", "outside"),
        ("3,2", "strictly increasing"),
        ("2,2", "strictly increasing"),
        ("layer9.0", "no block of resnet18"),
        ("", "no block"),
    ]:
        with pytest.raises(ValueError, match=needle):
            parse_exit_blocks(spec, "resnet18")


@pytest.mark.parametrize(
    ("arch", "blocks"),
    [("resnet18", (1, 2, 3, 5, 7)), ("wide_resnet16_4", (1, 3, 5)), ("mobilenetv2", (2, 6, 11))],
)
@pytest.mark.parametrize("head", ["lite", "attention", "pool"])
def test_exits_at_any_block_build_and_staged_equals_full(arch, blocks, head):
    from training.models import block_names

    torch.manual_seed(0)
    model = create_model(arch, 5, exits=len(blocks) + 1, exit_blocks=blocks, head=head, width=0.125)
    model.eval()
    names = block_names(arch)
    assert model.exit_points == tuple(names[b - 1] for b in blocks) + (names[-1],)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert len(out.logits) == len(blocks) + 1
        assert {tuple(f.shape) for f in out.features} == {(2, model.backbone.feature_dim)}
        feats = x
        for k in range(1, model.num_exits + 1):
            feats, logits = model.forward_stage(k, feats)
            assert torch.equal(logits, out.logits[k - 1])
        assert torch.equal(model.forward_backbone(x), out.logits[-1])
    # Every backbone module runs in exactly one segment.
    seen = [id(m) for k in range(1, model.num_exits + 1) for m in model.segment_modules(k)]
    assert len(seen) == len(set(seen))


def test_stage_end_exits_are_the_same_network_as_before():
    """exit_blocks at the stage ends build the very same state dict as the default."""
    torch.manual_seed(0)
    default = create_model("resnet18", 10, exits=4, width=0.125, head="lite")
    torch.manual_seed(0)
    blocks = create_model("resnet18", 10, exits=4, width=0.125, head="lite", exit_blocks=(2, 4, 6))
    a, b = default.state_dict(), blocks.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert default.exit_points == ("layer1.1", "layer2.1", "layer3.1", "layer4.1")


def test_block_exit_costs_add_up():
    from training.costs import measure_costs

    model = create_model(
        "resnet18", 10, exits=6, width=0.25, head="lite", exit_blocks=(1, 2, 3, 5, 7)
    )
    costs = measure_costs(model, (3, 32, 32))
    assert sum(costs.stage_macs) + costs.head_macs[-1] == costs.backbone_macs
    assert costs.exit_path_macs == sorted(costs.exit_path_macs)
    assert costs.exit_path_params[-1] == sum(p.numel() for p in model.backbone.parameters())


def test_block_exits_export_with_parity_and_serve(tmp_path):
    """One segment per stretch between exits; the runtime answers with K = 4 exits."""
    import numpy as np

    from core.bundle import load_manifest
    from serving.runtime import EarlyExitRuntime
    from training.export import ExportOptions, export_bundle

    torch.manual_seed(0)
    model = create_model("resnet18", 10, exits=4, width=0.125, head="lite", exit_blocks=(1, 3, 6))
    model.eval()
    result = export_bundle(
        model, tmp_path / "b", classes=[str(i) for i in range(10)], input_shape=(3, 32, 32),
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
        options=ExportOptions(exporter="torchscript", progress=False),
    )  # fmt: skip
    assert all(c.probs_max_abs_diff is None or c.probs_max_abs_diff < 1e-4 for c in result.checks)
    manifest = load_manifest(tmp_path / "b")
    assert manifest.exit_points == ("layer1.0", "layer2.0", "layer3.1", "layer4.1")
    assert manifest.num_exits == 4
    runtime = EarlyExitRuntime(tmp_path / "b", intra_op_threads=1)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    batch = runtime.preprocess(images)
    full = runtime.classify(batch, thresholds=[1.0, 1.0, 1.0, 0.0])
    with torch.no_grad():
        want = model(torch.from_numpy(batch)).logits[-1].argmax(1).numpy()
    assert np.array_equal(full.labels, want) and set(full.exits.tolist()) == {4}
