"""`earlyexit-train` refusing bad input, run in process: the refusal happens before any training,
so a subprocess per case (about 2 s of importing torch each) buys nothing over calling `main`.
tests/test_training_engine.py::test_cli_malformed_data_dir_exit_2 keeps one real process."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def assert_train_refuses(tmp_path: Path, capsys: Any, args: Sequence[str], needle: str) -> None:
    """`earlyexit-train --out TMP/run --data-dir TMP ARGS` exits 2 with one stderr line holding
    `needle`, and writes nothing."""
    import torch

    from training.cli import main

    out = tmp_path / "run"
    threads = torch.get_num_threads()  # a refusal inside the trainer must not leak its setting
    capsys.readouterr()
    try:
        code = main(["--out", str(out), "--data-dir", str(tmp_path), *args])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    finally:
        torch.set_num_threads(threads)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not out.exists()
