"""A training command run as a real process, for the tests that signal it mid-run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_until_files(
    module: str, args: list[str], files: list[Path], seconds: float
) -> subprocess.Popen[str]:
    """Start `python -m MODULE ARGS` from the repository root on one thread (stderr merged
    into stdout) and return once every path in `files` exists, or after `seconds`, asserting
    the process is still running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + seconds
    while not all(f.is_file() for f in files) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    return proc
