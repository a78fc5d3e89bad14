"""kpc's import path for copying models a forward pass has touched; the implementation lives in
`exporters.modelcopy` because the exporters copy models too and must not import kpc."""

from __future__ import annotations

from exporters.modelcopy import copy_model, detach_cached_tensors

__all__ = ["copy_model", "detach_cached_tensors"]
