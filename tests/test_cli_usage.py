"""Every console script answers bad usage with one line on stderr and exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("module", "args", "needle"),
    [
        ("training.cli", ["--out", "x", "--bogus"], "unrecognized arguments"),
        ("training.export_cli", ["--out", "x"], "--checkpoint"),
        ("training.soup_cli", ["a.pt", "b.pt"], "--out"),
        ("thresholds.cli", ["--bundle", "x", "--beta", "nan-ish"], "--beta"),
        ("serving.cli", ["--port", "notaport"], "--port"),
        ("benchmarks.cli", ["--bundle", "x"], "--dataset"),
        (
            "benchmarks.cli",
            ["--bundle", "x", "--dataset", "cifar10", "--providers", "tpu"],
            "unknown execution provider 'tpu'",
        ),
        (
            "thresholds.cli",
            ["--bundle", "x", "--providers", ","],
            "at least one execution provider",
        ),
    ],
)
def test_argparse_errors_are_one_line_exit_2(module, args, needle):
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "error:" in lines[0] and needle in lines[0], proc.stderr
