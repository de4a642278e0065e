"""Datasets: the built-in Fashion-MNIST (Debian's idx files) and any ImageFolder tree via timm.

Fashion-MNIST is small enough to live in memory as one uint8 tensor, so batches are cut from it
directly: no worker processes, deterministic order from a seed, and cheap augmentation on whole
batches. ImageFolder trees go through timm's dataset and transform factories, with DeiT's training
recipe by default, and are prepared as the model wants them (`preprocess`: its mean, std,
interpolation, crop and channels). Fashion-MNIST meets a model made for other images halfway: grey
replicated to its channels, resized to its input size, normalised with its statistics. Under torchrun every rank reads a disjoint shard of each batch and of the test
split, so evaluation counts every test image exactly once.
"""
from __future__ import annotations

import gzip
import math
import os
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from PIL import Image
from timm.data import Mixup, create_dataset, create_transform, is_img_extension

from . import distributed, preprocess
from .errors import UVCError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_INPUT = (1, 28, 28)
# The validation split: a fixed, seeded draw of training images held out from training, so that
# monitoring and tuning never read the test split (which is evaluated once, at the end of a run).
VAL_SIZE, VAL_SEED = 5000, 20261125
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# DeiT's ImageNet recipe (Touvron et al. 2021, the UVC reference's data pipeline) for ImageFolder
# data; Fashion-MNIST batches keep their own shift-and-flip augmentation and plain labels.
# The RandAugment magnitude is capped at 9 (mmax9): at DeiT's cap of 10, the "increasing" posterize keeps
# 0 bits of each pixel, which Pillow >= 13 refuses with a ValueError (older Pillow blacked the image out).
DEIT_RECIPE = dict(mixup=0.8, cutmix=1.0, smoothing=0.1, aa="rand-m9-mstd0.5-inc1-mmax9", reprob=0.25)
PLAIN_RECIPE = dict(mixup=0.0, cutmix=0.0, smoothing=0.0, aa=None, reprob=0.0)


