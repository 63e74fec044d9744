import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.datasets import ImageArrays
from tests.cli_helpers import assert_train_refuses
from training.config import TrainConfig
from training.costs import count_macs, measure_costs
from training.engine import InitError, Trainer, distill_weights, lr_factor
from training.models import create_model

ROOT = Path(__file__).resolve().parents[1]


def _arrays(n: int, seed: int) -> ImageArrays:
    rng = np.random.default_rng(seed)
    return ImageArrays(
        rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
        rng.integers(0, 4, n).astype(np.int64),
        ("a", "b", "c", "d"),
    )


def _cfg(**kw) -> TrainConfig:
    base = {
        "arch": "resnet18",
        "width": 0.125,
        "exits": 3,
        "epochs": 3,
        "batch_size": 8,
        "lr": 0.05,
        "val_size": 0,
        "cutout": 4,
        "num_threads": 1,
    }
    base.update(kw)
    return TrainConfig(**base)


def _trainer(tmp: Path, **kw) -> Trainer:
    return Trainer(_cfg(**kw), tmp, train_data=_arrays(32, 0), val_data=_arrays(16, 1))


def test_resume_is_bitwise_exact(tmp_path):
    straight = _trainer(tmp_path / "a")
    straight.fit(max_steps=3, progress=False)

    first = _trainer(tmp_path / "b")
    first.fit(max_steps=2, progress=False)  # saves last.pt mid-epoch
    resumed = _trainer(tmp_path / "b")
    assert resumed.resume()
    assert (resumed.global_step, resumed.step_in_epoch) == (2, 2)
    resumed.fit(max_steps=3, progress=False)

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"]) for k in oa)


def test_resume_is_bitwise_exact_with_adapters_and_ema(tmp_path):
    kw = {"feature_hint": "adapter", "lam": 0.03, "feature_exits": (1,), "ema_decay": 0.9}
    straight = _trainer(tmp_path / "a", **kw)
    assert [n for n, _ in straight.loss_fn.named_parameters()] == ["adapters.1.weight"]
    adapter_before = straight.loss_fn.adapters["1"].weight.detach().clone()
    straight.fit(max_steps=3, progress=False)
    assert not torch.equal(adapter_before, straight.loss_fn.adapters["1"].weight)  # it trains

    first = _trainer(tmp_path / "b", **kw)
    first.fit(max_steps=2, progress=False)
    resumed = _trainer(tmp_path / "b", **kw)
    assert resumed.resume()
    resumed.fit(max_steps=3, progress=False)
    for a_mod, b_mod in [
        (straight.model, resumed.model),
        (straight.loss_fn, resumed.loss_fn),
        (straight.eval_model, resumed.eval_model),
    ]:
        a, b = a_mod.state_dict(), b_mod.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The EMA copy is what gets evaluated and exported, and it differs from the raw weights.
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    raw, ema = state["model"], state["ema_model"]
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())


def test_a_run_killed_mid_epoch_resumes_from_its_recovery_checkpoint(tmp_path):
    """checkpoint_minutes writes last.pt inside an epoch; a run killed there resumes exactly,
    and the epoch's record still averages over all of the epoch's steps."""
    kw = {"epochs": 2, "val_size": 0}
    straight = _trainer(tmp_path / "a", checkpoint_minutes=0.0, **kw)
    straight.fit(progress=False)

    killed = _trainer(tmp_path / "b", checkpoint_minutes=1e-9, **kw)  # a save after every step
    calls = {"n": 0}
    real_step = killed.train_step

    def dying_step(x, y):
        calls["n"] += 1
        if calls["n"] == 7:  # steps per epoch = 32 / 8 = 4: the kill lands at epoch 2, step 3
            raise KeyboardInterrupt
        return real_step(x, y)

    killed.train_step = dying_step
    with pytest.raises(KeyboardInterrupt):
        killed.fit(progress=False)
    resumed = _trainer(tmp_path / "b", checkpoint_minutes=1e-9, **kw)
    assert resumed.resume()
    assert (resumed.epoch, resumed.step_in_epoch, resumed.global_step) == (1, 2, 6)
    assert resumed.epoch_count == 2
    resumed.fit(progress=False)

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    def records(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    ra, rb = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["epoch"] for r in rb] == [1, 2]
    train_keys = sorted(k for k in ra[1] if k.startswith("train_"))
    assert train_keys and all(ra[1][k] == pytest.approx(rb[1][k]) for k in train_keys)
    # the epoch-end checkpoint carries no partial epoch
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert state["epoch_partial"]["count"] == 0 and state["step_in_epoch"] == 0


