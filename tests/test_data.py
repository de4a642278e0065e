"""Data: the real Fashion-MNIST files, resumable batches, ImageFolder trees, clear errors."""
import gzip

import numpy as np
import pytest
import torch

import uvc
import uvc.data
from uvc.data import DataConfig, TensorBatches, build_data, load_fashion_mnist


def test_fashion_mnist_is_the_real_data_set(fmnist_available):
    if not fmnist_available:
        pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist")
    images, labels = load_fashion_mnist("train-all")
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [6000] * 10
    test_images, test_labels = load_fashion_mnist("test")
    assert test_images.shape == (10000, 1, 28, 28) and torch.bincount(test_labels).tolist() == [1000] * 10
    assert 0.27 < images.float().mean().item() / 255 < 0.30  # the published mean pixel value is 0.286


def test_validation_split_is_a_fixed_held_out_part_of_the_training_images(fmnist_available):
    if not fmnist_available:
        pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist")
    all_images, all_labels = load_fashion_mnist("train-all")
    train, _ = load_fashion_mnist("train")
    val, val_labels = load_fashion_mnist("val")
    assert len(train) == 55000 and len(val) == 5000
    held_out = uvc.data.validation_indices(60000)
    assert torch.equal(held_out, uvc.data.validation_indices(60000))  # the same 5,000 on every call and machine
    assert torch.equal(val, all_images[held_out]) and torch.equal(val_labels, all_labels[held_out])
    rest = torch.ones(60000, dtype=torch.bool)
    rest[held_out] = False
    assert torch.equal(train, all_images[rest])  # disjoint, and together every training image
    assert all(400 < n < 600 for n in torch.bincount(val_labels).tolist())  # every class is held out
    data = build_data(DataConfig(train_limit=640, batch_size=64))
    assert len(data.train) == 10 and sum(len(y) for _, y in data.val) == 5000 and sum(len(y) for _, y in data.test) == 10000


def test_batches_are_seeded_resumable_and_normalised():
    images = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(100) % 10
    a = TensorBatches(images, labels, 32, train=True, seed=1)
    b = TensorBatches(images, labels, 32, train=True, seed=1)
    a.set_epoch(2), b.set_epoch(2)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(3)
    assert not torch.equal(next(iter(a))[1], next(iter(b))[1])
    test = TensorBatches(images, labels, 32, train=False)
    assert len(test) == 4 and sum(len(y) for _, y in test) == 100


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_any_folder_with_the_four_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 16)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    data = build_data(DataConfig(root=str(tmp_path), batch_size=16))
    assert len(data.train) == 3 and data.input_size == (1, 28, 28) and data.num_classes == 10  # 58 of 64: 6 held out


def test_missing_or_broken_data_names_the_fix(tmp_path):
    with pytest.raises(uvc.UVCError, match="apt-get install -y dataset-fashion-mnist"):
        build_data(DataConfig(root=str(tmp_path)))
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(uvc.UVCError, match="cannot read"):
        build_data(DataConfig(root=str(tmp_path)))


def test_image_folder_through_timm(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog", "fox"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    data = build_data(DataConfig(data=str(tmp_path), batch_size=4, eval_batch_size=4, workers=0, input_size=32))
    assert data.num_classes == 3 and data.input_size == (3, 32, 32)
    x, y = next(iter(data.test))
    assert x.shape == (4, 3, 32, 32) and y.max() < 3
    with pytest.raises(uvc.UVCError, match="no val/ folder"):
        (tmp_path / "val").rename(tmp_path / "validation")
        build_data(DataConfig(data=str(tmp_path)))
