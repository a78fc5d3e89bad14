"""Rewrites that let the ONNX exporter lower a module it otherwise refuses, computing the same thing.

The TorchScript exporter lowers ``nn.AdaptiveAvgPool2d`` only when every output size divides
the input size (it becomes a plain AveragePool). At small inputs that fails for common
classifiers: VGG and AlexNet pool a 2x2 map (a 64x64 image) to 7x7 or 6x6. Adaptive average
pooling is linear in each spatial axis, so for the input size the graph is exported at it is
exactly ``P_h @ x @ P_w^T`` with two constant averaging matrices, which every runtime runs as
MatMul. Only the batch axis of an exported graph may vary, so fixing H and W loses nothing.

The exporter has no lowering of ``aten::rms_norm`` at any opset it implements (ONNX's
RMSNormalization arrives at opset 23), so every model with an ``nn.RMSNorm`` or timm's RmsNorm
(aimv2, gemma4's ViT) failed to export. Its lowering of ``Tensor.unfold`` (sliding windows, as
in timm's halo attention) needs the input's size, which a padded tensor of a dynamic-batch
graph does not carry ("input size not accessible": halonet, haloregnetz did not export).
:func:`decomposed` computes both, while the exporter traces, from elementary operations every
opset has: rms_norm as pow, mean, rsqrt and mul; unfold as one index_select of the windows'
positions and a reshape; an adaptive average pool called as a function, where its sizes do not
divide, as the same two matrix products as the module rewrite above.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from exporters.modelcopy import copy_model


def averaging_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) weights of adaptive average pooling along one axis (PyTorch's window rule)."""
    matrix = torch.zeros(size_out, size_in)
    for index in range(size_out):
        start = (index * size_in) // size_out
        end = math.ceil((index + 1) * size_in / size_out)
        matrix[index, start:end] = 1.0 / (end - start)
    return matrix


class MatmulAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` for one input size, as two matrix products the exporter can lower."""

    def __init__(self, size_in: tuple[int, int], size_out: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("rows", averaging_matrix(size_in[0], size_out[0]), persistent=False)
        self.register_buffer("cols_t", averaging_matrix(size_in[1], size_out[1]).t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.rows, x), self.cols_t)


def _pool_sizes(module: nn.AdaptiveAvgPool2d, shape: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int]]:
    height, width = int(shape[-2]), int(shape[-1])
    out = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * 2
    return (height, width), (height if out[0] is None else int(out[0]), width if out[1] is None else int(out[1]))


def exportable(module: nn.Module, args: tuple[torch.Tensor, ...]) -> nn.Module:
    """``module`` itself, or a copy whose adaptive average pools the exporter cannot lower are rewritten.

    The pools' input sizes come from one forward pass on ``args``; a pool whose output size
    divides its input is left to the exporter.
    """
    seen: dict[str, set[tuple[int, ...]]] = {}
    hooks = []
    for name, child in module.named_modules():
        if isinstance(child, nn.AdaptiveAvgPool2d) and name:
            hooks.append(child.register_forward_hook(
                lambda _m, inputs, _out, name=name: seen.setdefault(name, set()).add(tuple(inputs[0].shape[-2:]))))
    if not hooks:
        return module
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            module(*args)
    finally:
        module.train(was_training)
        for hook in hooks:
            hook.remove()
    rewrite = {}
    for name, shapes in seen.items():
        if len(shapes) != 1:  # one pool called at several sizes: no single pair of matrices fits it
            continue
        size_in, size_out = _pool_sizes(module.get_submodule(name), next(iter(shapes)))
        if size_in[0] % size_out[0] or size_in[1] % size_out[1]:
            rewrite[name] = (size_in, size_out)
    if not rewrite:
        return module
    rewritten = copy_model(module)
    for name, (size_in, size_out) in rewrite.items():
        rewritten.set_submodule(name, MatmulAdaptiveAvgPool2d(size_in, size_out).to(args[0].device))
    return rewritten


def _rms_norm(x: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None,
              eps: float | None = None) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last ``len(normalized_shape)`` dims, as torch defines it
    (eps None: the machine epsilon of x's dtype)."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    epsilon = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + epsilon)
    return y if weight is None else y * weight


def _unfold(x: torch.Tensor, dimension: int, size: int, step: int) -> torch.Tensor:
    """``x.unfold(dimension, size, step)``: the windows' positions gathered along ``dimension``, each window's
    elements moved to a new last axis."""
    axis = dimension % x.ndim
    count = (int(x.shape[axis]) - size) // step + 1
    positions = (torch.arange(count) * step).unsqueeze(1) + torch.arange(size)  # (count, size)
    windows = x.index_select(axis, positions.flatten().to(x.device))
    windows = windows.unflatten(axis, (count, size))
    return windows.movedim(axis + 1, -1)


def _adaptive_avg_pool2d(x: torch.Tensor, output_size: Any) -> torch.Tensor:
    """``F.adaptive_avg_pool2d``; where an output size does not divide its input (which the exporter refuses),
    as the two matrix products of `MatmulAdaptiveAvgPool2d`, for a pool called in a forward rather than held
    as a module (timm's VGG pools its pre-logits map this way)."""
    size_in = (int(x.shape[-2]), int(x.shape[-1]))
    wanted = output_size if isinstance(output_size, tuple | list) else (output_size, output_size)
    size_out = tuple(size_in[i] if wanted[i] is None else int(wanted[i]) for i in range(2))
    if size_in[0] % size_out[0] == 0 and size_in[1] % size_out[1] == 0:
        return torch.nn.functional.adaptive_avg_pool2d(x, output_size)
    rows = averaging_matrix(size_in[0], size_out[0]).to(x.device, x.dtype)
    cols_t = averaging_matrix(size_in[1], size_out[1]).t().contiguous().to(x.device, x.dtype)
    return torch.matmul(torch.matmul(rows, x), cols_t)


_DECOMPOSITIONS: dict[Any, Any] = {torch.nn.functional.rms_norm: _rms_norm, torch.rms_norm: _rms_norm,
                                   torch.Tensor.unfold: _unfold,
                                   torch.nn.functional.adaptive_avg_pool2d: _adaptive_avg_pool2d}


class _Decompose(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        return _DECOMPOSITIONS.get(func, func)(*args, **(kwargs or {}))


@contextlib.contextmanager
def decomposed() -> Iterator[None]:
    """While active, rms_norm, ``Tensor.unfold`` and non-dividing adaptive pools run as elementary operations
    (see module docstring); every other operation runs as it is."""
    with _Decompose():
        yield
