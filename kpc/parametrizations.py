"""Parametrized weights (weight_norm, spectral_norm, orthogonal, torch.nn.utils.prune masks, ...): baked into
plain weights before a cut.

torch-pruning slices a layer's `weight` by assigning it a new Parameter, which a
parametrized module refuses ("attribute 'weight' already exists"): every group through a
weight-normed or spectrally normed conv was left whole, and such a network could not be
pruned at all. At inference a parametrization is a function of the tensors it stores, so
kpc replaces each by its current value (the module goes back to its own class, the tensor
becomes a Parameter again; the older hook-based norms go through `remove_weight_norm` and
`remove_spectral_norm`, and the masks of `torch.nn.utils.prune` through `prune.remove`): the
model computes what it computed, and that is what is pruned.
Replaying a plan (`kpc.apply.replay`) bakes the freshly built architecture the same way
first, so the saved weights fit it. The price: the pruned model's own training no longer
re-normalizes those weights.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from kpc.errors import KpcError

log = logging.getLogger(__name__)


def parametrized_weights(model: nn.Module) -> list[str]:
    """Names (`module.tensor`) of every parametrized or weight-/spectral-normed tensor of `model`."""
    found = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if parametrize.is_parametrized(module):
            found += [f"{prefix}{tensor}" for tensor in module.parametrizations]
        if _hooked(module, "weight_g") and _hooked(module, "weight_v"):
            found.append(f"{prefix}weight (weight_norm)")
        if _hooked(module, "weight_orig") and _hooked(module, "weight_u"):
            found.append(f"{prefix}weight (spectral_norm)")
        found += [f"{prefix}{tensor} (torch.nn.utils.prune mask)" for tensor in _masked(module)]
    return found


def _masked(module: nn.Module) -> list[str]:
    """Tensors `torch.nn.utils.prune` masks on `module`: it keeps `NAME_orig` and the buffer `NAME_mask`."""
    return [name.removesuffix("_orig") for name, _ in module.named_parameters(recurse=False)
            if name.endswith("_orig") and _hooked(module, f"{name.removesuffix('_orig')}_mask")]


def bake(model: nn.Module) -> list[str]:
    """Replace every parametrized weight of `model`, in place, by its current value; returns what was baked."""
    baked = parametrized_weights(model)
    if not baked:
        return []
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            _bake_parametrized(module)
        if _hooked(module, "weight_g") and _hooked(module, "weight_v"):
            torch.nn.utils.remove_weight_norm(module)
        if _hooked(module, "weight_orig") and _hooked(module, "weight_u"):
            _remove_hooked_spectral_norm(module)
        for tensor in _masked(module):
            _apply_mask(module, tensor)
    log.info("baked %d parametrized weight(s) into plain weights before pruning (%s%s): the model computes the "
             "same; training the pruned model will not re-normalize or re-mask them", len(baked), ", ".join(baked[:3]),
             ", ..." if len(baked) > 3 else "")
    return baked


def _bake_parametrized(module: nn.Module) -> None:
    """Turn a parametrized module back into its own class, each parametrized tensor a Parameter of its value.

    Not `remove_parametrizations`: it deletes the tensor's property from the module's class, and
    a deep copy of a parametrized module shares that class with the original, so baking kpc's
    working copy broke the caller's model ("'ParametrizedConv2d' object has no attribute 'weight'").
    Here only the instance changes.
    """
    values = {}
    for name, chain in module.parametrizations.items():
        trained = any(p.requires_grad for p in chain.parameters())
        with torch.no_grad():
            values[name] = nn.Parameter(getattr(module, name).detach().clone(), requires_grad=trained)
    base = parametrize.type_before_parametrizations(module)
    delattr(module, "parametrizations")
    module.__class__ = base
    for name, value in values.items():
        module.register_parameter(name, value)


def _remove_hooked_spectral_norm(module: nn.Module) -> None:
    """`remove_spectral_norm`, and the state-dict loading hook it leaves behind.

    The one use of torch's private module state in kpc: torch wraps the load hook the older
    spectral norm registers, so `remove_spectral_norm` no longer recognises it, and a baked
    module still asked for `weight_orig` when its weights were loaded (the artifact check
    refused to write it). Checked after the removal: a module whose state does not load back
    into itself is refused in one line.
    """
    from torch.nn.utils.spectral_norm import SpectralNormLoadStateDictPreHook

    torch.nn.utils.remove_spectral_norm(module)
    hooks = getattr(module, "_load_state_dict_pre_hooks", None)
    if isinstance(hooks, dict):
        for key, hook in list(hooks.items()):
            if isinstance(getattr(hook, "hook", hook), SpectralNormLoadStateDictPreHook):
                del hooks[key]
    try:
        module.load_state_dict(module.state_dict())
    except Exception as exc:
        raise KpcError(f"could not turn the torch.nn.utils.spectral_norm of a {type(module).__name__} into a plain "
                       f"weight with torch {torch.__version__} ({str(exc).splitlines()[0][:120]}): use "
                       "torch.nn.utils.parametrizations.spectral_norm instead") from exc


def _apply_mask(module: nn.Module, tensor: str) -> None:
    """`torch.nn.utils.prune.remove`: the masked tensor becomes a plain Parameter holding `orig * mask`.

    Left in place, torch-pruning sliced `weight` (a plain attribute the pruning hook recomputes)
    and failed ("cannot assign 'torch.FloatTensor' as parameter 'weight'"), so every group through
    a layer a user had pruned with torch's own utility was left whole.
    """
    from torch.nn.utils import prune

    try:
        prune.remove(module, tensor)
    except ValueError as exc:  # a NAME_orig/NAME_mask pair that torch's pruning hooks did not make
        raise KpcError(f"{type(module).__name__}.{tensor}_orig and {tensor}_mask look like a torch.nn.utils.prune "
                       f"mask, but torch cannot remove it ({str(exc).splitlines()[0][:120]}): call "
                       "torch.nn.utils.prune.remove on the model first") from exc


def _hooked(module: nn.Module, attribute: str) -> bool:
    """Whether the module holds `attribute` as its own parameter or buffer (the old hook-based norms' storage)."""
    return any(name == attribute for name, _ in module.named_parameters(recurse=False)) or \
        any(name == attribute for name, _ in module.named_buffers(recurse=False))


__all__ = ["bake", "parametrized_weights"]
