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
