"""Lazy layers (`nn.LazyConv2d`, `nn.LazyLinear`, ...): shapes exist only after one forward pass.

Every step of kpc reads shapes before it runs the model (the output's size estimate, the
dependency graph, MAC counts), so a model built from lazy layers ended in "internal error:
ValueError: Attempted to use an uninitialized parameter". One forward pass on an input of the
size the user gave materializes them, as the model's own first batch would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from kpc.errors import KpcError


def lazy_modules(model: nn.Module) -> list[str]:
    """Names of the modules that hold a parameter or buffer without a shape yet."""
    return [name or type(model).__name__ for name, module in model.named_modules()
            if any(is_lazy(t) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))]


def materialize(model: nn.Module, input_size: Sequence[int]) -> nn.Module:
    """Give every lazy layer its shapes with one forward pass in eval mode (the model's mode is restored)."""
    if not lazy_modules(model):
        return model
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *[int(d) for d in input_size]))
    except Exception as exc:
        raise KpcError(f"the model's lazy layers could not take their shapes from an input of shape "
                       f"{(1, *input_size)} ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}): "
                       "give an --input-size the model accepts") from exc
    finally:
        model.train(was_training)
    left = lazy_modules(model)
    if left:  # a lazy layer the eval forward pass never reaches (a training-only auxiliary head)
        raise KpcError(f"lazy layer {left[0]}{f' and {len(left) - 1} more' if len(left) > 1 else ''} took no shape "
                       "from a forward pass in eval mode: run the model once in the mode that reaches it before "
                       "giving it to kpc")
    return model


__all__ = ["lazy_modules", "materialize"]
