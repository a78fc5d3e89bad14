"""MACs of products between activations: attention's q·kᵀ and attn·v, which layer counters do not see.

torch-pruning's counter counts layers (convs, linears, norms). An attention module's
core, the products of queries with keys and of attention weights with values, is
functional code inside the module; the counter used to cover it with one formula for
two timm classes, and that formula assumes the output projection is square, which a
pruned model's is not. kpc counts layers with the counter and these products here,
from the shapes they are actually called with, for any module that computes them:
`torch.matmul` / `@`, `bmm`, `baddbmm`, `einsum` of two operands and
`scaled_dot_product_attention`. A product with a parameter is a layer's and is left to
the counter, as is anything inside a module the counter counts whole
(`nn.MultiheadAttention`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.bmm,
            torch.Tensor.bmm}
_BADDBMM = {torch.baddbmm, torch.Tensor.baddbmm}


def _matmul_macs(a: torch.Tensor, b: torch.Tensor) -> int:
    """MACs of a @ b with torch.matmul's broadcasting (1-D operands included)."""
    if a.ndim == 0 or b.ndim == 0:
        return 0
    rows = a.shape[-2] if a.ndim > 1 else 1
    inner = a.shape[-1]
    cols = b.shape[-1] if b.ndim > 1 else 1
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) if a.ndim > 2 or b.ndim > 2 else ()
    return int(math.prod(batch) * rows * inner * cols)


def _einsum_macs(equation: str, operands: tuple[Any, ...]) -> int:
    """MACs of a two-operand einsum: the product of every index's size (the loop nest it describes)."""
    if len(operands) != 2 or "..." in equation:
        return 0
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for letters, tensor in zip(inputs, operands, strict=True):
        if not isinstance(tensor, torch.Tensor) or len(letters) != tensor.ndim:
            return 0
        sizes.update(zip(letters, (int(s) for s in tensor.shape), strict=True))
    return int(math.prod(sizes.values()))


def _macs_of(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    if func in _MATMULS and len(args) >= 2:
        a, b = (args[1], args[0]) if func is torch.Tensor.__rmatmul__ else (args[0], args[1])
        operands = (a, b)
        macs = lambda: _matmul_macs(a, b)  # noqa: E731
    elif func in _BADDBMM and len(args) >= 3:
        operands = (args[1], args[2])
        macs = lambda: _matmul_macs(args[1], args[2])  # noqa: E731
    elif func is torch.einsum and args and isinstance(args[0], str):
        operands = tuple(args[1][0] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:])
        macs = lambda: _einsum_macs(args[0], operands)  # noqa: E731
    elif func is F.scaled_dot_product_attention and len(args) >= 3:
        q, k, v = args[:3]
        operands = (q, k, v)
        macs = lambda: math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])  # noqa: E731
    else:
        return 0
    if not all(isinstance(t, torch.Tensor) for t in operands) or any(isinstance(t, nn.Parameter) for t in operands):
        return 0
    return macs()


class _Counter(TorchFunctionMode):
    """Adds each activation product's MACs to the innermost running module (unless a counted-whole one runs)."""

    def __init__(self, stack: list[nn.Module], counted_whole: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        self.stack, self.counted_whole = stack, counted_whole
        self.by_module: dict[nn.Module, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.stack and not any(self.counted_whole(m) for m in self.stack):
            macs = _macs_of(func, args, kwargs)
            if macs:
                self.by_module[self.stack[-1]] = self.by_module.get(self.stack[-1], 0) + macs
        return func(*args, **kwargs)


def activation_matmul_macs(model: nn.Module, example: torch.Tensor, counted_whole: Callable[[nn.Module], bool]
                           ) -> dict[nn.Module, int]:
    """MACs of every product between activations in one forward pass, by the module that computes it."""
    stack: list[nn.Module] = []
    handles = []

    def enter(module: nn.Module, _inputs: Any) -> None:
        stack.append(module)

    def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:  # returns None: the output stays as it is
        stack.pop()

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    counter = _Counter(stack, counted_whole)
    modes = {module: module.training for module in model.modules()}
    model.eval()  # no running statistics updated, no dropout: shapes are all this pass reads
    try:
        with torch.no_grad(), counter:
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return counter.by_module


__all__ = ["activation_matmul_macs"]