@pytest.mark.parametrize("stop_at", [3, 4])  # inside the first epoch, and at its last step
def test_a_stop_request_checkpoints_and_the_run_resumes_exactly(tmp_path, stop_at):
    kw = {"epochs": 2, "val_size": 0, "checkpoint_minutes": 0.0}
    straight = _trainer(tmp_path / "a", **kw)
    straight.fit(progress=False)

    stopped = _trainer(tmp_path / "b", **kw)
    real_step, calls = stopped.train_step, {"n": 0}

    def step_then_signal(x, y):
        calls["n"] += 1
        stats = real_step(x, y)
        if calls["n"] == stop_at:  # what the CLI's SIGTERM handler does mid-step
            stopped.request_stop()
        return stats

    stopped.train_step = step_then_signal
    summary = stopped.fit(progress=False)
    assert summary["stopped"] and calls["n"] == stop_at  # no step after the request
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert state["global_step"] == stop_at
    assert (state["epoch"], state["step_in_epoch"]) == divmod(stop_at, 4)

    resumed = _trainer(tmp_path / "b", **kw)
    assert resumed.resume()
    assert not resumed.fit(progress=False)["stopped"]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_sigterm_saves_and_exits_143_then_the_same_command_resumes(tmp_path):
    import signal

    from tests.data_fixtures import write_tiny_cifar10
    from tests.process_helpers import start_until_files

    write_tiny_cifar10(tmp_path / "data", per_batch=16)
    args = [
        *("--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")),
        *("--arch", "resnet18", "--width", "0.125", "--exits", "2", "--epochs", "200"),
        *("--batch-size", "8", "--val-size", "20", "--threads", "1", "--no-progress"),
    ]
    proc = start_until_files("training.cli", args, [tmp_path / "run" / "metrics.jsonl"], 240)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, log[-2000:]
    assert "stopped by SIGTERM" in log and "Traceback" not in log
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["global_step"] >= 1 and not (tmp_path / "run" / "test_metrics.json").exists()

    again = _cli(*args, "--max-steps", str(state["global_step"] + 1))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"step {state['step_in_epoch']}" in again.stderr  # resumed where it stopped
    resumed = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert resumed["global_step"] == state["global_step"] + 1


def test_checkpoint_minutes_must_not_be_negative():
    with pytest.raises(ValueError, match="checkpoint_minutes"):
        _cfg(checkpoint_minutes=-1.0).validate()
    with pytest.raises(ValueError, match="checkpoint_minutes"):
        _cfg(checkpoint_minutes=float("nan")).validate()