@dataclass
class DataConfig:
    """Where the images come from and how they are batched.

    `data` is "fashion-mnist" (Debian's package, or `root` pointing at a folder with its four idx
    files) or a folder with `train/` and `val/` class sub-folders (ImageNet layout); for a backbone,
    also a folder of images without classes (`build_image_folder`). The recipe
    fields left at None take the data's default: `DEIT_RECIPE` for folders, `PLAIN_RECIPE` for
    Fashion-MNIST.
    """

    data: str = "fashion-mnist"
    root: str | None = None
    batch_size: int = 128  # the global batch: under torchrun each rank takes batch_size / world size
    eval_batch_size: int = 512
    workers: int = 2
    train_limit: int | None = None  # use only the first N training images (quick runs, tests)
    val_limit: int | None = None
    test_limit: int | None = None
    augment: bool = True
    input_size: int | None = None  # ImageFolder only: the crop the model sees (default: the model's image size)
    mixup: float | None = None  # mixup alpha (0: off)
    cutmix: float | None = None  # cutmix alpha (0: off)
    smoothing: float | None = None  # label smoothing
    aa: str | None = None  # ImageFolder only: timm auto-augment policy, "none" for none
    reprob: float | None = None  # ImageFolder only: random-erasing probability
    # Preprocessing, by timm's option names; None takes the model's (its pretrained_cfg), see `preprocess`.
    mean: tuple[float, ...] | None = None  # normalisation, one value or one per channel
    std: tuple[float, ...] | None = None
    interpolation: str | None = None  # resizing: bilinear, bicubic or nearest
    crop_pct: float | None = None  # ImageFolder only: evaluation centre crop as a fraction of the resized image

    def validate(self) -> None:
        self.mean, self.std = (tuple(v) if isinstance(v, list) else v for v in (self.mean, self.std))  # `--mean 0.5 0.5 0.5`
        if self.batch_size < 1 or self.eval_batch_size < 1 or self.workers < 0:
            raise UVCError("batch sizes must be >= 1 and workers >= 0")
        for name, value, upper in (("mixup", self.mixup, None), ("cutmix", self.cutmix, None),
                                   ("smoothing", self.smoothing, 1.0), ("reprob", self.reprob, 1.0)):
            if value is not None and not (0 <= value and (upper is None or value <= upper)):
                raise UVCError(f"--{name} must be {'in [0, 1]' if upper else '>= 0'}, got {value}")
        for name in ("train_limit", "val_limit", "test_limit", "input_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UVCError(f"{name.replace('_', ' ')} must be a positive number, got {value}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and (not values or not all(math.isfinite(v) for v in values)
                                       or (name == "std" and min(values) <= 0)):
                raise UVCError(f"--{name} takes finite numbers{' > 0' if name == 'std' else ''}, one or one per "
                               f"channel, got {values}")
        if self.interpolation is not None and self.interpolation not in preprocess.INTERPOLATIONS:
            raise UVCError(f"--interpolation must be one of {', '.join(preprocess.INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise UVCError(f"--crop-pct must be in (0, 1], got {self.crop_pct}")

    def recipe(self, image_folder: bool) -> dict:
        """The recipe fields with the data's defaults filled in."""
        defaults = DEIT_RECIPE if image_folder else PLAIN_RECIPE
        recipe = {k: defaults[k] if getattr(self, k) is None else getattr(self, k) for k in defaults}
        recipe["aa"] = None if recipe["aa"] in ("none", "") else recipe["aa"]
        if not image_folder and (recipe["aa"] or recipe["reprob"]):
            raise UVCError("--aa and --reprob apply to ImageFolder data; Fashion-MNIST batches have their own augmentation")
        if not image_folder and self.crop_pct is not None:
            raise UVCError("--crop-pct applies to ImageFolder data; Fashion-MNIST images are resized whole")
        return recipe


def per_process_batch(batch_size: int, world: int) -> int:
    """The share of a global batch that each of `world` processes takes."""
    if batch_size % world:
        raise UVCError(f"batch size {batch_size} does not split evenly over {world} processes")
    return batch_size // world


def _repair(path: Path) -> str:
    """How to repair a damaged Fashion-MNIST file: Debian's folder belongs to its package, any other
    (--data-root, UVC_FASHION_MNIST) to the user who filled it."""
    if path.parent == FASHION_MNIST_DIR:
        return "reinstall the data: apt-get install --reinstall dataset-fashion-mnist"
    return f"replace {path.name} in {path.parent} (the --data-root folder) with an intact copy"


def _read_idx(path: Path) -> np.ndarray:
    """Parse one gzipped idx file (the MNIST family's format: magic, dims, raw uint8)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UVCError(f"cannot read {path}: {e}. To fix it, {_repair(path)}") from e
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UVCError(f"{path} is not an idx file of unsigned bytes; {_repair(path)}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UVCError(f"{path} is truncated: expected {int(np.prod(dims))} bytes of data, found {body.size}; "
                       f"{_repair(path)}")
    return body.reshape(dims)


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder with the four Fashion-MNIST files, or a UVCError that says how to get them."""
    folder = Path(root) if root else Path(os.environ.get("UVC_FASHION_MNIST", FASHION_MNIST_DIR))
    missing = [n for pair in FASHION_MNIST_FILES.values() for n in pair if not (folder / n).is_file()]
    if missing and folder == FASHION_MNIST_DIR:
        raise UVCError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}). "
            "Install it with `apt-get install -y dataset-fashion-mnist`, or pass --data-root DIR "
            "pointing at a folder with the four idx .gz files."
        )
    if missing:
        raise UVCError(f"Fashion-MNIST not found in {folder} (the --data-root folder; missing {', '.join(missing)}): "
                       "copy the four idx .gz files there, or drop --data-root to use Debian's package "
                       "(apt-get install -y dataset-fashion-mnist)")
    return folder


def validation_indices(n_train: int) -> torch.Tensor:
    """Which of the `n_train` training images form the validation split (sorted): 5,000 of the 60,000,
    a tenth of a smaller set."""
    size = min(VAL_SIZE, n_train // 10)
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(VAL_SEED))[:size].sort().values


