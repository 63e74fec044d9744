"""earlyexit-compare: the exact McNemar test by hand, the protocol check, and a real two-arm,
two-seed comparison of tiny runs on tiny CIFAR-10 files."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.stats import mcnemar, pooled_difference
from tests.data_fixtures import write_tiny_cifar10

ROOT = Path(__file__).resolve().parents[1]


def test_mcnemar_exact_by_hand():
    # 3 rows only A gets right, 1 row only B: two-sided exact p = 2·P(X ≤ 1 | n=4, ½) = 10/16.
    a = np.array([1, 1, 1, 0, 1, 0], bool)
    b = np.array([0, 0, 0, 1, 1, 0], bool)
    got = mcnemar(a, b)
    assert (got.only_a, got.only_b, got.rows) == (3, 1, 6)
    assert math.isclose(got.p_value, 10 / 16)
    assert math.isclose(got.difference_points, 100 * (1 - 3) / 6)
    assert mcnemar(a, a).p_value == 1.0  # no discordant rows


def test_pooled_difference_by_hand():
    # Two seeds, four images. Per image, d = mean over seeds of (B right) − (A right):
    # image 0: (1 + 1)/2 = 1; image 1: (0 + 1)/2 = 0.5; image 2: (−1 + 0)/2 = −0.5; image 3: 0.
    a = [np.array([0, 1, 1, 1], bool), np.array([0, 0, 1, 1], bool)]
    b = [np.array([1, 1, 0, 1], bool), np.array([1, 1, 1, 1], bool)]
    got = pooled_difference(a, b)
    d = np.array([1.0, 0.5, -0.5, 0.0])
    se = math.sqrt(((d - d.mean()) ** 2).sum() / 3 / 4)  # sample SD over √rows
    assert (got.rows, got.replicates) == (4, 2)
    assert got.difference_points == pytest.approx(100 * 0.25)
    assert got.se_points == pytest.approx(100 * se)
    assert got.p_value == pytest.approx(math.erfc(0.25 / se / math.sqrt(2)))
    # An image counts once however many seeds score it: the same seed twice leaves the
    # difference and its SE as they are, where summed McNemar counts would double.
    one = pooled_difference(a[:1], b[:1])
    twice = pooled_difference(a[:1] * 2, b[:1] * 2)
    assert (twice.difference_points, twice.se_points) == (one.difference_points, one.se_points)
    assert pooled_difference(a, a).p_value == 1.0  # no difference at all
    for bad in (([], []), (a, b[:1]), ([a[0]], [b[0][:3]]), ([a[0][:1]], [b[0][:1]])):
        with pytest.raises(ValueError):
            pooled_difference(*bad)


def test_mcnemar_large_n_matches_normal_approximation():
    # 60 rows only A gets right, 100 only B, 9 000 both, 840 neither.
    a = np.array([1] * 60 + [0] * 100 + [1] * 9000 + [0] * 840, bool)
    b = np.array([0] * 60 + [1] * 100 + [1] * 9000 + [0] * 840, bool)
    got = mcnemar(a, b)
    assert (got.only_a, got.only_b) == (60, 100)
    n = got.only_a + got.only_b
    z = (abs(got.only_a - got.only_b) - 1) / math.sqrt(n)
    approx = math.erfc(z / math.sqrt(2))  # two-sided, continuity-corrected
    assert 0.001 < got.p_value < 0.005
    assert got.p_value == pytest.approx(approx, rel=0.15)
    with pytest.raises(ValueError):
        mcnemar(a, b[:10])


def _arm(path: Path, body: str, data: Path) -> Path:
    path.write_text(
        body + "arch: resnet18\nwidth: 0.125\ndataset: cifar10\n"
        f"data_dir: {data}\nval_size: 20\nepochs: 1\nbatch_size: 16\nschedule: linear\n"
        "nesterov: true\n"
    )
    return path


def _compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.compare_cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )


def _compare_here(capsys, *args: str) -> tuple[int, str]:
    """(exit code, stderr) of earlyexit-compare run in process: for refusals and --report-only,
    which start no training process."""
    from training.compare_cli import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_arms(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    data = write_tiny_cifar10(root / "data", per_batch=24)
    base = _arm(root / "baseline.yaml", "loss: baseline\nexits: 1\n", data)
    sd = _arm(root / "sd_code.yaml", "loss: self_distillation\nexits: 2\nhead: lite\n", data)
    return root, base, sd


def test_two_arms_two_seeds_train_resume_and_report(tiny_arms):
    root, base, sd = tiny_arms
    out, runs = root / "report", root / "runs"
    args = ["--arms", str(base), str(sd), "--reference", "baseline", "--seeds", "0,1"]
    args += ["--runs", str(runs), "--out", str(out), "--step-steps", "2", "--parallel", "2"]
    proc = _compare(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    assert report["reference"] == "baseline" and report["seeds"] == [0, 1]
    sd_arm = report["arms"]["sd_code"]
    assert len(sd_arm["mean_exit_accuracy"]) == 2
    diffs = []  # per seed, per image: (SD right) − (reference right)
    for seed in ("0", "1"):
        entry = sd_arm["per_seed"][seed]
        preds = np.load(runs / f"sd_code_s{seed}" / "test_predictions.npz")
        labels = preds["labels"]
        # The reported accuracy is the predictions' own, and McNemar counts agree with them.
        want = 100.0 * float((preds["predictions"][-1] == labels).mean())
        assert entry["exit_accuracy"][-1] == pytest.approx(want)
        ref = np.load(runs / f"baseline_s{seed}" / "test_predictions.npz")
        ref_ok = ref["predictions"][-1] == labels
        sd_ok = preds["predictions"][-1] == labels
        diffs.append(sd_ok.astype(float) - ref_ok.astype(float))
        mc = entry["deepest_vs_reference"]
        assert mc["only_a"] == int((ref_ok & ~sd_ok).sum())
        assert mc["only_b"] == int((~ref_ok & sd_ok).sum())
        # The ensemble (mean softmax of the exits) is scored and tested the same way, and its
        # accuracy is the one the training run's own test report gives.
        ens_ok = preds["ensemble"] == labels
        assert entry["ensemble_accuracy"] == pytest.approx(100.0 * float(ens_ok.mean()))
        final = json.loads((runs / f"sd_code_s{seed}" / "test_metrics.json").read_text())["final"]
        assert entry["ensemble_accuracy"] == pytest.approx(final["acc_ensemble"])
        ens_mc = entry["ensemble_vs_reference"]
        assert ens_mc["only_a"] == int((ref_ok & ~ens_ok).sum())
        assert ens_mc["only_b"] == int((~ref_ok & ens_ok).sum())
    # One test over both seeds, the test image as the unit, from the same predictions.
    pooled = sd_arm["deepest_pooled_vs_reference"]
    per_image = np.mean(diffs, axis=0)
    assert pooled["replicates"] == 2 and pooled["rows"] == per_image.size
    assert pooled["difference_points"] == pytest.approx(100 * per_image.mean())
    assert pooled["difference_points"] == pytest.approx(sd_arm["deepest_difference_points"]["mean"])
    assert "deepest_pooled_vs_reference" not in report["arms"]["baseline"]
    # One exit has no ensemble of its own.
    assert "ensemble_accuracy" not in report["arms"]["baseline"]["per_seed"]["0"]
    assert len(sd_arm["ensemble_difference_points"]["per_seed"]) == 2
    assert sd_arm["step_time_ratio"] > 0
    assert report["pairs"] == []
    md = (out / "README.md").read_text()
    assert "`sd_code`" in md and "p=" in md and (out / "compare.png").stat().st_size > 1000
    assert "ensemble − ref (per seed, p)" in md
    assert "; pooled " in md and "`pooled`: one test over every seed" in md
    # Finished runs are not retrained: a second call only reports.
    mtime = (runs / "sd_code_s0" / "last.pt").stat().st_mtime
    again = _compare(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (runs / "sd_code_s0" / "last.pt").stat().st_mtime == mtime


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--reference", "nope"], "is not an arm"),
        (["--reference", "baseline", "--seeds", "0,x"], "--seeds"),
        (["--reference", "baseline", "--parallel", "0"], "must be ≥ 1"),
    ],
)
def test_bad_usage_is_one_line_exit_2(tiny_arms, tmp_path, capsys, extra, needle):
    root, base, sd = tiny_arms
    code, err = _compare_here(
        capsys, "--arms", str(base), str(sd), "--runs", str(tmp_path / "r"),
        "--out", str(tmp_path / "o"), *extra,
    )  # fmt: skip
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()


def test_missing_starting_weights_refuse_before_any_run_starts(tiny_arms, tmp_path, capsys):
    root, base, sd = tiny_arms
    cont = tmp_path / "cont.yaml"
    cont.write_text(sd.read_text() + f"init: {tmp_path}/first_s{{seed}}.pt\n")
    (tmp_path / "first_s0.pt").write_bytes(b"x")  # seed 0 has one, seed 1 does not
    code, err = _compare_here(
        capsys, "--arms", str(base), str(cont), "--reference", "baseline", "--seeds", "0,1",
        "--runs", str(tmp_path / "r"), "--out", str(tmp_path / "o"),
    )  # fmt: skip
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "cont seed 1" in lines[0], err
    assert "first_s1.pt do not exist" in lines[0]
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()


def test_a_run_of_another_recipe_is_not_reported_under_an_arm(tiny_arms, tmp_path, capsys):
    """A finished-looking run directory whose config.json is another recipe is refused."""
    from training.config import TrainConfig

    root, base, sd = tiny_arms
    runs = tmp_path / "runs"
    for arm, cfg in [
        ("baseline", TrainConfig(loss="baseline", exits=1, epochs=1, alpha=0.3)),
        ("sd_code", TrainConfig(exits=2, epochs=1, alpha=0.5)),
    ]:
        run = runs / f"{arm}_s0"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps(cfg.to_dict()))
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "epoch_seconds": 1.0}) + "\n")
        np.savez(run / "test_predictions.npz", predictions=np.zeros((1, 4), np.int16),
                 labels=np.zeros(4, np.int16))  # fmt: skip
    code, err = _compare_here(
        capsys, "--arms", str(base), str(sd), "--reference", "baseline", "--seeds", "0",
        "--runs", str(runs), "--out", str(tmp_path / "o"), "--report-only",
    )  # fmt: skip
    assert code == 1 and "trained with another recipe" in err, err
    assert not (tmp_path / "o").exists()


def test_arms_must_share_one_protocol(tiny_arms, tmp_path):
    # A real process: the console script's exit code and stderr, as users see them.
    root, base, sd = tiny_arms
    other = tmp_path / "sd_fast.yaml"
    other.write_text(sd.read_text().replace("epochs: 1", "epochs: 3"))
    proc = _compare(
        "--arms", str(base), str(other), "--reference", "baseline",
        "--runs", str(tmp_path / "r"), "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert proc.returncode == 2 and "differs from 'baseline' in epochs" in proc.stderr


def test_an_architecture_ablation_with_vary_and_latency(tiny_arms, tmp_path, capsys):
    """--vary arch lets arms differ in the backbone (one budget otherwise); --latency exports
    each arm and times batch 1 of the exit chain and of the plain graph."""
    root, base, sd = tiny_arms
    vgg = tmp_path / "sd_vgg.yaml"
    vgg.write_text(sd.read_text().replace("arch: resnet18", "arch: vgg11_bn"))
    args = ["--arms", str(base), str(vgg), "--reference", "baseline", "--seeds", "0"]
    args += ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o"), "--step-steps", "1"]
    code, err = _compare_here(capsys, *args)
    assert code == 2 and "in arch" in err and "--vary" in err
    proc = _compare(*args, "--vary", "arch", "--latency")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert report["varied"] == ["arch"]
    arms = report["arms"]
    assert arms["baseline"]["protocol"] == {"arch": "resnet18"}
    assert arms["sd_vgg"]["protocol"] == {"arch": "vgg11_bn"}
    for arm in arms.values():
        latency = arm["latency"]
        assert latency["chain_full_depth_ms"] > 0 and latency["plain_ms"] > 0
        assert latency["chain_over_plain"] == pytest.approx(
            latency["chain_full_depth_ms"] / latency["plain_ms"]
        )
    md = (tmp_path / "o" / "README.md").read_text()
    # Exits by position: block names of two backbones are not one axis.
    assert "| arm | varies | exit K−1 | deepest |" in md and "arch=vgg11_bn" in md
    assert "chain ms" in md and "accuracy_vs_params.png" in md
    assert (tmp_path / "o" / "accuracy_vs_params.png").stat().st_size > 1000
    # A pair tested besides the reference: the same McNemar, the other way round.
    code, err = _compare_here(
        capsys, *args, "--vary", "arch", "--report-only", "--pairs", "sd_vgg:baseline"
    )
    assert code == 0, err[-2000:]
    pair = json.loads((tmp_path / "o" / "compare.json").read_text())["pairs"][0]
    vs_ref = arms["sd_vgg"]["per_seed"]["0"]["deepest_vs_reference"]
    assert (pair["a"], pair["b"]) == ("sd_vgg", "baseline")
    assert pair["per_seed"]["0"]["difference_points"] == pytest.approx(-vs_ref["difference_points"])
    assert pair["per_seed"]["0"]["p_value"] == pytest.approx(vs_ref["p_value"])
    assert "| `sd_vgg` | `baseline` |" in (tmp_path / "o" / "README.md").read_text()
    for pairs in ("sd_vgg", "sd_vgg:nope", "baseline:baseline"):
        code, err = _compare_here(
            capsys, *args, "--vary", "arch", "--report-only", "--pairs", pairs
        )
        assert code == 2 and "--pairs" in err
    code, err = _compare_here(capsys, *args, "--vary", "arch,colour", "--report-only")
    assert code == 2 and "--vary: colour is not a protocol field" in err


def test_sigterm_stops_every_run_with_a_checkpoint(tiny_arms, tmp_path):
    import signal

    from tests.process_helpers import start_until_files

    root, base, sd = tiny_arms
    runs, out = tmp_path / "runs", tmp_path / "report"
    long_base = _arm(tmp_path / "baseline.yaml", "loss: baseline\nexits: 1\n", root / "data")
    long_base.write_text(long_base.read_text().replace("epochs: 1", "epochs: 200"))
    long_sd = tmp_path / "sd_code.yaml"
    long_sd.write_text(sd.read_text().replace("epochs: 1", "epochs: 200"))
    args = ["--arms", str(long_base), str(long_sd), "--reference", "baseline", "--seeds", "0"]
    args += ["--runs", str(runs), "--out", str(out), "--step-steps", "1", "--parallel", "2"]
    metrics = [runs / f"{arm}_s0" / "metrics.jsonl" for arm in ("baseline", "sd_code")]
    proc = start_until_files("training.compare_cli", args, metrics, 300)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=180)[0]
    assert proc.returncode == 1 and "stopped by SIGTERM" in err, err[-3000:]
    for arm in ("baseline", "sd_code"):
        log = (runs / f"{arm}_s0" / "train.log").read_text()
        assert "stopped by SIGTERM" in log and "Traceback" not in log
        assert (runs / f"{arm}_s0" / "last.pt").is_file()
    assert not out.exists()  # nothing reported from unfinished runs
    # no run is left behind: each exited with its checkpoint
    ps = subprocess.run(["pgrep", "-f", str(runs)], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


def test_starting_weights_are_compared_as_the_files_each_seed_names(tmp_path):
    """A recipe whose init names each seed's own weights ("{seed}") accepts a run that started
    from the same bytes under another name, and refuses one that started elsewhere."""
    from training.compare import Arm, check_recipe, render_markdown
    from training.config import TrainConfig

    (tmp_path / "first_s1.pt").write_bytes(b"seed one weights")
    (tmp_path / "copy.pt").write_bytes(b"seed one weights")
    (tmp_path / "other.pt").write_bytes(b"something else")
    arm = Arm("cycle2", TrainConfig(exits=2, epochs=1, init=str(tmp_path / "first_s{seed}.pt")))
    run = tmp_path / "cycle2_s1"
    run.mkdir()
    for started_from, accepted in [
        ("first_s{seed}.pt", True),  # the recipe itself
        ("copy.pt", True),  # the same weights under another name
        ("other.pt", False),
        (None, False),  # from scratch
    ]:
        init = None if started_from is None else str(tmp_path / started_from)
        saved = TrainConfig(exits=2, epochs=1, seed=1, init=init)
        (run / "config.json").write_text(json.dumps(saved.to_dict()))
        if accepted:
            assert check_recipe(run, arm, 1).init == init
            report = {"reference": "cycle2", "seeds": [1], "arms": {"cycle2": {
                "per_seed": {"1": {"init": init, "exit_accuracy": [50.0, 60.0]}},
                "mean_exit_accuracy": [50.0, 60.0], "exit_points": ["layer3", "layer4"]}},
                "budget": {"epochs": 1, "batch_size": 8, "schedule": "linear",
                           "train_subset": None}}  # fmt: skip
            assert f"`cycle2` seed 1: `{init}`" in render_markdown(report, "cmd")
        else:
            with pytest.raises(RuntimeError, match=r"\(init differ"):
                check_recipe(run, arm, 1)
