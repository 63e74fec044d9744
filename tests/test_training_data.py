import numpy as np
import pytest
import torch

from core.datasets import DatasetError, load_split, recipe_split, val_indices
from tests.data_fixtures import write_tiny_cifar10, write_tiny_cifar100, write_tiny_fashion_mnist
from training.data import AugmentConfig, BatchLoader, cutout, random_crop, random_flip


def test_cifar10_reader_on_pickle_fixture(tmp_path):
    write_tiny_cifar10(tmp_path, per_batch=20)
    test = load_split("cifar10", tmp_path, "test")
    assert test.images.shape == (20, 32, 32, 3) and test.images.dtype == np.uint8
    assert test.classes[0] == "airplane" and len(test.classes) == 10
    train = load_split("cifar10", tmp_path, "train", val_size=10)
    val = load_split("cifar10", tmp_path, "val", val_size=10)
    assert len(train) == 90 and len(val) == 10
    # The row layout is R plane, G plane, B plane: pixel (0, 0) of image 0 matches data[0, 0/1024/2048].
    import pickle

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        raw = pickle.load(fh, encoding="latin1")
    assert list(test.images[0, 0, 0]) == [
        raw["data"][0, 0],
        raw["data"][0, 1024],
        raw["data"][0, 2048],
    ]


def test_cifar100_reader_fine_and_coarse(tmp_path):
    write_tiny_cifar100(tmp_path, n=30)
    from core.datasets import read_cifar100

    fine = read_cifar100(tmp_path, train=True)
    coarse = read_cifar100(tmp_path, train=False, coarse=True)
    assert fine.images.shape == (30, 32, 32, 3) and len(fine.classes) == 100
    assert len(coarse.classes) == 20 and coarse.labels.max() < 20
    assert len(load_split("cifar100", tmp_path, "val", val_size=5)) == 5


def test_fashion_mnist_idx_reader(tmp_path):
    write_tiny_fashion_mnist(tmp_path, n=40)
    data = load_split("fashion-mnist", tmp_path, "test")
    assert data.images.shape == (40, 28, 28, 1) and data.classes[0] == "T-shirt/top"


def test_imagefolder_reader(tmp_path):
    from PIL import Image

    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 40, 10, 200)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cats" / "broken.png").write_bytes(b"not a png")
    data = load_split("imagefolder", tmp_path, "test")
    assert data.classes == ("cats", "dogs") and data.images.shape == (6, 32, 32, 3)


@pytest.mark.parametrize("bad", ["missing", "empty", "garbage"])
def test_bad_data_dirs_raise_clear_errors(tmp_path, bad):
    if bad == "missing":
        with pytest.raises(DatasetError, match="not found"):
            load_split("cifar10", tmp_path / "nope", "train")
    elif bad == "empty":
        with pytest.raises(DatasetError, match="cifar-10-batches-py"):
            load_split("cifar10", tmp_path, "train")
    else:
        write_tiny_cifar10(tmp_path)
        (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80garbage")
        with pytest.raises(DatasetError, match="data_batch_3"):
            load_split("cifar10", tmp_path, "train")


def test_val_split_is_deterministic_stratified_and_disjoint():
    labels = np.repeat(np.arange(10), 100)
    a, b = val_indices(labels, 50), val_indices(labels, 50)
    assert np.array_equal(a, b)
    assert np.bincount(labels[a], minlength=10).tolist() == [5] * 10


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    y = random_crop(x, 2, gen)
    assert y.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(y[i], w) for w in windows)


def test_flip_and_cutout():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 8, 8)
    y = random_flip(x, gen)
    flipped = [bool(torch.equal(y[i], x[i].flip(-1))) for i in range(64)]
    assert 10 < sum(flipped) < 54
    z = cutout(torch.ones(4, 3, 16, 16), 4, gen)
    zeros = (z[:, 0] == 0).sum(dim=(1, 2))
    assert bool((zeros > 0).all()) and bool((zeros <= 16).all())


def test_loader_order_is_deterministic_and_resumable(tmp_path):
    write_tiny_cifar10(tmp_path, per_batch=20)
    data = load_split("cifar10", tmp_path, "train", val_size=0)

    def make():
        return BatchLoader(
            data, 16, (0.5,) * 3, (0.25,) * 3, train=True, augment=AugmentConfig(cutout=4), seed=3
        )

    a = list(make().epoch(2))
    loader = make()
    first = next(loader.epoch(2))
    state = loader.generator.get_state()
    resumed = make()
    resumed.generator.set_state(state)
    rest = list(resumed.epoch(2, start_step=1))
    assert torch.equal(a[0][0], first[0])
    assert all(
        torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
        for p, q in zip(a[1:], rest, strict=True)
    )


def test_loader_shards_ranks_disjointly(tmp_path):
    write_tiny_cifar10(tmp_path, per_batch=20)
    data = load_split("cifar10", tmp_path, "train", val_size=0)
    shards = [
        BatchLoader(data, 10, (0.5,) * 3, (0.25,) * 3, train=False, rank=r, world_size=2)
        for r in range(2)
    ]
    labels = [torch.cat([y for _, y in s.epoch(0)]) for s in shards]
    assert len(labels[0]) == len(labels[1]) == 50


def test_autoaugment_cifar_policy_runs_and_is_seeded():
    from training.data import AutoAugmentCifar

    aug = AutoAugmentCifar()
    x = torch.rand(8, 3, 32, 32)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and torch.equal(a, b) and float(a.min()) >= 0 and float(a.max()) <= 1


def test_recipe_split_holds_out_what_the_recipe_held_out(tmp_path):
    """recipe_split reads dataset, val_size and split_seed from a training config; a recipe
    that held out nothing (val_size 0) keeps every training row, absent keys are defaults."""
    write_tiny_cifar10(tmp_path, per_batch=20)
    recipe = {"dataset": "cifar10", "val_size": 30, "split_seed": 3}
    val = recipe_split(recipe, tmp_path, "val")
    assert np.array_equal(val.labels, load_split("cifar10", tmp_path, "val", 30, 3).labels)
    assert len(recipe_split({**recipe, "val_size": 0}, tmp_path, "train")) == 100
    assert len(recipe_split({}, tmp_path, "test")) == 20
    with pytest.raises(DatasetError, match="unknown dataset"):
        recipe_split({"dataset": "mnist"}, tmp_path, "val")
