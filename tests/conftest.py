"""Shared fixtures: real models at small inputs, real Fashion-MNIST where the package is installed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kpc.data import FASHION_MNIST_DIR

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)

SMALL = (3, 64, 64)


def fashion_mnist_available() -> bool:
    return (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a busy 2-core machine, 2 OpenMP threads make a forward ~100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


TINY_RESNET = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self, num_classes=10, width=16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(Block(width, width, 1))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2))
        self.layer3 = nn.Sequential(Block(2 * width, 4 * width, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny(num_classes=10):
    return TinyResNet(num_classes)
'''


def file_spec(directory: Path, filename: str, source: str, factory: str) -> str:
    """Write a model's source as `directory/filename` and return its `file.py:factory` spec."""
    file = directory / filename
    file.write_text(source)
    return f"{file}:{factory}"


def write_tiny(directory: Path) -> str:
    """A ~1 MFLOP grayscale ResNet as a file spec: small enough for 2 shared CPU cores."""
    file = directory / "tiny_resnet.py"
    file.write_text(TINY_RESNET)
    return f"{file}:tiny"


def prune_spec(spec: str, budget, *, input_size=SMALL, num_classes: int | None = 10, data: str = "synthetic",
               **settings):
    """Open a spec and prune it through the model-first API with calibration read from a data spec."""
    from kpc.artifact import open_model
    from kpc.data import calibration_batches, parse_data_spec
    from kpc.pruning import PruneSettings, prune

    loaded = open_model(spec, num_classes=num_classes, input_size=input_size)
    # as `kpc prune --data synthetic` does: random images say nothing of a cut's effect, so auto measures nothing
    synthetic = {"sensitivity": 0} if data == "synthetic" else {}
    chosen = PruneSettings(**{"calib_batches": 2, "calib_batch_size": 4, **synthetic, **settings})
    batches = calibration_batches(parse_data_spec(data), loaded.input_size, batches=chosen.calib_batches,
                                  batch_size=chosen.calib_batch_size, seed=chosen.seed)
    return loaded, prune(loaded.model, loaded.example_input(), budget, batches, settings=chosen,
                         data_label=data)