def load_fashion_mnist(split: str, root: str | None = None, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 [N, 1, 28, 28] and labels as int64 [N].

    `split` is "train" (the training images less the validation split), "val" (the 5,000 held out)
    or "test". "train-all" is every training image: the bundled teacher was trained on those.
    """
    if split not in ("train", "val", "test", "train-all"):
        raise ValueError(f"unknown Fashion-MNIST split {split!r}")
    folder = fashion_mnist_dir(root)
    images_file, labels_file = FASHION_MNIST_FILES["test" if split == "test" else "train"]
    images = torch.from_numpy(_read_idx(folder / images_file).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(folder / labels_file).astype(np.int64))
    if images.shape[1:] != (1, 28, 28) or labels.shape != (len(images),) or bool((labels > 9).any()):
        raise UVCError(f"{folder}: {images_file} and {labels_file} are not 28x28 images with one label of 0-9 "
                       f"each (shapes {tuple(images.shape[1:])} and {tuple(labels.shape)}); {_repair(folder / images_file)}")
    if split in ("train", "val"):
        held_out = torch.zeros(len(labels), dtype=torch.bool)
        held_out[validation_indices(len(labels))] = True
        keep = held_out if split == "val" else ~held_out
        images, labels = images[keep], labels[keep]
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


class ModelView:
    """Normalised Fashion-MNIST batches as a model made for other images takes them: resized to its input
    size, grey replicated to its channels, normalised with its mean and std.

    It acts on the batches after their augmentation, so shifts and flips stay those of the 28x28 recipe
    (and draw the same random numbers) whatever the model's size.
    """

    def __init__(self, preprocessing: dict):
        channels, h, w = preprocessing["input_size"]
        self.size, self.channels, self.mode = (h, w), channels, preprocessing["interpolation"]
        self.mean = torch.tensor(preprocessing["mean"]).view(1, -1, 1, 1)
        self.std = torch.tensor(preprocessing["std"]).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x * FASHION_MNIST_STD + FASHION_MNIST_MEAN  # back to pixels in [0, 1]
        if tuple(x.shape[-2:]) != self.size:
            smooth = self.mode != "nearest"
            x = torch.nn.functional.interpolate(x, size=self.size, mode=self.mode, antialias=smooth,
                                                **({"align_corners": False} if smooth else {}))
            x = x.clamp(0, 1)  # bicubic overshoots; PIL's 8-bit resize clips the same way
        return (x.expand(-1, self.channels, -1, -1) - self.mean) / self.std


class TensorBatches:
    """Seeded, resumable batches over in-memory uint8 images, normalised on the fly.

    Augmentation (train only): random shifts of up to 2 pixels (pad-and-crop) and horizontal flips,
    applied to the whole batch at once, which is what makes CPU training on 28x28 images cheap.
    `view` (a `ModelView`) then fits each batch to the model. `shard=(rank, world)` yields rank's
    slice of every batch; the random draws are those of the whole batch, so the shards of all ranks
    together are exactly the unsharded batches.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 train: bool, augment: bool = True, seed: int = 0, shard: tuple[int, int] = (0, 1),
                 view: ModelView | None = None):
        self.images, self.labels, self.view = images, labels, view
        self.batch_size, self.train, self.augment, self.seed = batch_size, train, augment, seed
        rank, world = shard
        local = per_process_batch(batch_size, world)
        self.part = slice(rank * local, (rank + 1) * local)
        self.epoch = self.skip = 0

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next iteration yields epoch `epoch`'s batches from batch `skip` on (the draws of the
        skipped batches are still made, so the rest are what an unbroken epoch gives)."""
        self.epoch, self.skip = epoch, skip

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD

    def _augment(self, x: torch.Tensor, gen: torch.Generator, batch: int) -> torch.Tensor:
        _, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
        dy, dx = torch.randint(0, 5, (2,), generator=gen).tolist()  # one shift per batch keeps it cheap
        x = padded[:, :, dy:dy + h, dx:dx + w]
        flip = (torch.rand(batch, generator=gen) < 0.5)[self.part]
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        gen = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        order = torch.randperm(n, generator=gen) if self.train else torch.arange(n)
        for i in range(len(self)):
            batch = order[i * self.batch_size:(i + 1) * self.batch_size]
            idx = batch[self.part]
            if i < self.skip:  # make the skipped batch's draws, not its images
                if self.train and self.augment:
                    self._augment(self.images[idx[:1]], gen, len(batch))
                continue
            x = self._normalise(self.images[idx])
            if self.train and self.augment:
                x = self._augment(x, gen, len(batch))
            yield (self.view(x) if self.view else x), self.labels[idx]


@dataclass
class Dataset:
    """What the training engine needs: loaders, the class count and the input shape (C, H, W)."""

    train: object
    val: object  # monitoring and every choice during a run
    test: object  # read once, at the end (ImageFolder data: the same val/ folder the user gave)
    calibration: object  # the training images in a fixed order, without augmentation (one-shot pruning)
    num_classes: int
    input_size: tuple[int, int, int]
    name: str
    mixup: Callable | None = None  # (images, labels) -> (mixed images, soft targets), on training batches
    label_smoothing: float = 0.0  # for hard labels; with mixup the smoothing is already in its targets
    preprocessing: dict = field(default_factory=dict)  # timm's data config the images went through (`preprocess.KEYS`)
    class_names: tuple[str, ...] = ()  # one per class index: Fashion-MNIST's, or an ImageFolder's class folders


def _mixup(recipe: dict, num_classes: int, batch_size: int):
    """timm's Mixup/CutMix (one draw per batch, smoothed soft targets), or None when both are off."""
    if not (recipe["mixup"] or recipe["cutmix"]):
        return None

    local = per_process_batch(batch_size, distributed.world_size())
    if local % 2:
        raise UVCError(f"mixup and cutmix pair images within a batch: the batch per process ({local}) must be even")
    return Mixup(mixup_alpha=recipe["mixup"], cutmix_alpha=recipe["cutmix"], label_smoothing=recipe["smoothing"],
                 num_classes=num_classes)


