"""kpc: knapsack channel pruning with inner distillation, verified on the runtime that serves the model.

The library, model first:

    result = kpc.prune(model, example_inputs, kpc.Budget(ratio=0.5), calibration=loader)
    kpc.save(result, "out/")
    child = kpc.load("out/")                      # or kpc.load("out/", model=MyNet())
    ikd = kpc.InnerDistillation(parent, child, example_inputs)
    table = kpc.profile(model, example_inputs, runtime="ort-cpu", threads=2)
    report = kpc.bench(parent, child, example_inputs, runtime="ort-cpu")

Importing `kpc` stays light (no torch): every name above is imported on first use, so
the pure parts (the knapsack, the planner, the plan) work without the deep-learning stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "prune": ("kpc.pruning", "prune"),
    "PruneResult": ("kpc.pruning", "PruneResult"),
    "PruneSettings": ("kpc.pruning", "PruneSettings"),
    "Budget": ("kpc.budget", "Budget"),
    "Plan": ("kpc.plan", "Plan"),
    "save": ("kpc.artifact", "save"),
    "InnerDistillation": ("kpc.train.distill", "InnerDistillation"),
    "LatencyTable": ("kpc.latency.table", "LatencyTable"),
    "load_table": ("kpc.latency.table", "load_table"),
    "bench": ("kpc.benchmark", "bench"),
    "KpcError": ("kpc.errors", "KpcError"),
}

_FUNCTIONS = ("prune", "save", "load_table", "bench")

if TYPE_CHECKING:
    import torch

    from kpc.artifact import save
    from kpc.benchmark import bench
    from kpc.budget import Budget
    from kpc.errors import KpcError
    from kpc.latency.table import LatencyTable, load_table
    from kpc.plan import Plan
    from kpc.pruning import PruneResult, PruneSettings, prune
    from kpc.train.distill import InnerDistillation


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        if name in _FUNCTIONS:  # every error a user can cause is a KpcError, the exporters' ones too
            from kpc.errors import as_kpc_errors

            value = as_kpc_errors(value)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kpc' has no attribute {name!r}")


def _as_kpc_errors(func: Any) -> Any:
    from kpc.errors import as_kpc_errors

    return as_kpc_errors(func)


@_as_kpc_errors
def load(path: Any, model: Any = None) -> torch.nn.Module:
    """Rebuild an artifact (a directory) as a module: no pickle, no code run on the plan's say-so.

    `model`: a fresh, unpruned instance of the architecture, needed when the artifact was
    pruned from a class kpc cannot build by name (your own module).
    """
    from kpc.artifact import load_artifact

    return load_artifact(path, model=model).model


@_as_kpc_errors
def profile(model: Any, example_inputs: Any, *, runtime: str = "ort-cpu", threads: int = 2, precision: str = "fp32",
            out: Any = None, **options: Any) -> LatencyTable:
    """Measure a latency table of `model` at `example_inputs`' shape (and batch) on `runtime`.

    Further options are `ProfileSettings` fields (round_to, min_channels, ignore, iters, ...);
    `out` also writes the table there.
    """
    from pathlib import Path

    from kpc.errors import KpcError
    from kpc.latency.profiler import ProfileSettings
    from kpc.latency.profiler import profile as run_profile

    if not hasattr(example_inputs, "shape") or len(example_inputs.shape) != 4:
        raise KpcError("example_inputs should be one image batch of shape (N, C, H, W)")
    settings = ProfileSettings(runtime=runtime, threads=threads, precision=precision,
                               batch=int(example_inputs.shape[0]), **options)
    return run_profile(model.eval(), example_inputs[:1], settings, Path(out) if out is not None else None)


__all__ = ["Budget", "InnerDistillation", "KpcError", "LatencyTable", "Plan", "PruneResult", "PruneSettings",
           "__version__", "bench", "load", "load_table", "profile", "prune", "save"]
