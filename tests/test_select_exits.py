"""scripts/select_exits.py: a subset of a trained network's exits as a run of its own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_checkpoint
from tests.data_fixtures import write_tiny_cifar10

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import select_exits  # noqa: E402


@pytest.fixture(scope="module")
def all_blocks_run(tmp_path_factory):
    """A run with an exit after every block of ResNet18 (8 exits), and CIFAR-shaped data."""
    from training.models import create_model

    torch.manual_seed(3)
    model = create_model(
        "resnet18", 10, exits=8, head="lite", exit_blocks=(1, 2, 3, 4, 5, 6, 7),
        width=0.125, stem="cifar",
    ).eval()  # fmt: skip
    root = tmp_path_factory.mktemp("select")
    write_tiny_cifar10(root / "data", per_batch=20)
    checkpoint = tiny_checkpoint(model, exits=8)
    checkpoint["config"].update({"head": "lite", "exit_blocks": [1, 2, 3, 4, 5, 6, 7],
                                 "val_size": 20, "data_dir": str(root / "data")})  # fmt: skip
    run = root / "all"
    run.mkdir()
    torch.save(checkpoint, run / "best.pt")
    return run, model


def test_the_kept_exits_are_the_trained_ones_bit_for_bit(all_blocks_run, tmp_path):
    run, model = all_blocks_run
    out = tmp_path / "sel"
    assert select_exits.main(["--run", str(run), "--exit-blocks", "2,5", "--out", str(out)]) == 0
    saved = torch.load(out / "best.pt", weights_only=False)
    assert saved["config"]["exits"] == 3 and saved["config"]["exit_blocks"] == [2, 5]
    assert saved["config"]["extra"]["selected_from"] == {
        "run": "all",
        "exit_blocks": [1, 2, 3, 4, 5, 6, 7],
        "heads_from": None,
        "heads_from_blocks": None,
    }
    trained = model.state_dict()
    for mine, theirs in ((0, 1), (1, 4)):  # block 2 is exit 2 of 8, block 5 is exit 5
        heads = {k.removeprefix(f"heads.{mine}."): v for k, v in saved["model"].items()
                 if k.startswith(f"heads.{mine}.")}  # fmt: skip
        assert heads and all(
            torch.equal(v, trained[f"heads.{theirs}.{k}"]) for k, v in heads.items()
        )
    backbone = {k: v for k, v in saved["model"].items() if k.startswith("backbone.")}
    assert all(torch.equal(v, trained[k]) for k, v in backbone.items())
    assert set(saved["val_metrics"]) >= {"acc_exit1", "acc_exit3", "acc_last"}
    for name in ("config.json", "test_metrics.json", "test_predictions.npz"):
        assert (out / name).is_file()
    # The selected run exports like any training run.
    from training.export import ExportOptions, export_checkpoint

    result = export_checkpoint(
        out / "best.pt", tmp_path / "b",
        ExportOptions(exporter="torchscript", progress=False, stage_files=False),
    )  # fmt: skip
    assert len(result.manifest.segments) == 3
    assert all(c.probs_max_abs_diff is None or c.probs_max_abs_diff < 1e-4 for c in result.checks)


@pytest.mark.parametrize(
    ("blocks", "needle"),
    [("2,8", "has exits after blocks"), ("5,2", "must increase"), ("a", "not integers")],
)
def test_bad_input_is_one_line_exit_2(all_blocks_run, tmp_path, capsys, blocks, needle):
    run, _ = all_blocks_run
    out = tmp_path / "sel"
    assert select_exits.main(["--run", str(run), "--exit-blocks", blocks, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not out.exists()


def test_heads_from_a_checkpoint_of_the_same_backbone(all_blocks_run, tmp_path, capsys):
    """--heads-from: the model the heads were trained on supplies its own heads at the blocks
    it exits after (here the stage-end heads); the run supplies the rest. A checkpoint of
    another backbone is refused."""
    from training.models import create_model

    run, model = all_blocks_run
    torch.manual_seed(9)
    staged = create_model("resnet18", 10, exits=4, head="lite", width=0.125, stem="cifar")
    staged.backbone.load_state_dict(model.backbone.state_dict())
    other = tiny_checkpoint(staged.eval(), exits=4)
    other["config"]["head"] = "lite"
    source = tmp_path / "staged.pt"
    torch.save(other, source)
    out = tmp_path / "sel"
    argv = ["--run", str(run), "--exit-blocks", "1,2,4", "--out", str(out)]
    assert select_exits.main([*argv, "--heads-from", str(source)]) == 0
    saved = torch.load(out / "best.pt", weights_only=False)["model"]
    trained, theirs = model.state_dict(), staged.state_dict()
    for mine, state, index in ((0, trained, 0), (1, theirs, 0), (2, theirs, 1)):
        heads = {k.removeprefix(f"heads.{mine}."): v for k, v in saved.items()
                 if k.startswith(f"heads.{mine}.")}  # fmt: skip
        assert heads and all(torch.equal(v, state[f"heads.{index}.{k}"]) for k, v in heads.items())

    # --heads-from-blocks: its head only at block 2; blocks 1 and 4 keep the run's heads.
    out3 = tmp_path / "sel3"
    argv3 = ["--run", str(run), "--exit-blocks", "1,2,4", "--out", str(out3)]
    assert select_exits.main([*argv3, "--heads-from", str(source), "--heads-from-blocks", "2"]) == 0
    saved3 = torch.load(out3 / "best.pt", weights_only=False)
    for mine, state, index in ((0, trained, 0), (1, theirs, 0), (2, trained, 3)):
        heads = {k.removeprefix(f"heads.{mine}."): v for k, v in saved3["model"].items()
                 if k.startswith(f"heads.{mine}.")}  # fmt: skip
        assert heads and all(torch.equal(v, state[f"heads.{index}.{k}"]) for k, v in heads.items())
    assert saved3["config"]["extra"]["selected_from"]["heads_from_blocks"] == [2]
    for bad, needle in (
        (["--heads-from-blocks", "2"], "needs --heads-from"),
        (["--heads-from", str(source), "--heads-from-blocks", "3"], "not among the kept"),
        (["--heads-from", str(source), "--heads-from-blocks", "4,2"], "must increase"),
    ):
        out4 = tmp_path / "sel4"
        assert select_exits.main(["--run", str(run), "--exit-blocks", "1,2,4",
                                  "--out", str(out4), *bad]) == 2  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err
        assert not out4.exists()

    torch.manual_seed(10)
    foreign = create_model("resnet18", 10, exits=4, head="lite", width=0.125, stem="cifar")
    torch.save(tiny_checkpoint(foreign.eval(), exits=4), tmp_path / "foreign.pt")
    out2 = tmp_path / "sel2"
    argv2 = ["--run", str(run), "--exit-blocks", "2", "--out", str(out2)]
    assert select_exits.main([*argv2, "--heads-from", str(tmp_path / "foreign.pt")]) == 2
    assert "backbone differs" in capsys.readouterr().err
    assert not out2.exists()


def test_plot_exits_reads_selected_runs(all_blocks_run, tmp_path, capsys):
    """scripts/plot_exits.py: per-exit val/test accuracy against the MACs of the path to each
    exit (cumulative, earlier heads included), from run directories."""
    import json

    import plot_exits

    run, _ = all_blocks_run
    for blocks in ("2,5", "1,2,4,6"):
        out = tmp_path / blocks.replace(",", "")
        assert (
            select_exits.main(["--run", str(run), "--exit-blocks", blocks, "--out", str(out)]) == 0
        )
    figures = tmp_path / "fig"
    argv = [
        "--run",
        f"a={tmp_path / '25'}",
        "--run",
        f"b={tmp_path / '1246'}",
        "--out",
        str(figures),
    ]
    assert plot_exits.main(argv) == 0
    data = json.loads((figures / "exits.json").read_text())
    assert [len(data[k]["test"]) for k in ("a", "b")] == [3, 5]
    for entry in data.values():
        assert entry["macs"] == sorted(entry["macs"]) and len(entry["val"]) == len(entry["macs"])
    assert data["a"]["exit_blocks"] == [2, 5]
    assert (figures / "exits.png").stat().st_size > 0
    assert plot_exits.main(["--run", str(tmp_path / "25"), "--out", str(figures)]) == 2
    assert "LABEL=DIR" in capsys.readouterr().err


def test_unreadable_checkpoints_are_one_line_exit_2(all_blocks_run, tmp_path, capsys):
    """A --heads-from file that is missing or not a checkpoint, and a --run whose best.pt is
    not a torch file, answer one line and exit 2 (no traceback); plot_exits likewise for a run
    without per-exit metrics."""
    import plot_exits

    run, _ = all_blocks_run
    out = tmp_path / "sel"
    argv = ["--run", str(run), "--exit-blocks", "2", "--out", str(out)]
    assert select_exits.main([*argv, "--heads-from", str(tmp_path / "none.pt")]) == 2
    assert "--heads-from checkpoint not found" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "best.pt").write_bytes(b"not a checkpoint")
    (broken / "test_metrics.json").write_text("{}")
    assert select_exits.main(["--run", str(broken), "--exit-blocks", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a readable torch checkpoint" in err and "\n" not in err
    assert not out.exists()
    torch.save({"config": {}}, broken / "best.pt")
    assert plot_exits.main(["--run", f"x={broken}", "--out", str(tmp_path / "fig")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a finished run with per-exit metrics" in err and "\n" not in err