def build_data(cfg: DataConfig, seed: int = 0, input_size: tuple[int, int, int] | None = None,
               pretrained_cfg: dict | None = None, labels: bool = True) -> Dataset:
    """Fashion-MNIST by name, else an ImageFolder tree with train/ and val/; sharded under torchrun.

    `input_size` is the model's (C, H, W) and `pretrained_cfg` its timm pretrained_cfg: ImageFolder
    images are cropped to its size (unless `cfg.input_size` says otherwise) with its mean, std,
    interpolation and crop, and read in greyscale for a 1-channel model. Fashion-MNIST is resized,
    replicated and normalised for a model whose input is not its own 1x28x28; a 1x28x28 model is taken
    to be made for it and keeps its statistics. `cfg`'s mean, std, interpolation and crop_pct override
    the model's. `labels=False` (a backbone's run) also accepts a folder of images without classes.
    """
    overrides = dict(mean=cfg.mean, std=cfg.std, interpolation=cfg.interpolation, crop_pct=cfg.crop_pct)
    if cfg.data in ("fashion-mnist", "fashion_mnist", "fmnist"):
        recipe = cfg.recipe(image_folder=False)
        size = tuple(input_size or FASHION_MNIST_INPUT)
        native = size == FASHION_MNIST_INPUT
        model_cfg = {"mean": (FASHION_MNIST_MEAN,), "std": (FASHION_MNIST_STD,)} if native else pretrained_cfg
        preprocessing = {**preprocess.resolve(size, model_cfg, **overrides), "crop_pct": 1.0}
        view = None if native and cfg.mean is None and cfg.std is None else ModelView(preprocessing)
        rank, world = distributed.rank(), distributed.world_size()
        tx, ty = load_fashion_mnist("train", cfg.root, cfg.train_limit)
        train = TensorBatches(tx, ty, cfg.batch_size, train=True, augment=cfg.augment, seed=seed, shard=(rank, world),
                              view=view)
        evals = {}
        for split, limit in (("val", cfg.val_limit), ("test", cfg.test_limit)):
            x, y = load_fashion_mnist(split, cfg.root, limit)
            evals[split] = TensorBatches(x[rank::world], y[rank::world], cfg.eval_batch_size, train=False, view=view)
        calibration = TensorBatches(tx, ty, cfg.eval_batch_size, train=False, view=view)
        data = Dataset(train, evals["val"], evals["test"], calibration, 10, size, "fashion-mnist",
                       preprocessing=preprocessing, class_names=FASHION_MNIST_CLASSES)
    else:
        recipe = cfg.recipe(image_folder=True)
        channels = input_size[0] if input_size else 3
        size = cfg.input_size or (input_size[-1] if input_size else 224)
        preprocessing = preprocess.resolve((channels, size, size), pretrained_cfg, **overrides)
        data = build_image_folder(cfg, recipe, seed, preprocessing, labels)
    data.mixup = _mixup(recipe, data.num_classes, cfg.batch_size) if data.num_classes else None
    data.label_smoothing = 0.0 if data.mixup else recipe["smoothing"]
    return data


