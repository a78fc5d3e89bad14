"""Shared fixtures: real models at small inputs, real Fashion-MNIST where the package is installed."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
