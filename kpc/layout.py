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
