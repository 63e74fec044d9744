"""Seed methods through the engine (issue #17): the teacher slot, loss state and loss
parameters across resume, a few CPU steps of every method, export + a served request, and the
CLI's one-line refusals."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.arch_helpers import tiny_trainer
from training import cli

# Starlette's TestClient warns about its own use of httpx; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient.")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A trained checkpoint of this project (deep supervision, 3 exits) to teach with."""
    out = tmp_path_factory.mktemp("teacher")
    tiny_trainer(out, loss="deep_supervision").fit(max_steps=1, progress=False)
    return out / "best.pt"


METHODS = {
    "kd_self_distillation": {"loss": "kd_self_distillation", "kd_exits": "all"},
    "ckdf": {"loss": "ckdf", "head": "ckdf", "exits": 4},
    "drg": {"loss": "drg"},
    "dsr": {"loss": "dsr"},
    "drg_dsr": {"loss": "drg_dsr"},
    "sfr": {"loss": "sfr", "sfr_distance": "emd"},
}


def _method(name: str, teacher: Path) -> dict:
    kw = dict(METHODS[name])
    if name in ("kd_self_distillation", "ckdf"):
        kw["teacher"] = str(teacher)
    return kw


# ----------------------------------------------------------------------------- teacher


def test_teacher_is_frozen_outside_the_optimizer_and_the_checkpoint(tmp_path, teacher_ckpt):
    trainer = tiny_trainer(tmp_path, **_method("kd_self_distillation", teacher_ckpt))
    teacher = trainer.teacher
    assert teacher is not None and not teacher.model.training
    before = teacher.parameters_snapshot()
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not trained & {id(p) for p in teacher.model.parameters()}
    assert all(not p.requires_grad for p in teacher.model.parameters())
    trainer.fit(max_steps=2, progress=False)
    after = teacher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics too
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert not any("teacher" in k for k in state["model"]) and state["loss"].keys() == set()
    assert state["config"]["teacher"] == str(teacher_ckpt)


def test_teacher_outputs_are_cached_per_batch(tmp_path, teacher_ckpt):
    teacher = tiny_trainer(tmp_path, **_method("kd_self_distillation", teacher_ckpt)).teacher
    x = torch.randn(2, 3, 16, 16)
    assert teacher.outputs(x) is teacher.outputs(x)
    assert teacher.outputs(x.clone()) is not teacher.outputs(x)


def test_ckdf_refuses_a_teacher_whose_stage_maps_do_not_pair(tmp_path):
    from training.teacher import TeacherError

    tiny_trainer(tmp_path / "t", stem="imagenet").fit(max_steps=1, progress=False)
    with pytest.raises(TeacherError, match="stage maps"):
        tiny_trainer(tmp_path / "s", loss="ckdf", teacher=str(tmp_path / "t" / "best.pt"))


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("name", ["dsr", "drg_dsr", "sfr"])
def test_loss_state_resumes_bit_exactly(tmp_path, name, teacher_ckpt):
    # batch 16 of 32 rows: step 3 is in epoch 1, where sfr smooths by epoch 0's predictions
    kw = dict(_method(name, teacher_ckpt), batch_size=16)
    straight = tiny_trainer(tmp_path / "a", **kw)
    straight.fit(max_steps=3, progress=False)
    first = tiny_trainer(tmp_path / "b", **kw)
    first.fit(max_steps=2, progress=False)
    resumed = tiny_trainer(tmp_path / "b", **kw)
    assert resumed.resume()
    resumed.fit(max_steps=3, progress=False)
    for a_mod, b_mod in [(straight.model, resumed.model), (straight.loss_fn, resumed.loss_fn)]:
        a, b = a_mod.state_dict(), b_mod.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            if k.endswith("_extra_state"):
                assert a[k].keys() == b[k].keys()
                for n in a[k]:
                    same = a[k][n] == b[k][n] if isinstance(a[k][n], int) else None
                    assert same or torch.equal(a[k][n], b[k][n]), n
            else:
                assert torch.equal(a[k], b[k])
    if name == "sfr":  # epoch 0's predictions were the teacher of step 3
        state = resumed.loss_fn.get_extra_state()
        assert state["epoch"] == 1 and bool(state["previous_seen"].all())
        assert [n for n, _ in resumed.loss_fn.named_parameters()] == ["query.weight", "key.weight"]


# ----------------------------------------------------------------------------- methods