def test_max_steps_run_still_leaves_best_pt(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit(max_steps=2, progress=False)
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()


def test_full_epochs_write_metrics_checkpoints_and_config(tmp_path):
    trainer = _trainer(tmp_path, epochs=2)
    trainer.fit(progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"val_acc_exit1", "val_acc_exit3", "val_acc_ensemble", "train_kl"} <= set(records[0])
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert TrainConfig.from_dict(cfg) == trainer.cfg
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["epoch"] == 2 and state["costs"]["backbone_macs"] > 0
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_refuses_a_different_config(tmp_path):
    _trainer(tmp_path).fit(max_steps=1, progress=False)
    other = _trainer(tmp_path, lr=0.01)
    with pytest.raises(ValueError, match=r"different config \(lr\)"):
        other.resume()
    # Threads and the data's location do not change what is learnt: those resume.
    assert _trainer(tmp_path, num_threads=2, data_dir="elsewhere").resume()


def test_schedules_and_distillation_switch_off():
    cfg = _cfg(epochs=10, milestones=(0.5,), gamma=0.1)
    assert lr_factor(cfg, 4.9) == 1.0 and lr_factor(cfg, 5.0) == pytest.approx(0.1)
    cos = _cfg(epochs=10, schedule="cosine", warmup_epochs=1)
    assert lr_factor(cos, 0.5) == pytest.approx(0.5, rel=1e-6)
    assert lr_factor(cos, 10) == pytest.approx(0.0, abs=1e-9)
    sd = _cfg(epochs=10, distill_off_epochs=5, alpha=0.6, lam=0.04, feature_hint="l2")
    assert distill_weights(sd, 4) == (0.6, 0.04) and distill_weights(sd, 5) == (0.0, 0.0)
    lin = _cfg(epochs=10, schedule="linear", warmup_epochs=2)
    assert lin.alpha == 0.3 and lin.lam == 0.0  # the authors' code by default
    assert lr_factor(lin, 1.0) == pytest.approx(0.5, rel=1e-6)
    assert lr_factor(lin, 2.0) == pytest.approx(1.0)
    assert lr_factor(lin, 6.0) == pytest.approx(0.5)
    assert lr_factor(lin, 10.0) == pytest.approx(0.0, abs=1e-9)


def test_baseline_is_the_backbone_alone():
    assert _cfg(loss="baseline").resolved().exits == 1


def test_costs_add_up_per_segment_and_path():
    model = create_model("resnet18", 10, exits=4, width=0.25)
    costs = measure_costs(model, (3, 32, 32))
    assert costs.backbone_macs == sum(costs.stage_macs) + costs.head_macs[-1]
    assert costs.exit_path_macs[-1] == costs.backbone_macs
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, torch.zeros(1, 3, 10, 10)) == 3 * 8 * 9 * 100
    assert costs.exit_path_macs == sorted(costs.exit_path_macs)


