"""training.soup / earlyexit-soup: weight averaging of networks on their folded (eval-mode)
layers, with BatchNorm left as the exact average (`fold`) or re-normalised (`repair`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import build_tiny_model, normalise, tiny_checkpoint, tiny_uint8_images
from tests.data_fixtures import write_tiny_cifar10
from training.folding import batchnorms, conv_before, fold_state
from training.soup import SoupConfig, make_soup, output_statistics
from training.soup_cli import main

VAL_SIZE = 50


def _model(seed: int):
    """A tiny 3-exit network with non-trivial BatchNorm affine parameters."""
    model = build_tiny_model(seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.2)
    return model.eval()


def _save(model, path, full: bool = True):
    if full:
        checkpoint = tiny_checkpoint(model)
        checkpoint["config"]["val_size"] = VAL_SIZE
        torch.save(checkpoint, path)
    else:
        torch.save(model.state_dict(), path)
    return str(path)


def _logits(model, state) -> list[np.ndarray]:
    model.load_state_dict(state)
    model.eval()
    x = torch.from_numpy(normalise(tiny_uint8_images(16, seed=7)))
    with torch.no_grad():
        return [z.numpy() for z in model(x).logits]


def _reparametrised(model) -> dict[str, torch.Tensor]:
    """The same eval-mode function with every convolution doubled and its BatchNorm's
    running statistics scaled to match (what a different training history or a recovery from
    ONNX can produce)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, bn in batchnorms(model).items():
        conv = conv_before(name)
        state[f"{conv}.weight"] *= 2.0
        state[f"{name}.running_mean"] *= 2.0
        state[f"{name}.running_var"] = 4.0 * state[f"{name}.running_var"] + 3.0 * bn.eps
    return state


