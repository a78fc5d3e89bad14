"""Shared by the accuracy benchmarks: the Fashion-MNIST splits, a cached teacher, evaluation, peer pruners.

Splits: the teacher trains on the first 55,000 training images; the last 5,000 training
images are the validation split every setting is chosen on; the 10,000 test images are
only reported. The teacher (a ResNet-18 shaped for 28x28 images, `fmnist_net.py`: torchvision's
own stalls near 91%) is trained by kpc once and cached in the work directory, so the
benchmarks share it.

Peers are Torch-Pruning's own pruners (MetaPruner, uniform or global), with the pruning
ratio bisected until the counted MACs are within 1% under the target, so every arm is
compared at the same MACs.
"""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from kpc.artifact import LoadedModel, open_model
from kpc.costs import count_macs
from kpc.data import FASHION_MNIST_DIR, FASHION_MNIST_NORM, ArrayImages, fashion_mnist_arrays

ROOT = Path(__file__).resolve().parents[1]
SIZE = (1, 28, 28)
TRAIN_IMAGES = 55_000  # the teacher's training images; the rest of the training split is validation
TEACHER_SPEC = f"{Path(__file__).resolve().with_name('fmnist_net.py')}:resnet18_small"
TEACHER_EPOCHS = 30  # the published teacher's schedule


def teacher_args(epochs: int = TEACHER_EPOCHS) -> list[str]:
    return ["--data", "fashion-mnist", "--subset", str(TRAIN_IMAGES), "--epochs", str(epochs), "--batch-size", "128",
            "--lr", "0.05", "--warmup-epochs", "0.5", "--threads", "2"]


def teacher_description(epochs: int = TEACHER_EPOCHS) -> str:
    return ("ResNet-18 laid out for 28x28 (benchmarks/fmnist_net.py:resnet18_small), trained by kpc train on the "
            f"first 55,000 Fashion-MNIST training images, {epochs} epochs")


TEACHER_DESCRIPTION = teacher_description()


def teacher(work: Path, spec: str = TEACHER_SPEC, epochs: int = TEACHER_EPOCHS) -> LoadedModel:
    """The cached teacher (trained by `kpc train` on the first 55,000 images), training it if missing.

    30 epochs (the published figures) take about 75 minutes on a 2-core VM; a shorter
    schedule (`epochs`) is cached apart, for runs that compare pruners on one teacher.
    """
    out = work / ("teacher" if epochs == TEACHER_EPOCHS else f"teacher-e{epochs}")
    if not (out / "plan.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        args = teacher_args(epochs)
        print(f"training the teacher into {out} (kpc train {spec} {' '.join(args)})", flush=True)
        subprocess.run([sys.executable, "-m", "kpc", "train", spec, *args, "--out", str(out)], check=True,
                       cwd=ROOT)
    return open_model(str(out), model_file=spec if ".py:" in spec else None)


@functools.cache
def _arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    return fashion_mnist_arrays(FASHION_MNIST_DIR, "train" if split in ("train", "val") else "test")


def dataset(split: str, augment: bool = False) -> Any:
    """'train' (first 55,000), 'val' (last 5,000 training images) or 'test' (the 10,000 test images)."""
    images, labels = _arrays(split)
    full = ArrayImages(images, labels, FASHION_MNIST_NORM, SIZE, augment)
    if split == "train":
        return Subset(full, range(TRAIN_IMAGES))
    if split == "val":
        return Subset(full, range(TRAIN_IMAGES, len(full)))
    return full


def batches(split: str, count: int, batch_size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` shuffled batches of a split (eval transforms), fixed by `seed`: calibration and BN data."""
    loader = DataLoader(dataset(split), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    out = []
    for index, batch in enumerate(loader):
        if index >= count:
            break
        out.append((batch[0], batch[1]))
    return out


@torch.no_grad()
def accuracy(model: nn.Module, split: str) -> float:
    """Top-1 (%) on a whole split."""
    model.eval()
    correct = seen = 0
    for images, labels in DataLoader(dataset(split), batch_size=500):
        correct += int((model(images).argmax(1) == labels).sum())
        seen += len(labels)
    return 100.0 * correct / seen


def macs(model: nn.Module) -> float:
    return count_macs(model, torch.randn(1, *SIZE))[0]


def _gradients(model: nn.Module, calibration: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    model.zero_grad(set_to_none=True)
    for images, labels in calibration:
        nn.functional.cross_entropy(model(images), labels, reduction="sum").backward()


def tp_prune(model: nn.Module, target_macs: float, *, importance: str, global_pruning: bool,
             calibration: list[tuple[torch.Tensor, torch.Tensor]] | None = None, round_to: int = 8) -> nn.Module:
    """Torch-Pruning's MetaPruner at the pruning ratio (bisected) whose counted MACs land within 1% under the target."""
    import torch_pruning as tp

    def attempt(ratio: float) -> nn.Module:
        candidate = copy.deepcopy(model).eval()
        if importance == "taylor":
            scorer = tp.importance.GroupTaylorImportance()
            _gradients(candidate, calibration or [])
        else:
            scorer = tp.importance.GroupMagnitudeImportance(p=1)
        head = [m for m in candidate.modules() if isinstance(m, nn.Linear)][-1:]
        pruner = tp.pruner.MetaPruner(candidate, torch.randn(1, *SIZE), importance=scorer,
                                      global_pruning=global_pruning, pruning_ratio=ratio, ignored_layers=head,
                                      round_to=round_to, max_pruning_ratio=0.95)
        pruner.step()
        candidate.zero_grad(set_to_none=True)
        return candidate

    low, high, best = 0.0, 0.95, None
    for _ in range(24):
        middle = (low + high) / 2
        candidate = attempt(middle)
        counted = macs(candidate)
        if counted > target_macs:
            low = middle
            continue
        best = candidate
        if counted >= 0.99 * target_macs:
            break
        high = middle
    if best is None:
        raise RuntimeError(f"Torch-Pruning could not reach {target_macs:.3g} MACs")
    return best


def stage_widths(model: nn.Module) -> str:
    """Output widths of ResNet's stages' convs in order: what the allocation looks like."""
    widths = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and name.startswith("layer") and "downsample" not in name:
            widths.append(module.out_channels)
    return "/".join(str(w) for w in widths)


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
