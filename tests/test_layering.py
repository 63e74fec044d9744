"""Dependencies point one way: core ← thresholds ← serving ← benchmarks, core ← training.

Checked on the source (every import, the lazy ones inside functions included) and on a running
interpreter (what importing the server actually loads)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Package -> top-level modules it must never import (anywhere in its source).
FORBIDDEN = {
    "core": {"training", "thresholds", "serving", "benchmarks", "torch", "onnxruntime", "fastapi"},
    "serving": {"training", "benchmarks", "torch"},
    "thresholds": {"training", "benchmarks", "torch"},
    "training": {"benchmarks"},
}


def imported_modules(path: Path) -> set[str]:
    """Every module name an `import` or `from ... import` in `path` names (absolute only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported_modules(path):
            if name.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}: {name}")
    assert not bad, bad


def test_serving_never_imports_the_dataset_readers() -> None:
    """core.datasets is left out of the server image (docker/Dockerfile)."""
    bad = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "serving").rglob("*.py"))
        if "core.datasets" in imported_modules(path)
    ]
    assert not bad, bad


def test_server_start_loads_no_benchmark_dataset_or_heavy_module() -> None:
    code = (
        "import sys\n"
        "import serving.app, serving.cli, serving.service, serving.runtime\n"
        "heavy = ('benchmarks', 'core.datasets', 'training', 'torch', 'matplotlib')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
