"""Attention heads: a projection whose output a module splits into heads is pruned a whole head at a time.

A vision transformer's qkv projection produces the queries, keys and values of every head,
which the attention module reshapes by its `num_heads`. Removing rows that are not whole
heads leaves that reshape running with channels moved from one head to another, or breaks
it, so these groups used to be left whole, and with them most of a transformer's cost.

kpc prunes such a group by whole heads. Which rows make up one head depends on how the
module reshapes its projection: timm's `Attention` lays them out split-major (all queries,
then all keys, then all values, each head after head), LeViT-style modules head-major (each
head's queries, keys and values together). Neither is assumed: `confirm_layouts` takes the
first layout under which removing one head from a copy computes exactly what zeroing that
head's rows computes in the original (a zeroed head contributes nothing, whatever the
softmax does), and a group for which no layout passes is left whole with the reason.

Removing a head also changes state the layers do not hold: the module's head count (and
the width derived from it, timm's `attn_dim`), and per-head tensors such as a relative
position bias table or a per-head logit scale. `shrink_attention` updates them after
torch-pruning has removed the rows; it reads which heads went from the kept rows alone,
so replaying a saved plan needs nothing beyond the plan's kept indices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kpc.channels import ChannelGroup

log = logging.getLogger(__name__)

HEAD_COUNT_ATTRIBUTE = "num_heads"


@dataclass(frozen=True)
class HeadLayout:
    """Where each head's rows sit in a projection of `width` outputs split into `heads` heads.

    Split-major (`splits` > 1): the output is `splits` equal parts (q, k, v), each holding
    every head's rows one head after another. Head-major (`splits` == 1): each head's rows
    are contiguous.
    """

    heads: int
    width: int
    splits: int = 1

    @property
    def per_head(self) -> int:
        return self.width // self.heads

    def rows(self, head: int) -> list[int]:
        part, size = self.width // self.splits, self.per_head // self.splits
        return [s * part + head * size + j for s in range(self.splits) for j in range(size)]

    def order(self) -> tuple[int, ...]:
        """The rows, head after head: the channel order in which heads are contiguous blocks."""
        return tuple(row for head in range(self.heads) for row in self.rows(head))

    def kept_heads(self, kept: Sequence[int]) -> list[int] | None:
        """The heads whose rows `kept` holds, or None when `kept` is not made of whole heads under this layout."""
        keep = set(int(i) for i in kept)
        heads = []
        for head in range(self.heads):
            rows = self.rows(head)
            inside = sum(1 for r in rows if r in keep)
            if inside == len(rows):
                heads.append(head)
            elif inside:
                return None
        return heads if sum(len(self.rows(h)) for h in heads) == len(keep) else None

    def describe(self) -> str:
        kind = f"{self.splits} parts, head after head in each" if self.splits > 1 else "each head's rows together"
        return f"{self.heads} heads of {self.per_head} rows ({kind})"


def companion_layout(layout: HeadLayout, width: int) -> HeadLayout:
    """The layout of another projection of the same heads, `width` rows wide (PVT's q beside its kv): split
    the same way, in parts of the same per-head size as `layout`'s, where that divides its rows per head."""
    per_head = width // layout.heads
    part = layout.per_head // layout.splits
    splits = per_head // part if layout.splits > 1 and part and per_head % part == 0 else 1
    return HeadLayout(layout.heads, width, splits)


def attention_of(model: nn.Module, root: str) -> tuple[str, nn.Module] | None:
    """The module that splits `root`'s output into heads: its parent, or its grandparent when the parent only
    wraps it (LeViT's linear-and-norm), when that holds an integer head count.

    A grandparent reached through a module holding other layers is a block that keeps its attention's head
    count, not the attention: torchvision's ViT EncoderBlock (and DaViT's, Swin V2's, TinyViT's blocks)
    reached through the MLP, whose hidden layer would otherwise be cut only in whole "heads" of 1/12 of it.
    """
    parts = root.split(".")
    for up in (1, 2):
        if len(parts) < up:  # up to the model itself (an attention module checked on its own)
            break
        name = ".".join(parts[:-up])
        try:
            holder = model.get_submodule(name)
        except AttributeError:
            return None
        heads = getattr(holder, HEAD_COUNT_ATTRIBUTE, None)
        if type(heads) is int and heads >= 2:
            if up == 2 and not _only_wraps(model.get_submodule(".".join(parts[:-1])), model.get_submodule(root)):
                return None
            return name, holder
    return None


def _only_wraps(wrapper: nn.Module, layer: nn.Module) -> bool:
    """True when `layer` is the only layer with weights in `wrapper` besides norms (a linear with its norm)."""
    return not any(other is not layer and isinstance(other, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
                   for other in wrapper.modules())


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every module holding an integer head count of two or more."""
    return [m for m in model.modules()
            if type(getattr(m, HEAD_COUNT_ATTRIBUTE, None)) is int and getattr(m, HEAD_COUNT_ATTRIBUTE) >= 2]


def per_head_tensors(attention: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor, int]]:
    """(owner, name, tensor, head dimension) of every floating tensor an attention module keeps per head.

    A tensor counts when exactly one of its dimensions equals the head count and its owner is
    the module or one of its own (non-torch) submodules: a relative position bias table of
    shape (L, heads), a logit scale of shape (heads, 1, 1), a bias of shape (heads, N).
    """
    heads = int(getattr(attention, HEAD_COUNT_ATTRIBUTE))
    found = []
    for module in attention.modules():
        if module is not attention and _is_torch_layer(module):
            continue
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is None or not tensor.is_floating_point():
                continue
            dims = [d for d, size in enumerate(tensor.shape) if size == heads]
            if len(dims) == 1:
                found.append((module, name, tensor, dims[0]))
    return found


def per_head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters kept per head: torch-pruning must not couple them to channel groups (they are no channels)."""
    return [t for attention in attention_modules(model) for _m, _n, t, _d in per_head_tensors(attention)
            if isinstance(t, nn.Parameter)]


def candidate_layouts(attention: nn.Module, width: int) -> list[HeadLayout]:
    """The layouts a projection of `width` rows may have, split-major first (timm's, the common one)."""
    heads = int(getattr(attention, HEAD_COUNT_ATTRIBUTE))
    if width % heads:
        return []
    layouts = []
    head_dim = getattr(attention, "head_dim", None)
    per_head = width // heads
    if type(head_dim) is int and head_dim > 0 and per_head % head_dim == 0 and per_head // head_dim > 1:
        layouts.append(HeadLayout(heads, width, per_head // head_dim))
    layouts.append(HeadLayout(heads, width))
    return layouts


def mark_head_groups(model: nn.Module, groups: Sequence[ChannelGroup]) -> None:
    """Give every group rooted at an attention module's projection its heads as blocks (first candidate layout)."""
    for group in groups:
        if not group.prunable or group.blocks > 1 or group.tied_to is not None:  # grouped-conv ties keep theirs
            continue
        found = attention_of(model, group.root)
        if found is None:
            continue
        layouts = candidate_layouts(found[1], group.width)
        if not layouts:
            continue
        group.head_layouts = tuple(layouts)
        use_layout(group, layouts[0])


def use_layout(group: ChannelGroup, layout: HeadLayout) -> None:
    group.blocks, group.channel_order = layout.heads, layout.order()


def _is_torch_layer(module: nn.Module) -> bool:
    """torch's own layers (Linear, Conv, norms): torch-pruning prunes their state; kpc leaves it alone."""
    return type(module).__module__.startswith("torch.nn")


def head_cut(model: nn.Module, root: str, width: int, kept: Sequence[int]) -> tuple[HeadLayout, list[int]] | None:
    """(layout, kept heads) when `kept` is a cut of whole heads of an attention projection, else None."""
    found = attention_of(model, root)
    if found is None:
        return None
    for layout in candidate_layouts(found[1], width):
        heads = layout.kept_heads(kept)
        if heads is not None and len(heads) < layout.heads:
            return layout, heads
    return None


def shrink_attention(model: nn.Module, root: str, width: int, kept: Sequence[int]) -> None:
    """After a projection lost whole heads: shrink the head count and the per-head tensors of its attention module.

    Integer attributes equal to the old head count become the new one; those equal to the
    old head count times one of the module's own `*dim` attributes (timm's `attn_dim`,
    LeViT's `val_attn_dim`) shrink with it, as do such entries of integer tuples (a bias
    shape); dicts caching per-head tensors are emptied; the tensors `per_head_tensors` finds
    keep the kept heads. A cut that is not made of whole heads under any layout is not a head cut:
    nothing changes.
    """
    cut = head_cut(model, root, width, kept)
    if cut is None:
        return
    _layout, heads = cut
    attention = attention_of(model, root)[1]  # type: ignore[index]
    old = int(getattr(attention, HEAD_COUNT_ATTRIBUTE))
    tensors = per_head_tensors(attention)
    per_head_dims = {v for k, v in vars(attention).items() if k.endswith("dim") and type(v) is int and 1 < v != old}
    widths = {old: len(heads), **{old * d: len(heads) * d for d in per_head_dims}}
    for module in attention.modules():
        if module is not attention and _is_torch_layer(module):
            continue
        for attribute, value in list(vars(module).items()):
            if attribute.startswith("_") or attribute in ("head_dim", "key_dim", "val_dim", "dim_head"):
                continue
            if type(value) is int and value in widths:
                setattr(module, attribute, widths[value])
            elif isinstance(value, tuple) and value and all(type(v) is int for v in value) and old in value:
                setattr(module, attribute, tuple(widths.get(v, v) for v in value))  # a bias shape (N, N, heads)
        for attribute, value in list(vars(module).items()):
            if not attribute.startswith("_") and isinstance(value, dict) and value and all(
                    isinstance(v, torch.Tensor) and old in v.shape for v in value.values()):
                value.clear()  # a cache of per-head tensors (LeViT's attention biases by device): rebuilt on use
    index = torch.tensor(heads, dtype=torch.long)
    for module, name, tensor, dim in tensors:
        sliced = tensor.detach().index_select(dim, index.to(tensor.device)).clone()
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
        else:
            module.register_buffer(name, sliced, persistent=name not in module._non_persistent_buffers_set)


def zero_head(model: nn.Module, root: str, layout: HeadLayout, head: int = 0) -> None:
    """Zero one head's rows of a projection (weights and bias): the head then contributes nothing."""
    layer = model.get_submodule(root)
    rows = torch.tensor(layout.rows(head), dtype=torch.long)
    with torch.no_grad():
        for name in ("weight", "bias"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                tensor.index_fill_(0, rows.to(tensor.device), 0.0)


__all__ = ["HeadLayout", "attention_modules", "attention_of", "candidate_layouts", "companion_layout", "head_cut",
           "mark_head_groups", "per_head_parameters", "per_head_tensors", "shrink_attention", "use_layout",
           "zero_head"]
