"""Conversions between named numpy arrays and torch values.

Every runner speaks ``dict[str, np.ndarray]``; this module is the one place that decides
how a torch module's positional arguments and (possibly nested) outputs map onto names,
so the torch runners and the ONNX exporter agree without talking to each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def default_output_names(count: int) -> list[str]:
    """``output`` for a single output, ``output_0..`` otherwise (also the ONNX export default)."""
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def flatten_outputs(value: Any) -> list[tuple[str | None, torch.Tensor]]:
    """Tensors of a module's return value in a stable order, with dict keys kept as names."""
    if isinstance(value, torch.Tensor):
        return [(None, value)]
    if isinstance(value, Mapping):
        return [(str(k), t) for k, v in value.items() for _, t in flatten_outputs(v)]
    if isinstance(value, list | tuple):
        return [item for v in value for item in flatten_outputs(v)]
    raise TypeError(f"model returned {type(value).__name__}; expected tensors, tuples, lists or dicts")


def name_outputs(value: Any, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Name a module's outputs: explicit names, else dict keys, else the default names."""
    flat = flatten_outputs(value)
    if names is None:
        keys = [k for k, _ in flat]
        names = keys if all(keys) and len(set(keys)) == len(keys) else default_output_names(len(flat))
    if len(names) != len(flat):
        raise ValueError(f"model returned {len(flat)} outputs but {len(names)} output names were given")
    return {n: t for n, (_, t) in zip(names, flat, strict=True)}


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Host copy; bfloat16 becomes float32 because numpy has no bfloat16."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.cpu().numpy()


def batch_of(inputs: Mapping[str, np.ndarray]) -> int | None:
    """Leading dimension of the first input, the batch by convention for image models."""
    for arr in inputs.values():
        return int(arr.shape[0]) if np.ndim(arr) > 0 else None
    return None
