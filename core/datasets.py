"""Image datasets as numpy arrays (no torch): CIFAR-10/100, Fashion-MNIST, image folders.

Training wraps these in tensors; tuning and benchmarks use them directly. Every reader returns
uint8 images N×H×W×C and int64 labels. The validation split is a deterministic, class-stratified
slice of the official training set, so thresholds are never tuned on test data.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import struct
import tarfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DATASETS = ("cifar10", "cifar100", "fashion-mnist", "imagefolder")
SPLITS = ("train", "val", "test")
DEFAULT_VAL_SIZE = 5000
DEFAULT_SPLIT_SEED = 0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Official archives and their published checksums, for --download on machines with internet.
DOWNLOADS = {
    "cifar10": [
        (
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "md5",
            "c58f30108f718f92721af3b95e74349a",
        )
    ],
    "cifar100": [
        (
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "md5",
            "eb9058c3a382ffc7106e4002c42a8d85",
        )
    ],
    "fashion-mnist": [
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" + name, "md5", digest)
        for name, digest in (
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        )
    ],
}


class DatasetError(ValueError):
    """Missing or malformed data directory; the message says what was expected."""


@dataclass(frozen=True)
class ImageArrays:
    images: np.ndarray  # uint8 N×H×W×C
    labels: np.ndarray  # int64 N
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> ImageArrays:
        return ImageArrays(self.images[index], self.labels[index], self.classes)


# ----------------------------------------------------------------------------- readers


def _unpickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"missing CIFAR file {path}")
    try:
        with open(path, "rb") as fh:
            batch: dict[str, Any] = pickle.load(fh, encoding="latin1")
            return batch
    except Exception as exc:  # corrupt pickle: any unpickling error
        raise DatasetError(f"cannot read CIFAR pickle {path}: {exc}") from exc


def _cifar_images(batch: dict[str, Any], path: Path) -> np.ndarray:
    data = np.asarray(batch.get("data"), dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: 'data' must be N×3072 uint8, got {data.shape}")
    images: np.ndarray = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return images


def read_cifar10(data_dir: str | Path, train: bool) -> ImageArrays:
    root = Path(data_dir) / "cifar-10-batches-py"
    if not root.is_dir():
        raise DatasetError(f"{data_dir} has no cifar-10-batches-py/ (expected the official layout)")
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        batch = _unpickle(root / name)
        images.append(_cifar_images(batch, root / name))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    classes = CIFAR10_CLASSES
    meta = root / "batches.meta"
    if meta.is_file():
        classes = tuple(_unpickle(meta).get("label_names", CIFAR10_CLASSES))
    return ImageArrays(np.concatenate(images), np.concatenate(labels), tuple(classes))


def read_cifar100(data_dir: str | Path, train: bool, coarse: bool = False) -> ImageArrays:
    root = Path(data_dir) / "cifar-100-python"
    if not root.is_dir():
        raise DatasetError(f"{data_dir} has no cifar-100-python/ (expected the official layout)")
    name = "train" if train else "test"
    batch = _unpickle(root / name)
    key = "coarse_labels" if coarse else "fine_labels"
    if key not in batch:
        raise DatasetError(f"{root / name}: missing key '{key}'")
    meta = _unpickle(root / "meta")
    classes = tuple(meta["coarse_label_names" if coarse else "fine_label_names"])
    return ImageArrays(
        _cifar_images(batch, root / name), np.asarray(batch[key], dtype=np.int64), classes
    )


def _read_idx(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"missing Fashion-MNIST file {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4:
        raise DatasetError(f"{path}: truncated IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: expected {int(np.prod(dims))} values, found {body.size}")
    return body.reshape(dims)


def _fashion_root(data_dir: Path) -> Path:
    for candidate in (data_dir, data_dir / "fashion-mnist"):
        if (candidate / FASHION_MNIST_FILES["train"][0]).is_file() or (
            candidate / FASHION_MNIST_FILES["train"][0].removesuffix(".gz")
        ).is_file():
            return candidate
    raise DatasetError(
        f"{data_dir} has no Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz] …); "
        "on Debian: apt-get install dataset-fashion-mnist, then "
        "--data-dir /usr/share/datasets/fashion-mnist"
    )


def read_fashion_mnist(data_dir: str | Path, train: bool) -> ImageArrays:
    root = _fashion_root(Path(data_dir))
    img_name, lbl_name = FASHION_MNIST_FILES["train" if train else "test"]

    def pick(name: str) -> Path:
        gz = root / name
        return gz if gz.is_file() else root / name.removesuffix(".gz")

    images = _read_idx(pick(img_name))
    labels = _read_idx(pick(lbl_name)).astype(np.int64)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{root}: image/label counts differ")
    return ImageArrays(images[..., None].copy(), labels, FASHION_MNIST_CLASSES)


def read_imagefolder(data_dir: str | Path, train: bool, size: int = 32) -> ImageArrays:
    """One sub-folder per class (`train/` and `test/` sub-trees if present), resized to size²."""
    from PIL import Image  # optional dependency, only for this reader

    root = Path(data_dir)
    sub = root / ("train" if train else "test")
    if sub.is_dir():
        root = sub
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders")
    images, labels = [], []
    for index, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            except OSError as exc:
                logger.warning("skipping unreadable image %s: %s", file, exc)
                continue
            images.append(np.asarray(rgb, dtype=np.uint8))
            labels.append(index)
    if not images:
        raise DatasetError(f"{root} holds no readable images")
    return ImageArrays(np.stack(images), np.asarray(labels, dtype=np.int64), tuple(classes))


READERS = {
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "fashion-mnist": read_fashion_mnist,
    "imagefolder": read_imagefolder,
}


# ----------------------------------------------------------------------------- splits


def val_indices(labels: np.ndarray, val_size: int, seed: int = DEFAULT_SPLIT_SEED) -> np.ndarray:
    """Deterministic class-stratified held-out indices (sorted), independent of training seed."""
    if val_size <= 0:
        return np.zeros(0, dtype=np.int64)
    if val_size >= len(labels):
        raise DatasetError(f"val_size {val_size} must be smaller than the training set")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = val_size // len(classes)
    extra = val_size - per_class * len(classes)
    picked = []
    for i, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        take = min(len(idx), per_class + (1 if i < extra else 0))
        picked.append(rng.choice(idx, size=take, replace=False))
    return np.sort(np.concatenate(picked))


def load_split(
    dataset: str,
    data_dir: str | os.PathLike[str],
    split: str,
    val_size: int = DEFAULT_VAL_SIZE,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> ImageArrays:
    """Return one split: 'train' (official train minus val), 'val' (held out), or 'test'."""
    if dataset not in READERS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"data directory not found: {data_dir}")
    reader = READERS[dataset]
    if split == "test":
        return reader(root, train=False)
    full = reader(root, train=True)
    held = val_indices(full.labels, val_size, split_seed)
    if split == "val":
        return full.subset(held)
    keep = np.ones(len(full), dtype=bool)
    keep[held] = False
    return full.subset(np.flatnonzero(keep))


def recipe_split(
    recipe: Mapping[str, Any], data_dir: str | os.PathLike[str] | None, split: str
) -> ImageArrays:
    """`split` of the dataset a training recipe names (a checkpoint's `config`, a manifest's
    training config), with its val rows held out exactly as that training held them out.
    `data_dir` None means the recipe's own `data_dir`; DatasetError when neither is set."""
    where = data_dir if data_dir is not None else recipe.get("data_dir")
    if not where:
        raise DatasetError("no data directory: pass --data-dir")
    val_size = recipe.get("val_size")
    split_seed = recipe.get("split_seed")
    return load_split(
        str(recipe.get("dataset") or "cifar10"),
        where,
        split,
        DEFAULT_VAL_SIZE if val_size is None else int(val_size),
        DEFAULT_SPLIT_SEED if split_seed is None else int(split_seed),
    )


# ----------------------------------------------------------------------------- download


def _checksum(path: Path, algo: str) -> str:
    digest = hashlib.new(algo)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(dataset: str, data_dir: str | Path) -> None:
    """Fetch the official archives (machines with internet only) and check published checksums."""
    if dataset not in DOWNLOADS:
        raise DatasetError(f"no download for {dataset!r}")
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    for url, algo, expected in DOWNLOADS[dataset]:
        target = root / url.rsplit("/", 1)[-1]
        if not target.is_file() or _checksum(target, algo) != expected:
            logger.info("downloading %s", url)
            tmp = target.with_suffix(target.suffix + ".part")
            urllib.request.urlretrieve(url, tmp)  # noqa: S310 - official https/http archive
            tmp.replace(target)
        actual = _checksum(target, algo)
        if actual != expected:
            raise DatasetError(f"{target}: {algo} {actual} != published {expected}")
        if target.name.endswith(".tar.gz"):
            with tarfile.open(target) as tar:
                tar.extractall(root, filter="data")
