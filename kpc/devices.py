"""Where a model lives: the device its weights are on, for inputs that must follow them."""

from __future__ import annotations

import torch
from torch import nn


def module_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter; CPU for a model without parameters."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


__all__ = ["module_device"]
