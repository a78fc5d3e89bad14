"""Run a model once with forward hooks: how kpc learns shapes, widths and which tensor feeds which layer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def forward_with_hooks(model: nn.Module, example: torch.Tensor, modules: Iterable[nn.Module],
                       hook: Callable[[nn.Module, tuple[Any, ...], Any], None]) -> Any:
    """Call `hook(module, inputs, output)` for every listed module during one no-grad forward pass."""
    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        with torch.no_grad():
            return model(example)
    finally:
        for handle in handles:
            handle.remove()
