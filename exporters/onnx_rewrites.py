"""Rewrites that let the ONNX exporter lower operations it otherwise refuses, computing the same thing.

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
positions and a reshape; an adaptive average pool whose sizes do not divide (a module's, or one
called as a function, as timm's VGG does) as the two matrix products above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


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
    as the two matrix products of `MatmulAdaptiveAvgPool2d`. Every pool goes through here, a module's
    (``nn.AdaptiveAvgPool2d`` calls this function) or one called in a forward (timm's VGG pre-logits)."""
    size_in = (int(x.shape[-2]), int(x.shape[-1]))
    wanted = output_size if isinstance(output_size, tuple | list) else (output_size, output_size)
    size_out = tuple(size_in[i] if wanted[i] is None else int(wanted[i]) for i in range(2))
    if size_in[0] % size_out[0] == 0 and size_in[1] % size_out[1] == 0:
        return torch.nn.functional.adaptive_avg_pool2d(x, output_size)
    return MatmulAdaptiveAvgPool2d(size_in, size_out).to(x.device, x.dtype)(x)


_DECOMPOSITIONS: dict[Any, Any] = {torch.nn.functional.rms_norm: _rms_norm, torch.rms_norm: _rms_norm,
                                   torch.Tensor.unfold: _unfold,
                                   torch.nn.functional.adaptive_avg_pool2d: _adaptive_avg_pool2d}


class _Decompose(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        return _DECOMPOSITIONS.get(func, func)(*args, **(kwargs or {}))


def decomposed() -> TorchFunctionMode:
    """A context in which rms_norm, ``Tensor.unfold`` and non-dividing adaptive pools run as elementary
    operations (see module docstring); every other operation runs as it is."""
    return _Decompose()
