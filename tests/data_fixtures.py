"""Tiny datasets in the official on-disk layouts, written by tests (never real data)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

from core.datasets import CIFAR10_CLASSES

CIFAR10_NAMES = list(CIFAR10_CLASSES)


def _rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_tiny_cifar10(root: Path, per_batch: int = 20, seed: int = 0) -> Path:
    """cifar-10-batches-py/ with 5 train batches + test batch of `per_batch` rows each."""
    rng = np.random.default_rng(seed)
    out = root / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "batch_label": name,
            "labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            "data": _rows(rng, per_batch),
        }
        with open(out / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    with open(out / "batches.meta", "wb") as fh:
        pickle.dump(
            {"label_names": CIFAR10_NAMES, "num_cases_per_batch": per_batch}, fh, protocol=2
        )
    return root


def write_tiny_cifar100(root: Path, n: int = 30, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    out = root / "cifar-100-python"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "test"):
        batch = {
            "data": _rows(rng, n),
            "fine_labels": [int(v) for v in rng.integers(0, 100, n)],
            "coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
        }
        with open(out / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    meta = {
        "fine_label_names": [f"fine{i}" for i in range(100)],
        "coarse_label_names": [f"coarse{i}" for i in range(20)],
    }
    with open(out / "meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def write_tiny_fashion_mnist(root: Path, n: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return root
