"""Memory layout of a model's weights, changed only where a layout applies.

`nn.Module.to(memory_format=torch.channels_last)` raises for a model holding any 5-D
tensor (a Conv3d weight, timm's LambdaLayer position embedding: "required rank 4 tensor to
use channels_last format"). NHWC is a speed choice for 4-D conv weights, so kpc sets it on
those and leaves every other tensor as it is.
"""

from __future__ import annotations

import torch
from torch import nn


def set_memory_format(model: nn.Module, memory_format: torch.memory_format) -> None:
    """Lay out every 4-D parameter and buffer of `model` in `memory_format`, in place; others are untouched."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dim() == 4:
                tensor.data = tensor.data.contiguous(memory_format=memory_format)


def runs_in_channels_last(model: nn.Module, example: torch.Tensor) -> bool:
    """Whether `model` runs on an NHWC `example`; if not, it is left in its own layout.

    A model that flattens with `x.view(x.size(0), -1)` fails on NHWC activations ("view size
    is not compatible with input tensor's size and stride"): NHWC is a speed choice, so such a
    model runs in its own layout instead of failing.
    """
    set_memory_format(model, torch.channels_last)
    try:
        with torch.no_grad():
            model(example.contiguous(memory_format=torch.channels_last) if example.dim() == 4 else example)
    except Exception:  # any failure in NHWC: the model's own layout is the safe one (its own errors surface there)
        set_memory_format(model, torch.contiguous_format)
        return False
    return True
