"""`earlyexit-tune` from saved calibration arrays on a hand-written bundle: outputs, files,
bad input (exit 2, one line), atomic writes, and pushing to a server."""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from core.bundle import read_thresholds
from core.calibration import load_calibration, save_calibration
from core.decision import decide
from thresholds.cli import main
from thresholds.frontier import is_nondominated
from thresholds.synthetic import synthetic_calibration

EXITS, CLASSES = 4, 10
SEGMENT_MACS = [100, 120, 150, 200]
FAST = ["--generations", "25", "--population", "40", "--grid-steps", "9"]


def write_fake_bundle(root: Path, exits: int = EXITS, classes: int = CLASSES) -> Path:
    """A manifest naming placeholder segment files with their real sha256s: enough for tuning
    from saved calibration with MAC costs, which never executes a segment."""
    bundle = root / "bundle"
    bundle.mkdir()
    segments = []
    for k in range(1, exits + 1):
        path = bundle / f"segment_{k}.onnx"
        path.write_bytes(f"placeholder segment {k}".encode())
        last = k == exits
        segments.append(
            {
                "file": path.name,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "input_name": "input" if k == 1 else f"features_{k - 1}",
                "input_shape": [3, 32, 32] if k == 1 else [16, 8, 8],
                "probs_output": f"probs_{k}",
                "feature_output": None if last else f"features_{k}",
                "feature_shape": None if last else [16, 8, 8],
                "macs": SEGMENT_MACS[k - 1] * 10**6,
                "params": 1000,
            }
        )
    full = bundle / "full_model.onnx"
    full.write_bytes(b"placeholder full model")
    manifest = {
        "format": "earlyexit-bundle/1",
        "name": "fake",
        "version": "1",
        "labels": [f"class{i}" for i in range(classes)],
        "input": {"shape": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3},
        "segments": segments,
        "fallback": "ensemble",
        "full_model": {
            "file": full.name,
            "sha256": hashlib.sha256(full.read_bytes()).hexdigest(),
            "macs": 500 * 10**6,
            "params": 1,
        },
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return bundle


def write_calibration(path: Path, split: str, seed: int, rows: int = 3000, **shape) -> Path:
    probs, labels = synthetic_calibration(rows=rows, seed=seed, **shape)
    return save_calibration(path, probs, labels, {"split": split, "dataset": "synthetic"})


def tune_inputs(root: Path) -> tuple[Path, Path, Path]:
    """(bundle, val calibration, test calibration) under `root`."""
    bundle = write_fake_bundle(root)
    val = write_calibration(root / "val.npz", "val", seed=0)
    test = write_calibration(root / "test.npz", "test", seed=1)
    return bundle, val, test


@pytest.fixture
def setup(tmp_path):
    return tune_inputs(tmp_path)


def _run_json(capsys, argv):
    code = main(argv + ["--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_json_result_and_thresholds_file(setup, capsys, tmp_path):
    bundle, val, test = setup
    plots = tmp_path / "plots"
    argv = ["--bundle", str(bundle), "--calibration", str(val), "--test-calibration", str(test)]
    result = _run_json(capsys, argv + FAST + ["--plots", str(plots)])
    for key in ("thresholds", "accuracy", "baseline_accuracy", "acceleration", "fitness",
                "exit_fractions", "method", "seconds", "test", "grid", "global"):  # fmt: skip
        assert key in result
    assert result["method"] == "ga" and result["mode"] == "beta"
    assert len(result["exit_fractions"]) == EXITS + 1
    assert sum(result["exit_fractions"]) == pytest.approx(1.0)
    assert result["test"]["split"] == "test" and result["test"]["rows"] == 3000
    moved = result["test"]["vs_tuning"]
    assert moved["accuracy_difference"] == pytest.approx(
        result["test"]["accuracy"] - result["accuracy"]
    )
    # binomial SEs of two independent samples (tuning rows, 3000 test rows), combined
    se = [(a * (100 - a) / n) ** 0.5 for a, n in ((result["accuracy"], result["rows"]),
                                                  (result["test"]["accuracy"], 3000))]  # fmt: skip
    assert moved["se"] == pytest.approx((se[0] ** 2 + se[1] ** 2) ** 0.5)
    assert moved["z"] == pytest.approx(moved["accuracy_difference"] / moved["se"])
    assert moved["final_exit_difference"] == pytest.approx(
        result["test"]["final_exit"]["accuracy"] - result["exit_accuracies"][EXITS - 1]
    )
    assert moved["acceleration_ratio"] == pytest.approx(
        result["test"]["acceleration"] / result["acceleration"]
    )
    assert result["grid"]["ratio"] > 0.9 and result["grid"]["seconds"] >= 0
    assert result["fitness"] == pytest.approx(
        result["acceleration"] + 1.0 * (result["accuracy"] - result["baseline_accuracy"])
    )
    stored = read_thresholds(bundle, EXITS)
    assert list(stored.values) == result["thresholds"]
    tuned = stored.tuned
    assert tuned["method"] == "ga" and tuned["beta"] == 1.0
    # A file outside the bundle is recorded by name: no machine paths in artifacts.
    assert tuned["data"]["calibration"] == "val.npz"
    assert str(tmp_path) not in (bundle / "thresholds.json").read_text()
    assert set(tuned["metrics"]) == {"val", "test"}
    assert tuned["metrics"]["val"]["accuracy"] == result["accuracy"]
    # The drift reference: exit 1's confidence quantiles on the rows tuned on.
    reference = tuned["reference"]
    val_probs = load_calibration(val)[0]
    assert reference["signal"] == "exit_1_max_probability" and reference["source"] == "val"
    assert reference["rows"] == result["rows"] == len(val_probs)
    np.testing.assert_allclose(
        reference["quantiles"],
        np.quantile(val_probs[:, 0].max(axis=1), np.linspace(0, 1, 101)),
        atol=1e-6,
    )
    # ...and the tuned thresholds' agreement with full depth on them (the alert's basis).
    answers, _ = decide(val_probs, result["thresholds"], "ensemble")
    agree = 100.0 * np.mean(answers.argmax(axis=1) == val_probs[:, -1].argmax(axis=1))
    assert reference["agreement"]["thresholds"] == result["thresholds"]
    assert reference["agreement"]["percent"] == pytest.approx(agree, abs=1e-4)
    assert tuned["metrics"]["test"]["vs_tuning"] == moved
    # the oracle ceiling sits at each split's own accuracy and above its acceleration
    for split in (result, result["test"]):
        ceiling = split["ceiling"]
        assert ceiling["at_accuracy"] == split["accuracy"]
        assert ceiling["acceleration"] >= split["acceleration"]
        assert ceiling["max_accuracy"] >= split["accuracy"]
    assert tuned["metrics"]["val"]["ceiling"] == result["ceiling"]
    for name in ("tradeoff.png", "exit_distribution.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_max_drop_zero_respects_baseline(setup, capsys):
    bundle, val, test = setup
    argv = ["--bundle", str(bundle), "--calibration", str(val), "--test-calibration", str(test)]
    result = _run_json(capsys, argv + FAST + ["--max-drop", "0"])
    assert result["mode"] == "max_drop" and result["max_drop"] == 0.0
    assert result["accuracy"] >= result["baseline_accuracy"]
    assert result["fitness"] == result["acceleration"]
    assert read_thresholds(bundle, EXITS).tuned["max_drop"] == 0.0


def test_pareto_front_files(setup, capsys, tmp_path):
    bundle, val, _ = setup
    plots = tmp_path / "out"
    argv = ["--bundle", str(bundle), "--calibration", str(val), "--pareto", "--plots", str(plots)]
    result = _run_json(capsys, argv + FAST + ["--max-drop", "1"])
    assert result["method"] == "nsga2"
    front = json.loads((plots / "pareto_front.json").read_text())["front"]
    assert len(front) == result["pareto"]["points"] >= 3
    assert is_nondominated(
        np.array([p["accuracy"] for p in front]), np.array([p["acceleration"] for p in front])
    )
    assert (plots / "pareto_front.csv").read_text().count("\n") == len(front) + 1
    assert (plots / "pareto_front.png").is_file()
    assert result["accuracy"] >= result["baseline_accuracy"] - 1.0
    assert result["thresholds"] in [p["thresholds"] for p in front]


def test_dry_run_writes_nothing(setup, capsys):
    bundle, val, _ = setup
    before = {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()}
    result = _run_json(capsys, ["--bundle", str(bundle), "--calibration", str(val), "--dry-run"]
                       + FAST)  # fmt: skip
    assert result["thresholds_file"] is None and result["dry_run"] is True
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == before


def test_restarts_are_recorded_with_each_runs_fitness(setup, capsys):
    bundle, val, _ = setup
    argv = ["--bundle", str(bundle), "--calibration", str(val), "--max-drop", "0.5"] + FAST
    single = [_run_json(capsys, argv + ["--seed", str(s), "--dry-run"])["fitness"] for s in (4, 5)]
    result = _run_json(capsys, argv + ["--seed", "4", "--restarts", "2"])
    assert result["search"]["restarts"] == 2
    assert result["search"]["restart_fitness"] == pytest.approx(single)
    assert result["fitness"] == pytest.approx(max(single))
    tuned = json.loads((bundle / "thresholds.json").read_text())["tuned"]
    assert tuned["search"]["restart_fitness"] == result["search"]["restart_fitness"]


def test_human_summary(setup, capsys):
    bundle, val, test = setup
    argv = ["--bundle", str(bundle), "--calibration", str(val), "--test-calibration", str(test)]
    assert main(argv + ["-q"] + FAST) == 0
    out = capsys.readouterr().out
    assert "thresholds" in out and "grid search" in out and "acceleration" in out
    assert "test - val: accuracy" in out and "chance alone" in out
    assert "val: an oracle that knows the labels reaches" in out
    assert "test: exact McNemar vs the final exit: right for the thresholds alone on" in out


def test_limit_tunes_on_the_first_rows_and_records_it(setup, capsys, tmp_path):
    bundle, val, test = setup
    argv = ["--bundle", str(bundle), "--test-calibration", str(test)] + FAST
    limited = _run_json(capsys, argv + ["--calibration", str(val), "--limit", "500"])
    # The same search on a file holding only those rows picks the same thresholds.
    probs, labels = synthetic_calibration(rows=3000, seed=0)
    first = save_calibration(tmp_path / "first500.npz", probs[:500], labels[:500], {"split": "val"})
    alone = _run_json(capsys, argv + ["--calibration", str(first), "--dry-run"])
    assert limited["rows"] == 500 and limited["limit"] == 500
    assert limited["thresholds"] == alone["thresholds"]
    assert limited["accuracy"] == alone["accuracy"]
    assert limited["test"]["rows"] == 3000  # the held-out report keeps its whole split
    tuned = read_thresholds(bundle, EXITS).tuned
    assert tuned["data"]["limit"] == 500 and tuned["metrics"]["val"]["rows"] == 500
    # More rows than the split has: the whole split, and the record says what was asked.
    everything = _run_json(capsys, argv + ["--calibration", str(val), "--limit", "10000"])
    assert everything["rows"] == 3000 and everything["limit"] == 10000
    assert alone["limit"] is None and alone["split_rows"] == 500
    assert tuned["data"]["split_rows"] == 3000
    assert read_thresholds(bundle, EXITS).tuned["data"]["split_rows"] == 3000


def test_limit_is_named_in_the_summary(setup, capsys):
    bundle, val, _ = setup
    argv = ["--bundle", str(bundle), "--calibration", str(val), "--limit", "700", "--dry-run"]
    assert main(argv + FAST) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert "700 rows of 'val' (the first 700 of 3000: --limit)" in first_line, first_line


def test_limit_warns_when_the_first_rows_miss_classes(setup, caplog, tmp_path):
    bundle, _, _ = setup
    # Stored class by class, as an image-folder split is: the first rows are all one class.
    probs, labels = synthetic_calibration(rows=3000, seed=0)
    order = np.argsort(labels, kind="stable")
    by_class = save_calibration(tmp_path / "by_class.npz", probs[order], labels[order], {})
    argv = ["--bundle", str(bundle), "--calibration", str(by_class), "--dry-run", "-q"] + FAST
    assert main(argv + ["--limit", "50"]) == 0
    warned = "--limit 50: the first 50 rows hold 1 of the split's 10 classes"
    assert warned in caplog.text, caplog.text
    caplog.clear()
    assert main(argv + ["--limit", "3000"]) == 0
    assert "classes" not in caplog.text


def _phi_percent(z: float) -> float:
    return 50.0 * (1.0 + math.erf(z / math.sqrt(2.0)))


@pytest.mark.parametrize("confidence", [None, "1.645", "1"])
def test_margin_line_says_what_the_numbers_mean(confidence, setup, capsys):
    bundle, val, test = setup
    argv = ["--bundle", str(bundle), "--calibration", str(val), "--test-calibration", str(test)]
    argv += FAST + ["--max-drop", "0.5", "-q"]
    if confidence is not None:
        argv += ["--confidence", confidence]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    metrics = read_thresholds(bundle, EXITS).tuned["metrics"]
    for split in ("val", "test"):
        margin = metrics[split]["margin"]
        (line,) = [x for x in lines if x.startswith(f"{split}: accuracy drop vs the final exit")]
        drop = margin["drop"]
        measured = (
            f"{drop:.2f} points" if round(drop, 2) >= 0 else f"none, {-drop:.2f} points above it"
        )
        assert line.startswith(
            f"{split}: accuracy drop vs the final exit: {measured} (allowed 0.50)"
        ), line
        # What the search constrains: the measured drop (no --confidence), else its upper bound.
        worst = -margin["lower_bound"]
        verdict = "within the allowance" if worst <= 0.5 + 1e-9 else "over the allowance"
        if confidence is None:
            assert f", {verdict}; from 3000 rows, so uncertain by about ±{margin['se']:.2f}" in line
        else:
            level = f"{_phi_percent(float(confidence)):.1f}".rstrip("0").rstrip(".")
            assert level in {"95", "84.1"}
            assert f"; at {level}% confidence the drop is at most {worst:.2f} points" in line, line
            assert line.endswith(verdict), line
    # The search keeps its promise on the split it tuned on.
    assert -metrics["val"]["margin"]["lower_bound"] <= 0.5 + 1e-9
    assert "at Z = 0 (floor" not in "\n".join(lines)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-bundle", "bundle directory not found"),
        ("exits", "has 3 exits but the bundle has 4"),
        ("classes", "has 7 classes but the bundle has 10"),
        ("beta", "--beta must be"),
        ("eps-high", "--max-drop must be in [0, 100]"),
        ("eps-low", "--max-drop must be in [0, 100]"),
        ("empty", "empty"),
        ("both", "not allowed with argument"),
        ("no-data", "give --dataset and --data-dir"),
        ("no-file", "calibration file not found"),
        ("test-alone", "--test-calibration goes with --calibration"),
        ("bits", "--bits must be"),
        ("unknown-flag", "unrecognized arguments"),
        ("limit-zero", "--limit: must be a positive integer, got 0"),
        ("limit-negative", "--limit: must be a positive integer, got -5"),
        ("limit-text", "--limit: must be a positive integer, got 'ten'"),
        ("restarts-zero", "--restarts must be >= 1, got 0"),
        ("restarts-pareto", "--restarts applies to the GA, not to --pareto"),
        ("certify-no-floor", "--certify goes with --max-drop"),
        ("certify-one", "--certify must be a fraction strictly between 0 and 1, got 1.0"),
        ("certify-pareto", "--certify searches the NSGA-II front itself"),
        ("certify-tiny", "each part needs at least 100"),
    ],
)
def test_bad_input_exits_2_with_one_line(case, message, setup, tmp_path, capsys):
    bundle, val, _ = setup
    argv = ["--bundle", str(bundle), "--calibration", str(val)] + FAST
    if case == "missing-bundle":
        argv[1] = str(tmp_path / "nope")
    elif case == "exits":
        argv[3] = str(write_calibration(tmp_path / "k3.npz", "val", 2, rows=200, exits=3))
    elif case == "classes":
        argv[3] = str(write_calibration(tmp_path / "c7.npz", "val", 2, rows=200, classes=7))
    elif case == "empty":
        empty = np.zeros((0, EXITS, CLASSES), np.float32)
        argv[3] = str(save_calibration(tmp_path / "e.npz", empty, np.zeros(0, np.int64), {}))
    elif case == "no-data":
        argv = ["--bundle", str(bundle)]
    elif case == "test-alone":
        argv = ["--bundle", str(bundle), "--dataset", "cifar10", "--data-dir", str(tmp_path),
                "--test-calibration", str(val)]  # fmt: skip
    elif case == "no-file":
        argv[3] = str(tmp_path / "missing.npz")
    else:
        argv += {
            "beta": ["--beta", "-1"],
            "eps-high": ["--max-drop", "150"],
            "eps-low": ["--max-drop", "-0.5"],
            "both": ["--beta", "1", "--max-drop", "1"],
            "bits": ["--bits", "1"],
            "unknown-flag": ["--frobnicate"],
            "limit-zero": ["--limit", "0"],
            "limit-negative": ["--limit", "-5"],
            "limit-text": ["--limit", "ten"],
            "restarts-zero": ["--restarts", "0"],
            "restarts-pareto": ["--restarts", "2", "--pareto"],
            "certify-no-floor": ["--certify", "0.5"],
            "certify-one": ["--max-drop", "0.5", "--certify", "1"],
            "certify-pareto": ["--max-drop", "0.5", "--certify", "0.5", "--pareto"],
            "certify-tiny": ["--max-drop", "0.5", "--certify", "0.01"],
        }[case]
    before = sorted(p.name for p in bundle.iterdir()) if bundle.is_dir() else None
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and message in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    if before is not None:
        assert sorted(p.name for p in bundle.iterdir()) == before


def test_stderr_is_one_line_for_usage_errors(setup, capsys):
    bundle, val, _ = setup
    assert main(["--bundle", str(bundle), "--calibration", str(val), "--beta", "-2", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["earlyexit-tune: error: --beta must be a finite number >= 0, got -2.0"]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_interrupted_write_keeps_old_thresholds(failing, setup, capsys, monkeypatch):
    bundle, val, _ = setup
    old = '{"thresholds": [0.9, 0.8, 0.7, 0.6], "tuned": {"method": "by-hand"}}\n'
    (bundle / "thresholds.json").write_text(old, encoding="utf-8")

    def crash(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, crash)
    code = main(["--bundle", str(bundle), "--calibration", str(val), "-q"] + FAST)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err
    assert (bundle / "thresholds.json").read_text(encoding="utf-8") == old
    assert sorted(p.name for p in bundle.iterdir() if p.name.startswith(".")) == []


class _AdminHandler(BaseHTTPRequestHandler):
    received: list[dict] = []
    status = 200

    def do_PUT(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": json.loads(body)}
        )
        payload = json.dumps({"detail": "wrong token"} if self.status != 200 else {"ok": True})
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def admin_server():
    _AdminHandler.received = []
    _AdminHandler.status = 200
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AdminHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _AdminHandler
    server.shutdown()
    server.server_close()


def test_notify_pushes_thresholds(setup, capsys, monkeypatch, admin_server):
    bundle, val, _ = setup
    url, handler = admin_server
    monkeypatch.setenv("EARLYEXIT_ADMIN_TOKEN", "s3cret")
    result = _run_json(capsys, ["--bundle", str(bundle), "--calibration", str(val),
                                "--notify", url + "/"] + FAST)  # fmt: skip
    assert result["notified"] == url + "/v1/thresholds"
    [request] = handler.received
    assert request["path"] == "/v1/thresholds"
    assert request["auth"] == "Bearer s3cret"
    assert request["body"]["thresholds"] == result["thresholds"]
    assert request["body"]["tuned"]["method"] == "ga"


def test_notify_failures(setup, capsys, monkeypatch, admin_server):
    bundle, val, _ = setup
    url, handler = admin_server
    argv = ["--bundle", str(bundle), "--calibration", str(val), "--notify", url, "-q"] + FAST
    monkeypatch.delenv("EARLYEXIT_ADMIN_TOKEN", raising=False)
    assert main(argv) == 2
    assert "EARLYEXIT_ADMIN_TOKEN" in capsys.readouterr().err
    assert handler.received == [] and not (bundle / "thresholds.json").exists()
    monkeypatch.setenv("EARLYEXIT_ADMIN_TOKEN", "wrong")
    handler.status = 401
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "answered 401" in err and "thresholds.json was written" in err
    assert (bundle / "thresholds.json").is_file()
