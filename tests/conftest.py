"""Shared fixtures: a tiny 3-exit bundle exported by the real export library.

`tiny_bundle` is exported once per test session from a randomly initialised ResNet18 (width
0.125, 3 exits, 3×32×32, 10 classes) and must not be modified; tests that mutate a bundle copy
it first with `copy_bundle` (or use the `bundle_copy` fixture). Its thresholds.json is chosen
on `tiny_images` so that every exit accepts some rows and some rows fall back (ensemble).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

TINY_ARCH = "resnet18"
TINY_WIDTH = 0.125
TINY_EXITS = 3
TINY_SHAPE = (3, 32, 32)
TINY_CLASSES = [f"class{i}" for i in range(10)]
TINY_MEAN = [0.4914, 0.4822, 0.4465]
TINY_STD = [0.2470, 0.2435, 0.2616]
TINY_ROWS = 64
# Fractions of the rows reaching each exit that it accepts under the fixture's thresholds.json
# (about 1/2, 1/4, 3/16 of all rows; the last 1/16 falls back to the ensemble).
_EXIT_QUANTILES = (1 / 2, 1 / 2, 3 / 4)


def build_tiny_model(exits: int = TINY_EXITS, seed: int = 0):
    """A random ResNet18 multi-exit network with confident, varied exits (eval mode)."""
    import torch

    from training.models import create_model

    torch.manual_seed(seed)
    model = create_model(
        TINY_ARCH, len(TINY_CLASSES), exits=exits, width=TINY_WIDTH, stem="cifar", in_chans=3
    )
    # Random init gives near-uniform softmax at the shallow exits and a saturated one at the last.
    # Non-trivial BatchNorm statistics and classifier weights rescaled so that every exit's
    # logits have a standard deviation of ~1.5 give varied, moderate confidences at every exit.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        model.eval()
        probe = torch.from_numpy(normalise(tiny_uint8_images(32, seed=123)))
        for head, logits in zip(model.heads, model(probe).logits, strict=True):
            head.fc.weight.mul_(1.5 / float(logits.std()))
            head.fc.bias.zero_()
    return model.eval()


def tiny_checkpoint(model, exits: int = TINY_EXITS) -> dict:
    """A checkpoint dict shaped like training.engine's, for `model`."""
    from training.costs import measure_costs

    return {
        "model": model.state_dict(),
        "config": {
            "arch": TINY_ARCH,
            "width": TINY_WIDTH,
            "stem": "cifar",
            "exits": exits,
            "dataset": "cifar10",
            "data_dir": None,
            "val_size": 5000,
            "split_seed": 0,
            "loss": "sd",
        },
        "num_classes": len(TINY_CLASSES),
        "classes": list(TINY_CLASSES),
        "input_shape": list(TINY_SHAPE),
        "mean": list(TINY_MEAN),
        "std": list(TINY_STD),
        "costs": measure_costs(model, TINY_SHAPE).to_dict(),
        "val_metrics": {"exit_accuracy": [10.0] * exits},
        "epoch": 0,
        "git_commit": "0" * 40,
    }


def tiny_uint8_images(n: int = TINY_ROWS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(
        0, 256, size=(n, TINY_SHAPE[1], TINY_SHAPE[2], TINY_SHAPE[0]), dtype=np.uint8
    )


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 N×H×W×C → float32 NCHW with the tiny bundle's mean/std."""
    x = images.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(TINY_MEAN, np.float32)) / np.asarray(TINY_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _midpoint_quantile(values: np.ndarray, q: float) -> float:
    """A threshold that accepts about fraction q of `values`, halfway between two of them so no
    row sits on the boundary (onnxruntime and torch differ by ~1e-7)."""
    ordered = np.sort(values.astype(np.float64))
    cut = int(round(len(ordered) * (1.0 - q)))
    cut = min(max(cut, 1), len(ordered) - 1)
    return float((ordered[cut - 1] + ordered[cut]) / 2.0)


def fixture_thresholds(exit_probs: np.ndarray) -> list[float]:
    """Thresholds under which every exit accepts some of these rows and some fall back."""
    max_probs = exit_probs.max(axis=2)
    remaining = np.ones(len(max_probs), dtype=bool)
    values = []
    for j, q in enumerate(_EXIT_QUANTILES):
        t = _midpoint_quantile(max_probs[remaining, j], q)
        values.append(t)
        remaining &= ~(max_probs[:, j].astype(np.float64) > t)
    return values


@pytest.fixture(scope="session")
def tiny_model():
    return build_tiny_model()


@pytest.fixture(scope="session")
def tiny_images():
    """`core.datasets.ImageArrays` with TINY_ROWS random uint8 images; labels agree with
    the tiny model's final exit on about 70% of the rows, so accuracies are meaningful."""
    import torch

    from core.datasets import ImageArrays

    images = tiny_uint8_images()
    model = build_tiny_model()
    with torch.no_grad():
        final = model(torch.from_numpy(normalise(images))).logits[-1].argmax(dim=1).numpy()
    rng = np.random.default_rng(1)
    labels = np.where(rng.random(len(final)) < 0.7, final, rng.integers(0, 10, len(final)))
    return ImageArrays(images, labels.astype(np.int64), tuple(TINY_CLASSES))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model, tiny_images) -> Path:
    """Path to a read-only-by-convention 3-exit bundle (ensemble fallback, stage files)."""
    import torch

    from core.bundle import Thresholds, write_thresholds
    from training.export import ExportOptions, export_checkpoint

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    # The TorchScript exporter takes ~1 s here against ~15 s for dynamo; the dynamo path (the
    # default) is covered by tests/test_export_bundle.py.
    options = ExportOptions(
        name="tiny-resnet18", version="1", exporter="torchscript", progress=False
    )
    export_checkpoint(tiny_checkpoint(tiny_model), out, options)
    with torch.no_grad():
        logits = tiny_model(torch.from_numpy(normalise(tiny_images.images))).logits
        exit_probs = torch.stack([torch.softmax(z, dim=1) for z in logits], dim=1).numpy()
    values = fixture_thresholds(exit_probs)
    write_thresholds(out, Thresholds(tuple(values), {"method": "test-fixture"}))
    return out


def copy_bundle(src: Path, dst: Path) -> Path:
    """Copy a bundle directory (for tests that corrupt or re-tune it)."""
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    return copy_bundle(tiny_bundle, tmp_path / "bundle")


@pytest.fixture(scope="session")
def plain_graph(tmp_path_factory) -> Path:
    """The single-graph ONNX of another tiny network (tests.plain_fixtures), exported once for
    the `--full-model` and two-server comparison tests."""
    from tests.plain_fixtures import export_plain_graph

    return export_plain_graph(tmp_path_factory.mktemp("plain-graph"))
