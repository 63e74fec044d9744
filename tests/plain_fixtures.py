"""A copy of the tiny bundle with a plain model of its own (`baseline.onnx`), for the tests of
`earlyexit-serve --full-model` and of the two-server HTTP comparison.

The plain model is another tiny network (another seed) exported by the real export library;
its `full_model.onnx` becomes the copy's `baseline.onnx`, recorded in the manifest's `baseline`
block with its sha256, as `earlyexit-export --baseline-run` records one. Its answers differ
from the bundle's own `full_model.onnx`, so a test can tell which graph a server ran.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

BASELINE_FILE = "baseline.onnx"


def export_plain_graph(out_dir: Path, seed: int = 1) -> Path:
    """The single-graph ONNX of a tiny network initialised with `seed` (a file in `out_dir`)."""
    from tests.conftest import build_tiny_model, tiny_checkpoint
    from training.export import ExportOptions, export_checkpoint

    bundle = out_dir / f"plain-seed{seed}"
    options = ExportOptions(name="plain", version="1", exporter="torchscript", progress=False)
    export_checkpoint(tiny_checkpoint(build_tiny_model(seed=seed)), bundle, options)
    return bundle / "full_model.onnx"


def with_baseline(bundle: Path, plain_graph: Path, out: Path) -> Path:
    """A copy of `bundle` at `out` whose manifest names `plain_graph` as its baseline model."""
    from core.bundle import MANIFEST_FILE, sha256_file

    shutil.copytree(bundle, out)
    shutil.copyfile(plain_graph, out / BASELINE_FILE)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["baseline"] = {
        "recipe": "plain-test",
        "accuracy": {"val": 10.0, "test": 10.0},
        "file": BASELINE_FILE,
        "sha256": sha256_file(out / BASELINE_FILE),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return out
