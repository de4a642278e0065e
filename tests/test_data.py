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
    first, again = (torch.cat([labels for _, labels in data.calibration]) for _ in range(2))
    assert torch.equal(first, again) and not torch.equal(first, first.sort().values)  # shuffled, the same every pass
    with pytest.raises(uvc.UVCError, match="no val/ folder"):
        (tmp_path / "val").rename(tmp_path / "validation")
        build_data(DataConfig(data=str(tmp_path)))


def image_folder(root, colour=(200, 100, 50), size=40):
    """train/ and val/ with two classes of two plain-coloured images each."""
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (size, size), colour).save(root / split / cls / f"{i}.png")
    return root


def eval_transform(data):
    return {type(t).__name__: t for t in data.test.dataset.dataset.transform.transforms}


def test_image_folder_is_prepared_as_the_model_was_trained(tmp_path):
    """mean, std, interpolation and crop come from the model's pretrained_cfg; DataConfig's fields override them."""
    model_cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "crop_pct": 0.5,
                 "input_size": (3, 518, 518)}  # a released size: the model's own (32) wins
    root = image_folder(tmp_path / "images")
    small = dict(data=str(root), batch_size=4, eval_batch_size=4, workers=0)
    data = build_data(DataConfig(**small), input_size=(3, 32, 32), pretrained_cfg=model_cfg)
    assert data.preprocessing == {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.1, 0.2, 0.3),
                                  "std": (0.5, 0.5, 0.5), "crop_pct": 0.5, "crop_mode": "center"}
    steps = eval_transform(data)
    assert steps["Resize"].size == 64 and steps["Resize"].interpolation.value == "bilinear"  # 32 / crop_pct
    assert steps["Normalize"].mean.tolist() == pytest.approx([0.1, 0.2, 0.3])
    x, _ = next(iter(data.test))
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor([0.1, 0.2, 0.3])) / 0.5
    assert torch.allclose(x[0, :, 16, 16], expected, atol=1e-5)
    data = build_data(DataConfig(**small, mean=(0.5,), std=(0.25, 0.5, 1.0), interpolation="nearest", crop_pct=1.0),
                      input_size=(3, 32, 32), pretrained_cfg=model_cfg)
    steps = eval_transform(data)
    assert steps["Resize"].size == 32 and steps["Resize"].interpolation.value == "nearest"
    assert data.preprocessing["mean"] == (0.5, 0.5, 0.5) and data.preprocessing["std"] == (0.25, 0.5, 1.0)
    assert build_data(DataConfig(**small), input_size=(3, 32, 32)).preprocessing["mean"] == (0.485, 0.456, 0.406)
    for bad, message in ((dict(std=(0.0,)), "--std takes"), (dict(interpolation="lanczos"), "--interpolation"),
                         (dict(crop_pct=1.5), "--crop-pct"), (dict(mean=(0.1, 0.2)), "--mean has 2 values")):
        with pytest.raises(uvc.UVCError, match=message):
            cfg = DataConfig(**small, **bad)
            cfg.validate()
            build_data(cfg, input_size=(3, 32, 32))


def test_a_greyscale_model_gets_greyscale_images(tmp_path):
    """A 1-channel model reads an RGB ImageFolder in greyscale (PIL's L), with an RGB mean averaged to one value."""
    root = image_folder(tmp_path / "images")
    data = build_data(DataConfig(data=str(root), batch_size=4, eval_batch_size=4, workers=0), input_size=(1, 24, 24),
                      pretrained_cfg={"mean": (0.3, 0.4, 0.5), "std": (0.2, 0.2, 0.2)})
    assert data.input_size == (1, 24, 24) and data.preprocessing["mean"] == pytest.approx((0.4,))
    grey = (200 * 299 + 100 * 587 + 50 * 114 + 500) // 1000  # PIL's L conversion, rounded
    x, _ = next(iter(data.test))
    assert x.shape == (4, 1, 24, 24) and x[0, 0, 12, 12].item() == pytest.approx((grey / 255 - 0.4) / 0.2, abs=1e-5)
    x, _ = next(iter(data.train))  # DeiT's recipe (RandAugment, random erasing) on greyscale images
    assert x.shape == (4, 1, 24, 24)


def test_fashion_mnist_fits_a_model_made_for_other_images(tmp_path):
    """Grey replicated to 3 channels, resized to the model's size, normalised with its mean and std; a 1x28x28
    model keeps Fashion-MNIST's own batches."""
    images = np.zeros((80, 28, 28))
    images[:, 7:21, 7:21] = 255
    for prefix, n in (("train", 80), ("t10k", 16)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images[:n])
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    model_cfg = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.5), "interpolation": "bilinear"}
    data = build_data(DataConfig(root=str(tmp_path), batch_size=8, eval_batch_size=8), input_size=(3, 56, 56),
                      pretrained_cfg=model_cfg)
    assert data.input_size == (3, 56, 56) and data.preprocessing["mean"] == (0.5, 0.4, 0.3)
    assert data.preprocessing["crop_pct"] == 1.0  # resized whole
    for split in (data.train, data.val, data.test, data.calibration):
        x, _ = next(iter(split))
        assert x.shape == (8, 3, 56, 56)
    x, _ = next(iter(data.test))
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.5])
    assert torch.allclose(x[0, :, 28, 28], (1 - mean) / std, atol=1e-5)  # the white square, twice the size
    assert torch.allclose(x[0, :, 2, 2], -mean / std, atol=1e-5)  # the black border
    native = build_data(DataConfig(root=str(tmp_path), batch_size=8), input_size=(1, 28, 28), pretrained_cfg=model_cfg)
    assert native.train.view is None and native.preprocessing["mean"] == (uvc.data.FASHION_MNIST_MEAN,)
    with pytest.raises(uvc.UVCError, match="--crop-pct applies to ImageFolder"):
        build_data(DataConfig(root=str(tmp_path), crop_pct=0.9))