def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    # A file rendezvous: no port to pick, so no race with another process taking it first.
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world
    )
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("resnet18", 4, exits=3, width=0.125).eval()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    from training.losses import create_loss

    loss_fn = create_loss("self_distillation")
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    shard = slice(rank * 4, rank * 4 + 4)
    out_ = ddp(x[shard])
    loss_fn(out_.logits, out_.features, y[shard]).total.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    # Both ranks reach teardown together: a rank tearing gloo down while the other still has a
    # pending exchange aborts the process ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ddp_two_gloo_processes_match_single_process_gradients(tmp_path):
    # BN in eval mode: batch statistics would differ per shard; gradient averaging is what
    # DDP promises and what this checks.
    out = str(tmp_path / "ddp.pt")
    store = str(tmp_path / "rendezvous")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, store, out), nprocs=2, join=True)
    ddp_grads = torch.load(out)

    torch.manual_seed(0)
    model = create_model("resnet18", 4, exits=3, width=0.125).eval()
    from training.losses import create_loss

    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    o = model(x)
    create_loss("self_distillation")(o.logits, o.features, y).total.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, ddp_grads[name], atol=1e-6, rtol=1e-4), name


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        timeout=300,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--arch", "resnet9000"], "unknown arch"),
        (["--dataset", "mnist"], "invalid choice"),
        (["--data-dir", "/nonexistent/dir"], "not found"),
        (["--exits", "5"], "has 4 stages"),
        (["--config", "/nonexistent.yaml"], "config file not found"),
        (["--epochs", "0"], "positive"),
        (["--distill", "js"], "unknown distillation term"),
        (["--loss-reduction", "avg"], "unknown loss reduction"),
        (["--feature-hint", "cosine"], "unknown feature hint"),
        (["--lambda", "-0.5"], "must be ≥ 0"),
        (["--alpha", "1.5"], "alpha must be in [0, 1]"),
        (["--feature-hint", "adapter", "--feature-exits", "1,4"], "no distinct shallow exits"),
        (["--loss", "baseline", "--alpha", "0.5"], "do(es) not apply to loss 'baseline'"),
        (["--loss", "deep_supervision", "--feature-hint", "l2"], "do(es) not apply"),
        (["--ema-decay", "1.0"], "ema_decay"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
    assert_train_refuses(tmp_path, capsys, args, needle)


def test_cli_malformed_data_dir_exit_2(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    proc = _cli("--out", str(tmp_path / "run"), "--data-dir", str(tmp_path))
    assert proc.returncode == 2 and "data_batch_1" in proc.stderr


def test_cli_yaml_config_and_torchrun_ddp(tmp_path):
    from tests.data_fixtures import write_tiny_cifar10

    write_tiny_cifar10(tmp_path / "data", per_batch=16)
    (tmp_path / "cfg.yaml").write_text(
        "arch: resnet18\nwidth: 0.125\nexits: 2\nepochs: 1\nbatch_size: 8\nval_size: 20\n"
        f"data_dir: {tmp_path / 'data'}\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # the rendezvous binds a free port itself: no pick-then-bind race
            "--nproc_per_node",
            "2",
            "-m",
            "training.cli",
            "--config",
            str(tmp_path / "cfg.yaml"),
            "--out",
            str(tmp_path / "run"),
            "--threads",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and "val_acc_exit2" in records[0]  # only rank 0 logs
    test = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert set(test["final"]) >= {"acc_exit1", "acc_exit2", "acc_ensemble"}


@pytest.mark.data
def test_smoke_30_steps_on_real_cifar10(tmp_path):
    data = os.environ.get("EARLYEXIT_DATA")
    if not data:
        pytest.skip("EARLYEXIT_DATA is not set (directory holding cifar-10-batches-py/)")
    proc = _cli(
        "--arch",
        "resnet18",
        "--width",
        "0.125",
        "--dataset",
        "cifar10",
        "--data-dir",
        data,
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--max-steps",
        "30",
        "--batch-size",
        "64",
        "--threads",
        "2",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["global_step"] == 30 and state["classes"][0] == "airplane"


# ----------------------------------------------------------------------------- --init, frozen


def _plain_checkpoint(tmp: Path) -> Path:
    plain = _trainer(tmp / "plain", loss="baseline", exits=1, cutout=0, epochs=1)
    plain.fit(progress=False)  # one whole epoch: validated, so best.pt records val accuracy
    return tmp / "plain" / "last.pt"


def test_frozen_backbone_trains_only_heads_and_keeps_the_plain_model(tmp_path):
    ckpt = _plain_checkpoint(tmp_path)
    plain_state = torch.load(ckpt, weights_only=False)["model"]
    frozen = _trainer(tmp_path / "exits", init=str(ckpt), freeze_backbone=True)
    trainable = {id(p) for g in frozen.optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in trainable for p in frozen.model.backbone.parameters())
    heads_before = {k: v.clone() for k, v in frozen.model.heads[0].state_dict().items()}
    frozen.fit(max_steps=3, progress=False)
    after = frozen.model.state_dict()
    backbone = {k: v for k, v in plain_state.items() if k.startswith("backbone.")}
    assert backbone
    for key, value in backbone.items():  # weights *and* BN statistics, bit for bit
        assert torch.equal(after[key], value), key
    assert any(
        not torch.equal(heads_before[k], v) for k, v in frozen.model.heads[0].state_dict().items()
    )
    # The final exit answers exactly as the plain model does.
    x = torch.randn(4, 3, 16, 16)
    plain = create_model("resnet18", 4, exits=1, width=0.125).eval()
    plain.load_state_dict(plain_state)
    frozen.model.eval().to(memory_format=torch.contiguous_format)  # trained channels-last
    with torch.no_grad():
        assert torch.equal(frozen.model(x).logits[-1], plain(x).logits[-1])


def test_init_heads_adds_an_exit_to_a_trained_multi_exit_model(tmp_path):
    """--init-heads with other exit blocks: the heads at blocks both networks exit after load,
    a new exit (here after block 1) starts fresh, and on a frozen backbone the final exit stays
    the trained model's."""
    sd = _trainer(tmp_path / "sd", head="lite")  # exits after layer2.1, layer3.1, layer4.1
    sd.fit(max_steps=2, progress=False)
    ckpt = tmp_path / "sd" / "best.pt"
    trained = torch.load(ckpt, weights_only=False)["model"]
    grown = _trainer(tmp_path / "grown", head="lite", exits=4, exit_blocks=(1, 4, 6),
                     init=str(ckpt), init_heads=True, freeze_backbone=True)  # fmt: skip
    assert grown.model.exit_points == ("layer1.0", "layer2.1", "layer3.1", "layer4.1")
    for mine, theirs in ((1, 0), (2, 1)):
        for name, value in grown.model.heads[mine].state_dict().items():
            assert torch.equal(value, trained[f"heads.{theirs}.{name}"]), (mine, name)
    fresh = grown.model.heads[0].state_dict()
    assert any(not torch.equal(v, trained[f"heads.0.{n}"]) for n, v in fresh.items())
    grown.fit(max_steps=2, progress=False)
    x = torch.randn(4, 3, 16, 16)
    before = create_model("resnet18", 4, exits=3, width=0.125, head="lite").eval()
    before.load_state_dict(trained)
    grown.model.eval().to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        assert torch.equal(grown.model(x).logits[-1], before(x).logits[-1])


def test_init_heads_from_a_plain_state_dict_reads_it_as_stage_ends(tmp_path):
    """A plain state_dict (e.g. weights recovered from a stage-end bundle) records no exit
    layout: its heads are read as the stage-end placement for their count, so a block-1 exit
    can be added to it as to a checkpoint."""
    sd = _trainer(tmp_path / "sd", head="lite")  # exits after layer2.1, layer3.1, layer4.1
    sd.fit(max_steps=1, progress=False)
    trained = torch.load(tmp_path / "sd" / "best.pt", weights_only=False)["model"]
    torch.save(trained, tmp_path / "weights.pt")
    grown = _trainer(tmp_path / "grown", head="lite", exits=4, exit_blocks=(1, 4, 6),
                     init=str(tmp_path / "weights.pt"), init_heads=True)  # fmt: skip
    for mine, theirs in ((1, 0), (2, 1), (3, 2)):
        for name, value in grown.model.heads[mine].state_dict().items():
            assert torch.equal(value, trained[f"heads.{theirs}.{name}"]), (mine, name)
    fresh = grown.model.heads[0].state_dict()
    assert any(not torch.equal(v, trained[f"heads.0.{n}"]) for n, v in fresh.items())
    # With as many heads as the run has exits, it is read as the run's own layout, whatever
    # the blocks: a per-block model's recovered weights load back whole.
    grown.fit(max_steps=1, progress=False)
    per_block = torch.load(tmp_path / "grown" / "best.pt", weights_only=False)["model"]
    torch.save(per_block, tmp_path / "per_block.pt")
    again = _trainer(tmp_path / "again", head="lite", exits=4, exit_blocks=(1, 4, 6),
                     init=str(tmp_path / "per_block.pt"), init_heads=True)  # fmt: skip
    for name, value in again.model.heads.state_dict().items():
        assert torch.equal(value, per_block[f"heads.{name}"]), name


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"exits": 3, "exit_blocks": (1, 3)}, "no shallow exit at this run's blocks"),
        ({"exits": 4, "exit_blocks": (1, 4, 6), "head": "pool"}, "after layer2.1 does not fit"),
    ],
)
def test_init_heads_with_no_fitting_head_is_refused(tmp_path, overrides, needle):
    sd = _trainer(tmp_path / "sd", head="lite")
    sd.fit(max_steps=1, progress=False)
    with pytest.raises(InitError, match=needle):
        _trainer(tmp_path / "run", init=str(tmp_path / "sd" / "best.pt"), init_heads=True,
                 **{"head": "lite", **overrides})  # fmt: skip
    assert not (tmp_path / "run" / "best.pt").exists()


