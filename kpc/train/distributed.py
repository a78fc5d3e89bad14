"""One code path for one process and for torchrun: rank, device, global batches, global BatchNorm.

Why it is shaped like this: a DDP run must equal a single-process run with the same global
batch up to floating-point noise. So (1) every rank cuts its share of the same seeded global
permutation, (2) BatchNorm normalises with statistics over the global batch, not the rank's
slice (nn.SyncBatchNorm on CUDA; on CPU, where SyncBatchNorm refuses to run, a small
all-reduce BatchNorm below), and (3) DDP averages gradients over equal per-rank batches.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from kpc.errors import KpcError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def check_device(preference: str) -> None:
    """auto, cpu, cuda or cuda:N; anything else is one line."""
    if not isinstance(preference, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", preference):
        raise KpcError(f"--device {preference!r} is not a device: use auto, cpu, cuda or cuda:N")


def pick_device(preference: str) -> torch.device:
    check_device(preference)
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise KpcError(f"--device {preference}: no CUDA device is available")
    return torch.device(preference)


def setup(device_preference: str = "auto") -> Context:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a one-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_preference)
    if world <= 1:
        return Context(0, 1, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), device)


def teardown(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()


def all_sum(context: Context, values: list[float]) -> list[float]:
    """Sum plain numbers over ranks (for metrics: correct counts, loss sums)."""
    if not context.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_flag(context: Context, flag: bool) -> bool:
    """Rank 0 decides (e.g. 'a checkpoint exists'); every rank acts on the same answer."""
    if not context.distributed:
        return flag
    tensor = torch.tensor([1 if flag else 0], device=context.device)
    dist.broadcast(tensor, 0)
    return bool(tensor.item())


class GlobalBatches(Sampler[list[int]]):
    """This rank's slice of every global batch of a seeded permutation (or of the plain order).

    Global batch k is order[k*B:(k+1)*B]; rank r gets the r-th of `world` equal slices. Training
    drops the last incomplete global batch so every rank always has the same batch size.
    """

    def __init__(self, size: int, global_batch: int, context: Context, *, shuffle: bool, seed: int = 0,
                 drop_last: bool = True) -> None:
        if global_batch % context.world:
            raise KpcError(f"--batch-size {global_batch} does not split evenly over {context.world} processes")
        self.size, self.global_batch, self.context = size, global_batch, context
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.global_batch)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        per_rank = self.global_batch // self.context.world
        for k in range(len(self)):
            batch = order[k * self.global_batch:(k + 1) * self.global_batch]
            if len(batch) < self.global_batch:  # the uneven tail (evaluation only): stride it over ranks
                yield batch[self.context.rank::self.context.world]
            else:
                yield batch[self.context.rank * per_rank:(self.context.rank + 1) * per_rank]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is again the sum over ranks (the adjoint of a sum-all-reduce)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch across ranks (CPU/gloo).

    Same parameters and buffers as nn.BatchNorm2d (the class is swapped in place and back),
    so checkpoints and artifacts never see it.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = (0, 2, 3)
        wide = input.double()  # sum-of-squares variance needs the headroom
        count = torch.full((1,), float(input.numel() // input.shape[1]), dtype=wide.dtype, device=input.device)
        stats = _AllReduceSum.apply(torch.cat([wide.sum(dims), (wide * wide).sum(dims), count]))
        channels = input.shape[1]
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels:2 * channels] / total - mean * mean).clamp_min(0)
        with torch.no_grad():
            if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
                self.num_batches_tracked += 1  # type: ignore[operator]
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = (var * (total / (total - 1).clamp_min(1))).to(self.running_var.dtype)
                self.running_mean.mul_(1 - momentum).add_(mean.detach().to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        shape = (1, channels, 1, 1)
        mean, var = mean.to(input.dtype), var.to(input.dtype)
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def globalize_batchnorm(model: nn.Module, context: Context) -> nn.Module:
    """Make BatchNorm see the global batch under DDP; a no-op in one process."""
    if not context.distributed:
        return model
    if context.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
    return model


def localize_batchnorm(model: nn.Module) -> nn.Module:
    """Undo globalize_batchnorm's CPU swap before saving (SyncBatchNorm keeps BatchNorm's state keys)."""
    for module in model.modules():
        if type(module) is GlobalBatchNorm2d:
            module.__class__ = nn.BatchNorm2d
    return model
