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


def refuse_scripted(model: nn.Module) -> None:
    """Refuse, in one line, a model holding `torch.jit.script`'ed (or traced) submodules.

    kpc learns a model's layers through forward hooks and torch-pruning's autograd trace;
    TorchScript modules take no hooks ("register_forward_pre_hook is not supported on
    ScriptModules", which kpc reported as its own bug), and their parameters cannot be
    sliced and re-assigned.
    """
    from kpc.errors import KpcError

    scripted: list[str] = []
    for name, module in model.named_modules():  # the outermost ones: a scripted module's children are scripted too
        if isinstance(module, torch.jit.ScriptModule) and not any(name.startswith(f"{s}.") or s == "the model"
                                                                   for s in scripted):
            scripted.append(name or "the model")
    if scripted:
        shown = ", ".join(scripted[:3]) + (f" and {len(scripted) - 3} more" if len(scripted) > 3 else "")
        raise KpcError(f"{shown} {'is a' if len(scripted) == 1 else 'are'} TorchScript module"
                       f"{'' if len(scripted) == 1 else 's'}, which kpc cannot trace or cut: build the model without "
                       "torch.jit.script/trace (script the pruned model afterwards)")


def input_advice(model: nn.Module) -> str:
    """What to do about a model that fails on its (N, C, H, W) example, for the end of a one-line error.

    "Give an --input-size the model accepts" cannot be followed for a model that takes two
    inputs, or a 1-D or 3-D signal: --input-size is always C x H x W.
    """
    import inspect

    try:
        parameters = inspect.signature(model.forward).parameters.values()
        required = [p.name for p in parameters if p.default is p.empty
                    and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        required = []
    if len(required) > 1:
        return (f"kpc prunes models that take one image batch, and this forward takes {len(required)} inputs "
                f"({', '.join(required)}): wrap it in a module that takes one")
    kinds = {type(m) for m in model.modules()}
    if nn.Conv2d not in kinds and kinds & {nn.Conv1d, nn.Conv3d}:
        found = sorted(k.__name__ for k in kinds & {nn.Conv1d, nn.Conv3d})
        return (f"kpc prunes image models that take (N, C, H, W) batches, and this one is built of {', '.join(found)} "
                "layers")
    return "give an --input-size (C x H x W) the model accepts"