def test_init_without_freezing_fine_tunes_everything(tmp_path):
    ckpt = _plain_checkpoint(tmp_path)
    plain_state = torch.load(ckpt, weights_only=False)["model"]
    tuned = _trainer(tmp_path / "ft", init=str(ckpt))
    start = tuned.model.backbone.state_dict()
    assert all(torch.equal(start[k.removeprefix("backbone.")], v)
               for k, v in plain_state.items() if k.startswith("backbone."))  # fmt: skip
    tuned.fit(max_steps=2, progress=False)
    after = tuned.model.state_dict()
    weights = [k for k in plain_state if k.startswith("backbone.") and k.endswith(".weight")]
    assert all(not torch.equal(after[k], plain_state[k]) for k in weights[:3])


def test_init_names_each_seeds_own_weights_with_a_seed_placeholder(tmp_path):
    """A continuation recipe starts seed s from its own first run: "{seed}" in --init."""
    nets = {seed: create_model("resnet18", 4, exits=1, width=0.125) for seed in (0, 3)}
    for seed, net in nets.items():
        torch.save(net.backbone.state_dict(), tmp_path / f"first_s{seed}.pt")
    template = str(tmp_path / "first_s{seed}.pt")
    trainer = _trainer(tmp_path / "run", init=template, seed=3, freeze_backbone=True)
    assert trainer.cfg.init == template  # config.json keeps the recipe, not one seed's file
    mine = trainer.model.backbone.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in nets[3].backbone.state_dict().items())
    with pytest.raises(InitError, match="first_s5.pt"):
        _trainer(tmp_path / "run5", init=template, seed=5, freeze_backbone=True)


