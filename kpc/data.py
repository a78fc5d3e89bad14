"""Data specs: `synthetic`, `fashion-mnist[:PATH]`, `cifar10:PATH`, `imagefolder:PATH`.

Every dataset yields normalised image tensors adapted to the model's input size
(channels repeated or averaged, bilinear resize), so calibration, training and
evaluation see exactly what the model was built for. The normalisation is returned
with the data so artifacts can record it.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from kpc.errors import KpcError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "sudo apt-get install -y dataset-fashion-mnist"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KINDS = ("synthetic", "fashion-mnist", "cifar10", "imagefolder")
MAX_SYNTHETIC_VALUES = 2**28  # a synthetic calibration sample is made at once: 1 GiB in fp32 (the default: 38 M)


@dataclass(frozen=True)
class DataSpec:
    kind: str
    path: Path | None = None

    def label(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


def parse_data_spec(text: str) -> DataSpec:
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise KpcError(f"unknown data spec {text!r}: use one of synthetic, fashion-mnist[:PATH], "
                       "cifar10:PATH, imagefolder:PATH")
    if kind == "synthetic":
        if rest.strip():  # a path or option after it was silently ignored
            raise KpcError(f"data spec {text!r}: synthetic takes no path or options (random images of the model's "
                           "input size); use synthetic")
        return DataSpec(kind)
    if kind == "fashion-mnist":
        path = Path(rest).expanduser() if rest else FASHION_MNIST_DIR
    elif not rest:
        raise KpcError(f"data spec {kind} needs a path: {kind}:PATH")
    else:
        path = Path(rest).expanduser()
    if not path.exists():
        hint = f" (install it with: {FASHION_MNIST_INSTALL})" if kind == "fashion-mnist" else ""
        raise KpcError(f"data path {path} does not exist{hint}")
    return DataSpec(kind, path)


# ---------------------------------------------------------------- raw readers


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as used by (Fashion-)MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if array.size != int(np.prod(shape)):
            raise ValueError(f"expected {int(np.prod(shape))} values, found {array.size}")
        return array.reshape(shape).copy()
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise KpcError(f"{path} is not a readable IDX file ({exc}): the dataset is corrupt") from exc


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise KpcError(f"{directory} has no {stem}[.gz]: not a Fashion-MNIST directory ({FASHION_MNIST_INSTALL})")


def fashion_mnist_arrays(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise KpcError(f"Fashion-MNIST files in {directory} disagree: {images.shape} images, {labels.shape} labels")
    return images, labels


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR-10 python batches hold: dicts, lists, bytes and numpy arrays.

    A pickle can name any callable to run on load; a crafted "batch" would run code the
    moment it is read. Everything outside numpy's array reconstruction is refused.
    """

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not something a CIFAR-10 batch holds")


