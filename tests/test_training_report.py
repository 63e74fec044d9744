"""earlyexit-train-report: the SD-vs-baseline report from two run directories."""

from __future__ import annotations

import json

import pytest

from training.report import main, measure_step_ratio


def _run_dir(path, config: dict, test_final: dict, val_keys: list[str]):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    lines = [
        json.dumps({"epoch": e, "epoch_seconds": 10.0 + e, **dict.fromkeys(val_keys, 10.0 * e)})
        for e in (1, 2)
    ]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (path / "test_metrics.json").write_text(json.dumps({"final": test_final}))
    return path


@pytest.mark.parametrize("head", ["attention", "lite"])
def test_step_ratio_times_the_configured_heads(head):
    result = measure_step_ratio("resnet18", 0.125, 3, batch_size=4, steps=2, threads=1, head=head)
    assert result["sd_step_s"] > 0 and result["baseline_step_s"] > 0
    assert result["ratio"] == pytest.approx(result["sd_step_s"] / result["baseline_step_s"])


def test_report_names_the_head_and_the_gain(tmp_path):
    config = {"arch": "resnet18", "width": 0.125, "exits": 2, "head": "lite", "epochs": 2,
              "schedule": "cosine", "seed": 0, "batch_size": 4}  # fmt: skip
    sd = _run_dir(tmp_path / "sd", config, {"acc_exit1": 50.0, "acc_exit2": 61.0,
                  "acc_last": 61.0, "acc_ensemble": 60.0}, ["val_acc_exit1", "val_acc_exit2"])  # fmt: skip
    base = _run_dir(tmp_path / "base", {**config, "exits": 1}, {"acc_exit1": 60.0,
                    "acc_last": 60.0}, ["val_acc_exit1"])  # fmt: skip
    out = tmp_path / "out"
    argv = ["--sd", str(sd), "--baseline", str(base), "--out", str(out), "--steps", "2",
            "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["deepest_gain_points"] == pytest.approx(1.0)
    assert report["step_time"]["ratio"] > 0
    text = (out / "report.md").read_text()
    assert "head=lite" in text and "1.00 points" in text
    assert (out / "val_accuracy.png").stat().st_size > 1000


def test_a_directory_that_is_not_a_run_exits_2(tmp_path, capsys):
    argv = ["--sd", str(tmp_path), "--baseline", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a finished run directory" in err[0]