def test_init_from_a_plain_state_dict(tmp_path):
    net = create_model("resnet18", 4, exits=1, width=0.125)
    path = tmp_path / "weights.pt"
    torch.save(net.backbone.state_dict(), path)
    trainer = _trainer(tmp_path / "run", init=str(path), freeze_backbone=True)
    mine = trainer.model.backbone.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in net.backbone.state_dict().items())


def test_frozen_step_skips_the_backbone_backward():
    """What --freeze-backbone buys: no gradient is ever computed for a backbone weight."""
    model = create_model("resnet18", 4, exits=3, width=0.125).train()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    out = model(torch.randn(2, 3, 16, 16))
    sum(z.sum() for z in out.logits[:-1]).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.heads[0].parameters())


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda t: _cfg_init(t, width=0.25), "its width is 0.125, this run's is 0.25"),
        (lambda t: _cfg_init(t, arch="resnet34"), "its arch is 'resnet18'"),
        (lambda t: _cfg_init(t, num_classes=3), "classes, this run has 4"),
        (lambda t: _cfg_init(t, missing=True), "not found"),
        (lambda t: _cfg_init(t, garbage=True), "weights do not fit"),
    ],
)
def test_init_that_does_not_fit_is_refused(tmp_path, make, needle):
    from training.engine import InitError

    with pytest.raises(InitError, match=needle):
        make(tmp_path)
    assert not (tmp_path / "run" / "last.pt").exists()


def _cfg_init(tmp: Path, **kw) -> Trainer:
    ckpt = _plain_checkpoint(tmp)
    init = str(ckpt)
    if kw.pop("missing", False):
        init = str(tmp / "nope.pt")
    if kw.pop("garbage", False):
        torch.save({"conv1.weight": torch.zeros(3)}, tmp / "g.pt")
        init = str(tmp / "g.pt")
    classes = kw.pop("num_classes", None)
    if classes:
        state = torch.load(ckpt, weights_only=False)
        state["num_classes"] = classes
        torch.save(state, ckpt)
    return _trainer(tmp / "run", init=init, **kw)


def test_cli_freeze_without_init_exit_2(tmp_path):
    proc = _cli("--out", str(tmp_path / "run"), "--data-dir", str(tmp_path), "--freeze-backbone")
    assert proc.returncode == 2 and "needs --init" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_frozen_exits_export_the_plain_model_bit_for_bit(tmp_path):
    """The exported final exit (full_model.onnx) of exits trained on a frozen backbone gives
    exactly the plain model's exported probabilities, and its manifest names that plain run."""
    import onnxruntime as ort

    from core.bundle import load_manifest
    from training.export import ExportOptions, export_checkpoint

    ckpt = _plain_checkpoint(tmp_path)
    (tmp_path / "plain" / "test_metrics.json").write_text(json.dumps({"best": {"acc_last": 30.0}}))
    frozen = _trainer(tmp_path / "exits", init=str(ckpt), freeze_backbone=True)
    frozen.fit(max_steps=2, progress=False)
    opts = ExportOptions(exporter="torchscript", progress=False)
    export_checkpoint(tmp_path / "plain" / "best.pt", tmp_path / "b_plain", opts)
    export_checkpoint(
        tmp_path / "exits" / "best.pt",
        tmp_path / "b_exits",
        ExportOptions(exporter="torchscript", progress=False, baseline_run=str(tmp_path / "plain")),
    )
    x = np.random.default_rng(0).normal(size=(8, 3, 16, 16)).astype(np.float32)
    outs = []
    for bundle in ("b_plain", "b_exits"):
        sess = ort.InferenceSession(
            str(tmp_path / bundle / "full_model.onnx"), providers=["CPUExecutionProvider"]
        )
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x})[0])
    assert np.array_equal(outs[0], outs[1])
    manifest = load_manifest(tmp_path / "b_exits")
    assert manifest.baseline.recipe == "plain" and manifest.baseline.file is None