def cifar10_arrays(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the CIFAR-10 'python version' batches (data_batch_1..5, test_batch)."""
    root = directory / "cifar-10-batches-py" if (directory / "cifar-10-batches-py").is_dir() else directory
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        file = root / name
        if not file.is_file():
            raise KpcError(f"{root} has no {name}: not a CIFAR-10 python-batches directory")
        try:
            with open(file, "rb") as handle:
                batch = _CifarUnpickler(handle, encoding="latin1").load()  # the format is pickled numpy
            if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
                raise ValueError("it holds no 'data' and 'labels'")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
        except Exception as exc:  # a corrupt or crafted file: one line, nothing run
            raise KpcError(f"{file} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})") from exc
    return np.concatenate(images), np.concatenate(labels)


# ---------------------------------------------------------------- datasets


def adapt_images(images: torch.Tensor, input_size: tuple[int, int, int]) -> torch.Tensor:
    """Bring a float NCHW batch to the model's channels and size."""
    channels, height, width = input_size
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        elif channels == 1:
            images = images.mean(dim=1, keepdim=True)
        else:
            raise KpcError(f"cannot adapt {images.shape[1]}-channel images to a {channels}-channel model")
    if images.shape[-2:] != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    return images.contiguous()


class ArrayImages(Dataset):
    """uint8 images in memory (N,H,W or N,C,H,W) with labels, normalised on access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, norm: Normalization,
                 input_size: tuple[int, int, int], augment: bool = False) -> None:
        if images.ndim == 3:
            images = images[:, None]
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.mean = torch.tensor(norm.mean).view(-1, 1, 1)
        self.std = torch.tensor(norm.std).view(-1, 1, 1)
        self.input_size = input_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].float().div_(255.0)
        if self.augment:
            image = _random_flip_and_crop(image)
        image = (image - self.mean) / self.std
        return adapt_images(image[None], self.input_size)[0], self.labels[index]


def _random_flip_and_crop(image: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """The standard small-image augmentation: horizontal flip and a padded random crop."""
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
    height, width = image.shape[-2:]
    # numpy's reflect pad: torch's costs milliseconds per small image on CPU (thread-pool overhead)
    padded = torch.from_numpy(np.pad(image.numpy(), ((0, 0), (pad, pad), (pad, pad)), mode="reflect"))
    top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
    return padded[:, top : top + height, left : left + width]


FASHION_MNIST_NORM = Normalization((0.2860,), (0.3530,))
CIFAR10_NORM = Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET_NORM = Normalization(IMAGENET_MEAN, IMAGENET_STD)


@dataclass
class LoadedData:
    dataset: Dataset
    labeled: bool
    num_classes: int | None
    normalization: Normalization


def load_dataset(spec: DataSpec, split: str, input_size: tuple[int, int, int], *,
                 augment: bool = False, synthetic_size: int = 256, seed: int = 0) -> LoadedData:
    """Open one split ("train" or "val") of a data spec, adapted to `input_size`."""
    if spec.kind == "synthetic":
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn((synthetic_size, *input_size), generator=generator)
        return LoadedData(TensorDataset(images), False, None, Normalization((0.0,), (1.0,)))
    assert spec.path is not None
    if spec.kind == "fashion-mnist":
        images, labels = fashion_mnist_arrays(spec.path, split)
        return LoadedData(ArrayImages(images, labels, FASHION_MNIST_NORM, input_size, augment), True, 10,
                          FASHION_MNIST_NORM)
    if input_size[0] not in (1, 3):  # colour images become a grayscale or an RGB input, nothing else
        raise KpcError(f"{spec.kind} images are read as 1 (grayscale) or 3 (RGB) channels, but the model takes "
                       f"{input_size[0]}: use --input-size 1x{input_size[1]}x{input_size[2]} or "
                       f"3x{input_size[1]}x{input_size[2]}, or --data synthetic")
    if spec.kind == "cifar10":
        images, labels = cifar10_arrays(spec.path, split)
        return LoadedData(ArrayImages(images, labels, CIFAR10_NORM, input_size, augment), True, 10, CIFAR10_NORM)
    return _imagefolder(spec.path, split, input_size, augment)


class ImageReader:
    """Read one image file of an imagefolder as grayscale or RGB; a file PIL cannot read is named in one line.

    torchvision's loader raised PIL's UnidentifiedImageError from deep inside the data loader
    (an empty or truncated JPEG in a folder of thousands), which kpc reported as its own bug.
    A class rather than a closure, so that loader worker processes can pickle it.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, path: str) -> Any:
        from PIL import Image

        try:
            with open(path, "rb") as handle:
                image = Image.open(handle)
                return image.convert(self.mode)
        except Image.UnidentifiedImageError as exc:
            raise KpcError(f"{path} is not an image kpc can read (empty, or a format PIL does not know): remove or "
                           "replace it") from exc
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise KpcError(f"{path} is not an image kpc can read ({text}): remove or replace it") from exc


def _imagefolder(path: Path, split: str, input_size: tuple[int, int, int], augment: bool) -> LoadedData:
    from torchvision import datasets, transforms

    sub = path / ("train" if split == "train" else "val")
    root = sub if sub.is_dir() else path
    _, height, width = input_size
    if augment:
        steps = [transforms.RandomResizedCrop((height, width)), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(round(height / 0.875)), transforms.CenterCrop((height, width))]
    channels = input_size[0]
    tf = transforms.Compose([
        *steps,
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN[:channels], IMAGENET_STD[:channels]),
    ])
    try:
        dataset = datasets.ImageFolder(str(root), transform=tf, loader=ImageReader("L" if channels == 1 else "RGB"))
    except (FileNotFoundError, OSError) as exc:
        raise KpcError(f"imagefolder {root} has no class folders with images ({exc})") from exc
    return LoadedData(dataset, True, len(dataset.classes), IMAGENET_NORM)


