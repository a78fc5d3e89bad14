"""BatchNorm recalibration after pruning: what makes a one-shot pruned network usable.

Removing channels changes what every later layer sees, but each BatchNorm still holds the
running mean and variance of the unpruned network. Re-estimating them on a few batches of
training images (forward passes only, no weight changes) restores the activations'
scale: measured on a ResNet-18 teacher at 77.9% pruned to half its FLOPs, 75.0% as saved
and 73.7% after re-estimation for kpc's child, against 53.9% for a uniform cut (issue 14).
Every BatchNorm is re-estimated, since every one after a pruned layer sees a new input.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kpc.devices import module_device
from kpc.errors import KpcError
from kpc.importance import as_batches

log = logging.getLogger(__name__)

DEFAULT_BATCHES = 20
FEW_IMAGES = 64  # below this many images re-estimated statistics are noise more than signal: say so


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_statistics(model: nn.Module, batches: Iterable[Any], count: int) -> tuple[int, int]:
    """The re-estimation itself, silent: returns the batches and images used.

    Only the BatchNorm layers switch to training mode (dropout and the rest stay in eval),
    and the model comes back in the mode it was in. Batches of one image are skipped.
    """
    layers = batchnorm_layers(model)
    was_training = model.training
    momenta = [layer.momentum for layer in layers]
    device = module_device(model)
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over every batch, not an exponential one
        layer.train()
    used = images = 0
    try:
        for index, (chunk, _labels) in enumerate(as_batches(batches)):
            if index >= count:
                break
            if chunk.shape[0] < 2:
                continue  # a batch of one has no variance to estimate
            model(chunk.to(device))
            used += 1
            images += chunk.shape[0]
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        model.train(was_training)
    return used, images


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], count: int) -> dict[str, int]:
    """Re-estimate every BatchNorm's running statistics on `count` batches (a cumulative average).

    Only the BatchNorm layers switch to training mode; dropout and the rest stay in eval,
    and no weight changes. Returns how many batches and images were used.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise KpcError(f"--bn-recalibrate must be a non-negative number of batches, got {count!r}")
    layers = batchnorm_layers(model)
    if count == 0 or not layers:
        return {"batches": 0, "images": 0, "layers": len(layers)}
    used, images = reestimate_statistics(model, batches, count)
    if used == 0:
        raise KpcError("BatchNorm recalibration got no batch of two images or more from the data")
    log.info("BatchNorm statistics re-estimated on %d batches (%d images) in %d layers", used, images, len(layers))
    if images < FEW_IMAGES:
        log.warning("BatchNorm statistics were re-estimated on only %d images: they are noisy (a variance from a "
                    "few images can be near zero and blow up rounding); give more batches, or --bn-recalibrate 0 to "
                    "keep the model's own", images)
    return {"batches": used, "images": images, "layers": len(layers)}