def test_drg_puts_one_auxiliary_classifier_after_stage_2(tmp_path):
    trainer = tiny_trainer(tmp_path, loss="drg")
    assert trainer.model.num_exits == 2 and trainer.model.exit_points == ("layer2.1", "layer4.1")
    assert tiny_trainer(tmp_path / "d", loss="dsr").model.num_exits == 1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_exports_and_answers_a_request(tmp_path, name, teacher_ckpt):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import Settings
    from tests.serving_helpers import png_bytes
    from training.export import ExportOptions, export_checkpoint

    trainer = tiny_trainer(tmp_path / "run", **_method(name, teacher_ckpt))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit(max_steps=2, progress=False)
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trains
    assert np.isfinite(trainer.best_value) or trainer.best_value == -np.inf
    options = ExportOptions(exporter="torchscript", progress=False, stage_files=False)
    result = export_checkpoint(tmp_path / "run" / "best.pt", tmp_path / "bundle", options)
    assert result.manifest.num_exits == trainer.model.num_exits
    assert all(c.probs_max_abs_diff is None or c.probs_max_abs_diff < 1e-4 for c in result.checks)
    settings = Settings(bundle=tmp_path / "bundle", providers=["cpu"], intra_op_threads=1,
                        access_log=False, max_batch_size=4)  # fmt: skip
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    with TestClient(create_app(settings)) as http:
        deadline = time.monotonic() + 120
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, http.get("/readyz").json()
            time.sleep(0.05)
        response = http.post("/classify", content=png_bytes(image),
                             headers={"Content-Type": "image/png"})  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["label"] in list("abcd")


# ----------------------------------------------------------------------------- bad input


def _train(tmp_path: Path, capsys, *flags: str) -> str:
    out = tmp_path / "out"
    code = cli.main(["--out", str(out), "--arch", "resnet18", "--width", "0.125", *flags])
    assert code == 2
    assert not out.exists()  # nothing written
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_method_needing_a_teacher_without_one_is_refused(tmp_path, capsys):
    assert "--teacher" in _train(tmp_path, capsys, "--loss", "kd_self_distillation")


def test_an_option_of_another_method_is_refused(tmp_path, capsys):
    assert "drg_alpha" in _train(tmp_path, capsys, "--loss", "dsr", "--drg-alpha", "0.3")
    assert "teacher" in _train(tmp_path, capsys, "--loss", "drg", "--teacher", "x.pt")


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory) -> Path:
    from tests.data_fixtures import write_tiny_cifar10

    return write_tiny_cifar10(tmp_path_factory.mktemp("cifar"))


def _data(root: Path) -> list[str]:
    return ["--dataset", "cifar10", "--data-dir", str(root), "--val-size", "10", "--threads", "1"]


def test_a_teacher_of_another_input_shape_or_class_count_is_refused(
    tmp_path, capsys, teacher_ckpt, tiny_cifar
):
    # the teacher saw 16×16 images of 4 classes; CIFAR-10 is 32×32, 10 classes
    err = _train(tmp_path, capsys, "--loss", "kd_self_distillation", "--teacher",
                 str(teacher_ckpt), *_data(tiny_cifar))  # fmt: skip
    assert "4 classes, this run has 10" in err
    state = torch.load(teacher_ckpt, weights_only=False)
    state["num_classes"], state["classes"] = 10, [str(i) for i in range(10)]
    torch.save(state, tmp_path / "t10.pt")
    err = _train(tmp_path, capsys, "--loss", "kd_self_distillation", "--teacher",
                 str(tmp_path / "t10.pt"), *_data(tiny_cifar))  # fmt: skip
    assert "input shape [3, 16, 16], this run's is [3, 32, 32]" in err
    err = _train(tmp_path, capsys, "--loss", "kd_self_distillation", "--teacher",
                 str(tmp_path / "missing.pt"), *_data(tiny_cifar))  # fmt: skip
    assert "not found" in err
    err = _train(tmp_path, capsys, "--loss", "kd_self_distillation", "--teacher", str(tmp_path),
                 *_data(tiny_cifar))  # fmt: skip
    assert "is a directory (a bundle?)" in err


def test_dsr_with_a_batch_that_cannot_align_rows_is_refused(tmp_path, capsys, tiny_cifar):
    err = _train(tmp_path, capsys, "--loss", "dsr", "--batch-size", "512", *_data(tiny_cifar))
    assert "row by row" in err and "--batch-size 512" in err
