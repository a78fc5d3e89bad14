"""Optimiser and learning-rate schedule.

The schedule is a pure function of the global step (linear warm-up, then cosine to zero),
so a resumed run needs no scheduler state: the epoch in the checkpoint fixes the step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kpc.errors import KpcError

OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(module: nn.Module, name: str, lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; biases and norm scales (1-D tensors) get no weight decay."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise KpcError(f"unknown optimizer {name!r}: use {' or '.join(OPTIMIZERS)}")


def lr_at(step: int, *, base: float, total: int, warmup: int) -> float:
    """Learning rate for global step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
