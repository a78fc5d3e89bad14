"""kpc: knapsack channel pruning with inner distillation, verified on the serving runtime.

Importing `kpc` stays light (no torch) so that the pure parts, such as the knapsack
solver, can be used and tested without the deep-learning stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    import torch


def load(path: Any) -> torch.nn.Module:
    """Rebuild a pruned or trained kpc artifact (a directory) as a module: no pickle."""
    from kpc.artifact import load_artifact

    return load_artifact(path).model


__all__ = ["__version__", "load"]
