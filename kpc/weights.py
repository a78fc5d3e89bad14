"""Weights on disk: a module's whole state dict in safetensors, including what safetensors drops.

A state dict is more than its tensors. `state_dict()._metadata` carries each module's
version, which some modules' `_load_from_state_dict` read (torchvision's MNASNet refuses
to load without it; BatchNorm uses it to upgrade old checkpoints), and tied parameters
appear under several names. safetensors keeps only tensors and refuses shared storage, so
both are written into the file's string header here and restored on load: a module
loaded from disk receives exactly the state dict it was saved with.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kpc.errors import KpcError

# One header entry, a JSON object: safetensors writes several entries in an order that varies between saves,
# which would make two saves of the same weights differ byte for byte (and in their sha256).
HEADER_KEY = "kpc"
STATE_METADATA = "state_metadata"  # state_dict()._metadata (module prefix -> {"version": n})
ALIASES = "aliases"  # name -> the name whose tensor it shares


def tensors_for_file(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict as safetensors can hold it: unique tensors plus the header that restores the rest."""
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise KpcError(f"the model's state dict holds a {type(value).__name__} at {name!r}, not a tensor: kpc "
                           "can only save tensor state")
        key = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
               value.stride(), value.dtype)
        if value.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = value.detach().cpu().contiguous()
    storages = collections.Counter(t.untyped_storage().data_ptr() for t in tensors.values() if t.numel())
    tensors = {k: (v.clone() if v.numel() and storages[v.untyped_storage().data_ptr()] > 1 else v)
               for k, v in tensors.items()}
    metadata = {HEADER_KEY: json.dumps({STATE_METADATA: _plain_metadata(state), ALIASES: aliases}, sort_keys=True)}
    return tensors, metadata


def _plain_metadata(state: Any) -> dict[str, Any]:
    meta = getattr(state, "_metadata", None) or {}
    return {str(k): dict(v) for k, v in meta.items()}


def weights_bytes(model: nn.Module) -> bytes:
    from safetensors.torch import save

    tensors, metadata = tensors_for_file(model)
    return save(tensors, metadata=metadata)


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write the module's state dict to `path` (callers write into a temporary directory or file)."""
    from safetensors.torch import save_file

    tensors, metadata = tensors_for_file(model)
    save_file(tensors, str(path), metadata=metadata)
    return Path(path)


def read_state(path: str | Path, model: nn.Module | None = None) -> collections.OrderedDict[str, torch.Tensor]:
    """The state dict a file holds, with its aliases and per-module metadata restored.

    Files written by earlier kpc versions (safetensors' `save_model`, no metadata) get the
    aliases `save_model` recorded and the module versions of `model`, the architecture
    they are loaded into, which is what `load_state_dict` would see from a live model.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as handle:
            header = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
        raise KpcError(f"{path} is not a readable safetensors file ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    state: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict(tensors)
    try:
        ours = json.loads(header[HEADER_KEY]) if HEADER_KEY in header else None
        aliases = ours[ALIASES] if ours is not None else {
            k: v for k, v in header.items() if v in tensors and k not in tensors}
        for name, source in aliases.items():
            state[name] = state[source]
        if ours is not None:
            meta = ours[STATE_METADATA]
        else:
            meta = _plain_metadata(model.state_dict()) if model is not None else {}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KpcError(f"{path} has a malformed kpc header ({exc}): the file is corrupt") from exc
    state._metadata = collections.OrderedDict((k, dict(v)) for k, v in meta.items())  # type: ignore[attr-defined]
    return state


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load `path` into `model` strictly; raises RuntimeError (from torch) when they do not fit."""
    state = read_state(path, model)
    model.load_state_dict(state, strict=True)