class _SeededSamples(torch.utils.data.Dataset):
    """A dataset whose random augmentation of sample i in epoch e is seeded by (seed, e, i) alone.

    Then neither the worker that loads a sample nor the batches skipped on a resume change what a
    sample looks like. The caller's RNG states are saved and restored around each draw, so the
    main process's own draws (mixup's) are untouched when no workers are used.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        seed = (self.seed * 1000003 + self.epoch) * 1000003 + i
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            torch.manual_seed(seed)
            item = self.dataset[i]
        random.setstate(python_state)
        return item


class _ShardOrder(torch.utils.data.Sampler):
    """This process's part of a (seed, epoch) permutation, whole batches only, from batch `skip` on."""

    def __init__(self, size: int, batch: int, seed: int, rank: int, world: int):
        self.size, self.batch, self.seed, self.rank, self.world = size, batch, seed, rank, world
        self.epoch = self.skip = 0
        self.batches = size // (batch * world)

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1000003 + self.epoch))
        mine = order[self.rank::self.world][:self.batches * self.batch]
        return iter(mine[self.skip * self.batch:].tolist())

    def __len__(self) -> int:
        return (self.batches - self.skip) * self.batch


class EpochLoader:
    """Training batches of an ImageFolder whose order and augmentation are fixed by (seed, epoch).

    Every process draws the same permutation and takes its strided part of it; a resumed run starts
    at its batch without loading the ones before, and sees the same images as an unbroken run.
    """

    def __init__(self, dataset, batch_size: int, workers: int, seed: int, rank: int, world: int):
        self.samples = _SeededSamples(dataset, seed)
        self.order = _ShardOrder(len(dataset), batch_size, seed, rank, world)
        # Its own generator: each new iterator draws a worker seed from it, not from the global RNG
        # (a resumed run creates its iterator at another step than an unbroken one does).
        self.loader = torch.utils.data.DataLoader(self.samples, batch_size=batch_size, sampler=self.order,
                                                  num_workers=workers, drop_last=True, generator=torch.Generator(),
                                                  pin_memory=torch.cuda.is_available())

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next iteration yields epoch `epoch`'s batches from batch `skip` on."""
        self.samples.epoch = self.order.epoch = epoch
        self.order.skip = skip

    def __len__(self) -> int:
        return self.order.batches

    def __iter__(self):
        return iter(self.loader)


def _image_folder(root: Path, split: str, class_to_idx: dict[str, int] | None = None, training: bool | None = None,
                  mode: str = "RGB"):
    """timm's dataset over `root/split`, labelled by `class_to_idx` (default: its own sorted class folders),
    images read in PIL `mode` ("L" for a greyscale model)."""
    if not (root / split).is_dir():
        raise UVCError(f"{root} has no {split}/ folder: an ImageFolder dataset needs train/ and val/ class sub-folders")
    try:
        dataset = create_dataset("", root=str(root), split=split, class_map=class_to_idx, input_img_mode=mode,
                                 is_training=split == "train" if training is None else training)
    except RuntimeError as e:  # timm's reader finds no image files
        raise UVCError(f"{root / split} holds no images in class sub-folders ({e}); put images "
                       f"(.jpg, .png, ...) in {root / split}/CLASS/") from e
    if len(dataset) == 0:
        raise UVCError(f"{root / split} holds no images in class sub-folders; put images in {root / split}/CLASS/")
    return dataset


def _class_mismatch(root: Path, train: set[str], val: set[str]) -> str:
    def show(names: set[str]) -> str:
        names = sorted(names)
        return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

    parts = [f"only in train/: {show(train - val)}" if train - val else "",
             f"only in val/: {show(val - train)}" if val - train else ""]
    return (f"{root}'s train/ and val/ have different class folders ({'; '.join(p for p in parts if p)}), so their "
            "labels would not match: give both splits the same class sub-folders")


class UnlabeledImages(torch.utils.data.Dataset):
    """Image files without classes, a backbone's data: each item is (image, -1)."""

    def __init__(self, files: list[Path], mode: str):
        self.files, self.mode, self.transform = files, mode, None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as image:
            image = image.convert(self.mode)
        return (self.transform(image) if self.transform else image), -1


