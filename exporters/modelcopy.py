"""Copying a model that a forward pass has touched.

Some modules cache tensors computed from their parameters in plain attributes (timm's
EfficientViT keeps its attention biases in a dict after an eval-mode forward). Computed
with gradients on, as kpc's tracing and importance passes run, such a cache holds tensors
that belong to the autograd graph, and `copy.deepcopy` refuses those ("Only Tensors created
explicitly by the user support the deepcopy protocol"). Their values are what matters to a
copy, so they are detached first.
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)
_MODULE_SLOTS = ("_parameters", "_buffers", "_modules")


def _detached(value: Any) -> tuple[Any, bool]:
    """`value` with every non-leaf tensor in it (directly, or in a dict, list or tuple) detached; changed?"""
    if isinstance(value, torch.Tensor):
        return (value.detach(), True) if value.grad_fn is not None else (value, False)
    if isinstance(value, dict):
        changed = False
        for key, item in list(value.items()):
            new, item_changed = _detached(item)
            if item_changed:
                value[key] = new
                changed = True
        return value, changed
    if isinstance(value, (list, tuple)):
        items = [_detached(item) for item in value]
        if any(changed for _new, changed in items):
            news = [new for new, _changed in items]
            if isinstance(value, list):
                value[:] = news
                return value, True
            return (type(value)(*news) if hasattr(value, "_fields") else type(value)(news)), True
    return value, False


def detach_cached_tensors(model: nn.Module) -> int:
    """Detach, in place, tensors of the autograd graph that modules keep in plain attributes; how many attributes."""
    count = 0
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if name in _MODULE_SLOTS:
                continue
            new, changed = _detached(value)
            if changed:
                object.__setattr__(module, name, new)
                count += 1
    return count


def copy_model(model: M) -> M:
    """`copy.deepcopy(model)`, after detaching the cached tensors a deep copy cannot take."""
    detach_cached_tensors(model)
    return copy.deepcopy(model)