def test_soup_of_one_function_in_two_parametrisations_is_that_function(tmp_path):
    a = _model(0)
    path_a = _save(a, tmp_path / "a.pt")
    twin = build_tiny_model()
    twin.load_state_dict(_reparametrised(a))
    path_b = _save(twin, tmp_path / "b.pt", full=False)
    soup, ingredients = make_soup(SoupConfig((path_a, path_b)))
    assert [ing.checkpoint is not None for ing in ingredients] == [True, False]
    probe = build_tiny_model()
    for ours, theirs in zip(
        _logits(probe, soup["model"]), _logits(probe, a.state_dict()), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    # Averaging the raw parameters instead would not be that function: BatchNorm is not linear
    # in its parameters.
    raw = {
        k: (v + _reparametrised(a)[k]) / 2 if v.is_floating_point() else v
        for k, v in a.state_dict().items()
    }
    far = max(
        float(np.abs(x - y).max())
        for x, y in zip(_logits(probe, raw), _logits(probe, a.state_dict()), strict=True)
    )
    assert far > 1e-2


def test_fold_soup_is_the_weighted_mean_of_folded_layers(tmp_path):
    a, b = _model(0), _model(1)
    paths = (_save(a, tmp_path / "a.pt"), _save(b, tmp_path / "b.pt"))
    soup, _ = make_soup(SoupConfig(paths, weights=(3.0, 1.0)))
    norms = batchnorms(a)
    fa, fb = fold_state(a.state_dict(), norms), fold_state(b.state_dict(), norms)
    fs = fold_state(soup["model"], norms)
    for name in norms:
        conv = conv_before(name)
        np.testing.assert_allclose(
            fs[f"{conv}.weight"],
            0.75 * fa[f"{conv}.weight"] + 0.25 * fb[f"{conv}.weight"],
            rtol=1e-5,
            atol=1e-6,
        )
        np.testing.assert_allclose(
            fs[f"{name}.folded_bias"],
            0.75 * fa[f"{name}.folded_bias"] + 0.25 * fb[f"{name}.folded_bias"],
            rtol=1e-5,
            atol=1e-5,
        )
    key = "heads.2.fc.weight"  # a linear layer: averaged as it is
    expected = 0.75 * a.state_dict()[key] + 0.25 * b.state_dict()[key]
    np.testing.assert_allclose(soup["model"][key], expected, rtol=1e-6, atol=1e-7)
    # The soup checkpoint says what it is made of, by file name and hash only.
    recipe = soup["config"]["extra"]["soup"]
    assert recipe["ingredients"] == ["a.pt", "b.pt"] and recipe["weights"] == [3.0, 1.0]
    assert len(recipe["ingredient_sha256"]) == 2 and str(tmp_path) not in json.dumps(recipe)


def test_repair_gives_each_channel_the_ingredients_mean_statistics(tmp_path):
    data = write_tiny_cifar10(tmp_path / "data", per_batch=60)
    a, b = _model(0), _model(1)
    paths = (_save(a, tmp_path / "a.pt"), _save(b, tmp_path / "b.pt"))
    config = SoupConfig(paths, bn="repair", batches=4, data_dir=str(data))
    soup, _ = make_soup(config)
    from training.folding import augmented_batches
    from training.soup import load_data

    probe = build_tiny_model()
    norms = batchnorms(probe)
    train = load_data(soup, config, "train")
    batches = list(
        augmented_batches(train, soup["config"], tuple(soup["mean"]), tuple(soup["std"]), 4, 0)
    )
    stats = {}
    for key, state in (("a", a.state_dict()), ("b", b.state_dict()), ("soup", soup["model"])):
        probe.load_state_dict(state)
        stats[key] = output_statistics(probe, norms, batches)
    # The stem's input does not depend on other layers: its statistics match the target
    # closely (up to the batch-vs-population variance the running statistics average over).
    stem = "backbone.stem.1"
    target_mean = (stats["a"][stem][0] + stats["b"][stem][0]) / 2
    target_std = (stats["a"][stem][1] + stats["b"][stem][1]) / 2
    np.testing.assert_allclose(stats["soup"][stem][0], target_mean, atol=0.05)
    np.testing.assert_allclose(stats["soup"][stem][1], target_std, rtol=0.1)
    # A plain average shrinks activations somewhere downstream; repair gives every layer the
    # scale of its ingredients (loosely: deeper layers see inputs normalised in train mode).
    for name in norms:
        ratio = (
            stats["soup"][name][1].mean() / ((stats["a"][name][1] + stats["b"][name][1]) / 2).mean()
        )
        assert 0.7 < float(ratio) < 1.3, name


def test_cli_writes_an_exportable_run_with_accuracies_and_a_paired_test(tmp_path, monkeypatch):
    from training.export import ExportOptions, export_checkpoint
    from training.export.checkpoint import load_for_export

    monkeypatch.chdir(tmp_path)
    write_tiny_cifar10(tmp_path / "data", per_batch=60)
    _save(_model(0), tmp_path / "a.pt")
    _save(_model(1), tmp_path / "b.pt", full=False)
    _save(_model(2), tmp_path / "c.pt")
    common = ["--data-dir", "data", "--threads", "1"]
    assert main(["a.pt", "b.pt", "--out", "ref", *common]) == 0
    (tmp_path / "soup.yaml").write_text("ingredients: [a.pt, b.pt, c.pt]\nbn: fold\n")
    argv = ["--recipe", "soup.yaml", "--out", "soup", "--reference", "ref", *common]
    assert main(argv) == 0
    run = tmp_path / "soup"
    report = json.loads((run / "soup.json").read_text())
    assert [i["name"] for i in report["ingredients"]] == ["a.pt", "b.pt", "c.pt"]
    test = report["soup"]["test"]
    with np.load(run / "test_predictions.npz") as saved:
        predictions, labels = saved["predictions"], saved["labels"]
    assert predictions.shape == (3, 60)
    assert test["acc_last"] == pytest.approx(
        100 * float((predictions[-1] == labels).mean()), abs=1e-3
    )
    assert json.loads((run / "test_metrics.json").read_text())["best"] == test
    paired = report["reference"]["deepest_exit_test"]
    assert paired["rows"] == 60 and 0.0 <= paired["p_value"] <= 1.0
    checkpoint = load_for_export(run / "best.pt")
    assert checkpoint["val_metrics"] == report["soup"]["val"]
    assert "optimizer" not in checkpoint
    assert (run / "soup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("soup.json", "config.json", "test_metrics.json"):
        assert str(tmp_path) not in (run / name).read_text()
    export_checkpoint(
        checkpoint, tmp_path / "bundle", ExportOptions(name="soup", version="1", progress=False)
    )
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["provenance"]["training_config"]["extra"]["soup"]["bn"] == "fold"


@pytest.fixture(scope="module")
def ingredient_dir(tmp_path_factory):
    from training.models import create_model

    root = tmp_path_factory.mktemp("ingredients")
    _save(_model(0), root / "a.pt")
    _save(_model(1), root / "b.pt")
    _save(_model(1), root / "bare.pt", full=False)
    torch.manual_seed(0)
    wide = create_model("resnet18", 10, exits=3, width=0.25, stem="cifar")
    torch.save(wide.state_dict(), root / "wide.pt")
    (root / "junk.pt").write_bytes(b"not a checkpoint")
    (root / "odd.yaml").write_text("ingredients: [a.pt, b.pt]\nepochs: 3\n")
    (root / "list.yaml").write_text("- a.pt\n- b.pt\n")
    return root


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["a.pt"], "at least two ingredients"),
        (["a.pt", "b.pt", "--bn", "nope"], "--bn 'nope'"),
        (["a.pt", "b.pt", "--weights", "1,-1"], "must all be positive"),
        (["a.pt", "b.pt", "--weights", "1,2,3"], "3 values for 2 ingredients"),
        (["a.pt", "b.pt", "--weights", "1,x"], "comma-separated numbers"),
        (["a.pt", "missing.pt"], "checkpoint not found"),
        (["bare.pt", "bare.pt"], "at least one ingredient must be a training checkpoint"),
        (["a.pt", "wide.pt"], "has shape"),
        (["a.pt", "junk.pt"], "not a readable torch checkpoint"),
        (["a.pt", "b.pt", "--reference", "nowhere"], "no test_predictions.npz"),
        (["a.pt", "b.pt", "--batches", "0"], "--batches must be >= 1"),
        (["--recipe", "nope.yaml"], "--recipe not found"),
        (["--recipe", "odd.yaml"], "unknown key(s) epochs"),
        (["--recipe", "list.yaml"], "expected a mapping"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    ingredient_dir, tmp_path, monkeypatch, capsys, argv, message
):
    monkeypatch.chdir(ingredient_dir)
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("earlyexit-soup: error:") and message in err[0]
    assert not out.exists()


def test_broken_exits_names_the_exits_averaging_broke():
    from training.soup import broken_exits

    def entry(*accs):
        return {"val": {f"acc_exit{k}": a for k, a in enumerate(accs, 1)}}

    report = {
        "ingredients": [entry(74.1, 82.4, 90.4), entry(74.4, 82.7, 90.3)],
        "soup": entry(10.0, 82.9, 90.8),  # exit 1's heads started from different weights
    }
    assert broken_exits(report) == [1]
    report["soup"] = entry(70.0, 82.9, 90.8)  # a few points lower is not flagged
    assert broken_exits(report) == []