def test_frozen_backbone_picks_best_on_the_trained_heads():
    """On a frozen backbone the last exit never changes; best.pt follows the heads instead
    (seen: a frozen run kept its epoch-1 heads, 45.9 % at exit 1 vs 67.8 % at the end)."""
    from training.config import TrainConfig
    from training.engine import selection_metric

    epoch1 = {
        "val_acc_exit1": 40.0,
        "val_acc_exit2": 60.0,
        "val_acc_exit3": 87.5,
        "val_acc_last": 87.5,
    }
    epoch8 = {
        "val_acc_exit1": 70.0,
        "val_acc_exit2": 76.0,
        "val_acc_exit3": 87.5,
        "val_acc_last": 87.5,
    }
    frozen = TrainConfig(exits=3, init="plain.pt", freeze_backbone=True)
    assert selection_metric(frozen, epoch1) == 50.0
    assert selection_metric(frozen, epoch8) == 73.0
    joint = TrainConfig(exits=3)
    assert selection_metric(joint, epoch8) == 87.5
    named = TrainConfig(exits=3, init="plain.pt", freeze_backbone=True, best_metric="val_acc_exit1")
    assert selection_metric(named, epoch8) == 70.0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--exit-blocks", "3,2"], "strictly increasing"),
        (["--exit-blocks", "0,4"], "outside resnet18's blocks 1..8"),
        (["--exit-blocks", "layer7.0"], "no block of resnet18"),
    ],
)
def test_cli_bad_exit_blocks_exit_2(tmp_path, capsys, args, needle):
    assert_train_refuses(tmp_path, capsys, args, needle)


def test_exit_blocks_fix_the_exit_count_and_train():
    cfg = _cfg(exit_blocks=(1, 3, 5, 7)).resolved()
    assert cfg.exits == 5
    assert TrainConfig.from_dict(
        {**cfg.to_dict(), "exit_blocks": "layer1.0,layer2.0"}
    ).exit_blocks == (1, 3)
    trainer = Trainer(cfg, "unused", train_data=_arrays(16, 0), val_data=None)
    stats = trainer.train_step(*next(iter(trainer.train_loader.epoch(0))))
    assert math.isfinite(stats["total"]) and trainer.model.num_exits == 5


def test_init_seed_gives_every_draw_the_same_fresh_heads(tmp_path):
    """Draws meant for a soup: with one `init_seed`, runs of different seeds start from the
    same weights, including a head --init does not supply; their data order still follows
    `seed`. Without it each seed draws its own weights (heads that then do not average)."""
    sd = _trainer(tmp_path / "sd", head="lite")
    sd.fit(max_steps=1, progress=False)
    start = str(tmp_path / "sd" / "best.pt")
    common = {"head": "lite", "exits": 4, "exit_blocks": (1, 4, 6), "init": start,
              "init_heads": True}  # fmt: skip
    a = _trainer(tmp_path / "a", seed=1, init_seed=7, **common)
    b = _trainer(tmp_path / "b", seed=2, init_seed=7, **common)
    c = _trainer(tmp_path / "c", seed=2, **common)
    stream_c = torch.get_rng_state()
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(v, state_b[k]) for k, v in state_a.items())
    fresh_c = c.model.heads[0].state_dict()
    assert any(not torch.equal(v, state_a[f"heads.0.{n}"]) for n, v in fresh_c.items())
    # init_seed == seed is the run without one (the same global stream afterwards too).
    same = _trainer(tmp_path / "same", seed=2, init_seed=2, **common)
    assert torch.equal(torch.get_rng_state(), stream_c)
    assert all(torch.equal(v, c.model.state_dict()[k]) for k, v in same.model.state_dict().items())
    # The data order still follows `seed`.
    first = [t.train_loader.rows(0, 0) for t in (a, b, c)]
    assert not torch.equal(first[0], first[1]) and torch.equal(first[1], first[2])
    with pytest.raises(ValueError, match="init_seed must be >= 0"):
        _trainer(tmp_path / "bad", init_seed=-1)