def calibration_batches(spec: DataSpec, input_size: tuple[int, int, int], *, batches: int,
                        batch_size: int, seed: int = 0, workers: int = 0
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Batches for the importance pass: the train split with eval transforms, shuffled with a fixed seed."""
    if spec.kind == "synthetic":  # made in memory at once: refuse a sample that cannot fit before allocating it
        values = batches * batch_size * math.prod(input_size)
        if values > MAX_SYNTHETIC_VALUES:
            raise KpcError(f"--calib-batches {batches} x --calib-batch-size {batch_size} synthetic images of "
                           f"{'x'.join(map(str, input_size))} are {values:,} values, above kpc's limit of "
                           f"{MAX_SYNTHETIC_VALUES:,}: give fewer or smaller batches")
    data = load_dataset(spec, "train", input_size, synthetic_size=batches * batch_size, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data.dataset, batch_size=batch_size, shuffle=True, generator=generator,
                        num_workers=workers, drop_last=False)
    for index, batch in enumerate(loader):
        if index >= batches:
            break
        if data.labeled:
            yield batch[0], batch[1]
        else:
            yield batch[0], None


# ---------------------------------------------------------------- training data

NATIVE_INPUT_SIZES: dict[str, tuple[int, int, int]] = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def native_input_size(spec: DataSpec) -> tuple[int, int, int] | None:
    """The size a dataset's images come in, so a model built for it needs no resizing (None: no single size)."""
    return NATIVE_INPUT_SIZES.get(spec.kind)


def dataset_num_classes(spec: DataSpec) -> int | None:
    """How many classes a labelled data spec has, without decoding any image (None for synthetic)."""
    if spec.kind in ("fashion-mnist", "cifar10"):
        return 10
    if spec.kind == "imagefolder":
        assert spec.path is not None
        train = _imagefolder_split_dir(spec.path, "train")
        return sum(1 for entry in train.iterdir() if entry.is_dir())
    return None


def _imagefolder_split_dir(path: Path, split: str) -> Path:
    """Training needs a held-out split: an imagefolder must have both train/ and val/ class folders."""
    sub = path / ("train" if split == "train" else "val")
    if not sub.is_dir():
        raise KpcError(f"imagefolder {path} has no {sub.name}/ subfolder: training needs {path}/train/CLASS/*.jpg "
                       f"and {path}/val/CLASS/*.jpg")
    return sub


class EpochSeeded(Dataset):
    """Makes a dataset's random augmentation a function of (seed, epoch, index) only.

    Why: a run resumed after a crash, a run split across DDP ranks and a single-process
    run must see the very same augmented images, whichever process or worker draws them.
    The CPU RNG is saved and restored around each item, so nothing else's randomness changes.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        mixed = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index)) % (2**63 - 1)
        generator = torch.default_generator  # CPU only: seeding CUDA per item would cost more than the item
        saved = generator.get_state()
        generator.manual_seed(mixed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(saved)


@dataclass
class TrainingData:
    """The two splits a training run needs, with what the artifact must record about them."""

    train: EpochSeeded
    val: Dataset
    num_classes: int
    normalization: Normalization
    label: str


def training_data(spec: DataSpec, input_size: tuple[int, int, int], *, subset: int | None = None,
                  seed: int = 0) -> TrainingData:
    """Train split (augmented) and val split (eval transforms) of a labelled data spec.

    `subset` keeps the first N training images and the first N/5 validation images, so
    tests and benchmarks can run in seconds on real data.
    """
    if spec.kind == "synthetic":
        raise KpcError("training needs labelled data: use fashion-mnist[:PATH], cifar10:PATH or imagefolder:PATH")
    if spec.kind == "imagefolder":
        assert spec.path is not None
        for split in ("train", "val"):
            _imagefolder_split_dir(spec.path, split)
    if subset is not None and subset < 1:
        raise KpcError(f"--subset must be at least 1 (got {subset})")
    train = load_dataset(spec, "train", input_size, augment=True, seed=seed)
    val = load_dataset(spec, "val", input_size, augment=False, seed=seed)
    num_classes = train.num_classes or dataset_num_classes(spec) or 0
    if spec.kind == "imagefolder" and len(val.dataset.classes) != num_classes:  # type: ignore[attr-defined]
        raise KpcError(f"imagefolder {spec.path}: train/ has {num_classes} classes but val/ has "
                       f"{len(val.dataset.classes)}")  # type: ignore[attr-defined]
    _check_labels(train.dataset, num_classes, spec)
    train_set, val_set = train.dataset, val.dataset
    if subset is not None:
        train_set = Subset(train_set, range(min(subset, len(train_set))))  # type: ignore[arg-type]
        val_set = Subset(val_set, range(min(max(1, subset // 5), len(val_set))))  # type: ignore[arg-type]
    if len(train_set) == 0 or len(val_set) == 0:  # type: ignore[arg-type]
        raise KpcError(f"data spec {spec.label()} has an empty train or val split")
    return TrainingData(EpochSeeded(train_set, seed), val_set, num_classes, train.normalization, spec.label())


def _check_labels(dataset: Dataset, num_classes: int, spec: DataSpec) -> None:
    """In-memory datasets are checked up front: a label outside the classes would fail mid-epoch."""
    labels = getattr(dataset, "labels", None)
    if labels is None or len(labels) == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise KpcError(f"{spec.label()} has labels {low}..{high}, outside its {num_classes} classes: "
                       "the dataset is corrupt")