def _loose_images(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted (none when it is missing)."""
    return sorted(f for f in folder.iterdir() if f.is_file() and is_img_extension(f.suffix.lower())) if folder.is_dir() else []


def images_without_classes(root: Path) -> tuple[list[Path], list[Path]] | None:
    """(train, val) image files when `root` holds images without class sub-folders: `train/*.jpg` (+ `val/*.jpg`)
    or `*.jpg`; without a val/ folder every tenth image is held out for validation. None for any other layout."""
    train = root / "train"
    has_classes = train.is_dir() and any(d.is_dir() for d in train.iterdir())
    files = _loose_images(train) if train.is_dir() else _loose_images(root)
    if has_classes or not files:
        return None
    val = _loose_images(root / "val") if train.is_dir() else []
    if val:
        return files, val
    if len(files) < 2:
        raise UVCError(f"{root} holds a single image; a backbone's data needs at least two (one is held out for "
                       "validation), better a few hundred")
    held_out = set(files[::10])
    return [f for f in files if f not in held_out], sorted(held_out)


def build_image_folder(cfg: DataConfig, recipe: dict, seed: int, preprocessing: dict, labels: bool = True) -> Dataset:
    """An ImageNet-style folder through timm's dataset and transform factories, with DeiT's recipe and
    `preprocessing` (timm's data config: size, channels, mean, std, interpolation, crop).

    Training batches come from an `EpochLoader`. The validation folder is cut into strided shards
    without padding (timm's distributed eval sampler repeats images to even out the ranks, which
    would count some twice); it serves as both `val` and `test`, since it is what the user gave.
    With `labels=False` a folder without class sub-folders (`images_without_classes`) is read too, as
    images labelled -1 and 0 classes; a classifier's run refuses it.
    """
    root = Path(cfg.data)
    if not root.is_dir():
        raise UVCError(
            f"--data {cfg.data!r} is neither 'fashion-mnist' nor an existing folder. Pass a folder "
            "with train/ and val/ class sub-folders (ImageNet layout)."
        )
    mode = "L" if preprocessing["input_size"][0] == 1 else "RGB"
    loose = images_without_classes(root)
    if loose is not None and labels:
        raise UVCError(f"{root} holds images without class sub-folders, which a classifier cannot learn from: put "
                       "them in train/CLASS/ and val/CLASS/, or pass --num-classes 0 to compress the model as a "
                       "backbone (its features are distilled, no labels needed)")
    if loose is not None:
        train_set, val, plain_train = (UnlabeledImages(files, mode) for files in (loose[0], loose[1], loose[0]))
        names = ()
    else:
        splits = {split: _image_folder(root, split, mode=mode) for split in ("train", "val")}
        class_to_idx = splits["train"].reader.class_to_idx
        if set(splits["val"].reader.class_to_idx) != set(class_to_idx):
            raise UVCError(_class_mismatch(root, set(class_to_idx), set(splits["val"].reader.class_to_idx)))
        # val/ labelled by train/'s numbering, whatever order its own folders sort in.
        train_set, val = splits["train"], _image_folder(root, "val", class_to_idx, mode=mode)
        plain_train = _image_folder(root, "train", class_to_idx, training=False, mode=mode)
        names = tuple(sorted(class_to_idx, key=class_to_idx.get))
    rank, world = distributed.rank(), distributed.world_size()
    input_size = preprocessing["input_size"]
    transform = {k: preprocessing[k] for k in ("mean", "std", "interpolation", "crop_pct", "crop_mode")}
    train_set.transform = create_transform(input_size, is_training=True, no_aug=not cfg.augment,
                                           auto_augment=recipe["aa"],
                                           re_prob=recipe["reprob"], re_mode="pixel", **transform)
    train = EpochLoader(train_set, per_process_batch(cfg.batch_size, world), cfg.workers, seed, rank, world)
    val.transform = create_transform(input_size, is_training=False, **transform)
    plain_train.transform = val.transform
    # A fixed shuffle, the same on every pass: the folder lists images class by class, and calibration takes the
    # first ones, more than once in a run (the activation scores, the refits), and again after a resume.
    order = torch.randperm(len(plain_train), generator=torch.Generator().manual_seed(0)).tolist()
    calibration = torch.utils.data.DataLoader(torch.utils.data.Subset(plain_train, order), batch_size=cfg.eval_batch_size,
                                              num_workers=cfg.workers)
    test = torch.utils.data.DataLoader(torch.utils.data.Subset(val, range(rank, len(val), world)),
                                       batch_size=-(-cfg.eval_batch_size // world), num_workers=cfg.workers,
                                       generator=torch.Generator())  # evaluating leaves the global RNG alone
    return Dataset(train, test, test, calibration, len(names), tuple(input_size), str(root), preprocessing=preprocessing,
                   class_names=names)
