"""The ablation form of earlyexit-compare: arms named by the loss registry with overrides on a
shared base recipe, reported with parameters, MACs and step time beside the paired test."""

from __future__ import annotations

import json

import pytest

from tests.test_training_compare import _compare
from training import compare_cli
from training.compare import parse_arm_spec


def test_arm_specs_name_a_loss_its_overrides_and_a_label():
    assert parse_arm_spec("drg") == ("drg", "drg", {})
    assert parse_arm_spec("ckdf:head=ckdf,teacher=t.pt,ckdf_alpha=0.3@ckdf_head") == (
        "ckdf_head",
        "ckdf",
        {"head": "ckdf", "teacher": "t.pt", "ckdf_alpha": 0.3},
    )
    assert parse_arm_spec("self_distillation:feature_exits=[1, 2],lam=0.04")[2] == {
        "feature_exits": [1, 2],
        "lam": 0.04,
    }
    for bad in ("a b", "drg:alpha", "drg@a/b", "drg:loss=dsr"):
        with pytest.raises(ValueError):
            parse_arm_spec(bad)


@pytest.fixture(scope="module")
def ablation_setup(tmp_path_factory):
    from tests.arch_helpers import tiny_arrays
    from tests.data_fixtures import write_tiny_cifar10
    from training.config import TrainConfig
    from training.engine import Trainer

    root = tmp_path_factory.mktemp("ablation")
    data = write_tiny_cifar10(root / "data", per_batch=24)
    base = root / "base.yaml"
    base.write_text(
        f"arch: resnet18\nwidth: 0.125\nexits: 3\nhead: lite\ndataset: cifar10\ndata_dir: {data}\n"
        "val_size: 20\nepochs: 1\nbatch_size: 16\nschedule: linear\nnesterov: true\n"
    )
    cfg = TrainConfig(arch="resnet18", width=0.125, exits=2, head="lite", val_size=0,
                      batch_size=8, num_threads=1)  # fmt: skip
    teacher = Trainer(cfg, root / "teacher", train_data=tiny_arrays(16, 0, size=32, classes=10))
    teacher.fit(max_steps=1, progress=False)
    return root, base, root / "teacher" / "best.pt"


def test_registry_arms_train_and_report_costs_and_step_time(ablation_setup):
    root, base, teacher = ablation_setup
    out, runs = root / "report", root / "runs"
    arms = ["drg", f"kd_self_distillation:teacher={teacher},kd_exits=all@kd_sd"]
    proc = _compare("--base", str(base), "--arms", *arms, "--reference", "drg",
                    "--seeds", "0", "--runs", str(runs), "--out", str(out), "--step-steps", "1",
                    "--parallel", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    assert list(report["arms"]) == ["drg", "kd_sd"]
    assert report["recipes"]["kd_sd"]["teacher"] == str(teacher)
    drg, kd = report["arms"]["drg"], report["arms"]["kd_sd"]
    assert len(drg["mean_exit_accuracy"]) == 2  # DRG's auxiliary classifier + the final exit
    assert len(kd["mean_exit_accuracy"]) == 3
    assert "p_value" in kd["per_seed"]["0"]["deepest_vs_reference"]
    # the same backbone: the deepest path costs alike; three exits' heads weigh more than one
    assert kd["costs"]["macs_deepest_path"] == drg["costs"]["macs_deepest_path"]
    assert kd["costs"]["params"] > drg["costs"]["params"]
    assert drg["step_seconds"] > 0 and kd["step_time_ratio"] > 0
    assert drg["exit_points"] == ["layer2.1", "layer4.1"]
    assert kd["exit_points"] == ["layer2.1", "layer3.1", "layer4.1"]
    md = (out / "README.md").read_text()
    assert "| arm | layer2.1 | layer3.1 | layer4.1 |" in md and "step ms" in md
    row = next(line for line in md.splitlines() if line.startswith("| `drg` |"))
    cells = [c.strip() for c in row.split("|")[2:5]]
    assert cells[0] and not cells[1] and cells[2]  # the AC sits under its block, layer2.1


@pytest.mark.parametrize(
    ("arm", "needle"),
    [("drg:nonsense=1", "unknown config keys"), ("nope", "unknown loss"),
     ("kd_self_distillation", "--teacher"), ("dsr:drg_alpha=0.1", "drg_alpha")],
)  # fmt: skip
def test_bad_registry_arms_are_one_line_exit_2(ablation_setup, tmp_path, capsys, arm, needle):
    root, base, _ = ablation_setup
    code = compare_cli.main(["--base", str(base), "--arms", "baseline", arm, "--reference",
                             "baseline", "--runs", str(tmp_path / "r"), "--out",
                             str(tmp_path / "o")])  # fmt: skip
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()


def test_a_missing_base_is_refused(tmp_path, capsys):
    code = compare_cli.main(["--base", str(tmp_path / "none.yaml"), "--arms", "baseline",
                             "--reference", "baseline", "--runs", str(tmp_path / "r"), "--out",
                             str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "--base recipe not found" in capsys.readouterr().err
