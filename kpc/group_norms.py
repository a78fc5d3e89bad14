"""GroupNorm: its channels are cut in whole normalization groups.

A GroupNorm of G groups normalizes each run of C/G channels together. torch-pruning slices
its affine weights and keeps `num_groups`, so a cut that leaves a width not divisible by G
fails the forward pass ("Expected number of channels in input to be divisible by
num_groups") and kpc left the group whole: a network normalized by GroupNorm(32, C), as
ResNet-GN, BiT and many detection backbones are, could not be pruned at all. Removing
whole normalization groups keeps the statistics of every channel that stays exactly as
they were (each remaining group normalizes the same channels), where removing channels
from inside every group would change them all. So a channel group that a GroupNorm
normalizes is cut by blocks of C/G channels, as the groups of a grouped conv are
(`kpc.groups`), and `num_groups` shrinks with the cut (`check_cut`, `regroup`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn


def normalization_blocks(norm: nn.GroupNorm, indices: Sequence[int], root_indices: Sequence[int] | None,
                         width: int) -> tuple[int | None, str | None]:
    """How many whole normalization groups of `norm` a channel group of `width` spans, or why it cannot be cut
    by them.

    `indices` are the norm's channels the group reaches, `root_indices` the group's own
    channel each came from (None: the same). The group can be cut in whole normalization
    groups when every one of its channels reaches the norm, as a contiguous run of the
    norm's channels in the group's order, starting and ending on a normalization-group
    boundary. None blocks: no constraint (one normalization group, or one channel per group).
    """
    groups, channels = int(norm.num_groups), int(norm.num_channels)
    if groups <= 1 or groups >= channels:
        return None, None
    per_group = channels // groups
    indices = [int(i) for i in indices]
    roots = [int(i) for i in root_indices] if root_indices else list(range(len(indices)))
    offset = indices[0] - roots[0] if indices else 0
    contiguous = len(roots) == width and sorted(roots) == list(range(width)) and \
        all(i - r == offset for i, r in zip(indices, roots, strict=True))
    if not contiguous or offset % per_group or len(indices) % per_group:
        return None, (f"GroupNorm with {groups} groups of {per_group} channels: the group's channels do not fall "
                      "on whole normalization groups")
    return len(indices) // per_group, None


def check_cut(norm: nn.GroupNorm, removed: Iterable[int]) -> int:
    """The normalization groups a cut of `removed` channels takes out; ValueError when it splits one."""
    removed = {int(i) for i in removed}
    if norm.num_groups <= 1:
        return 0
    per_group = int(norm.num_channels) // int(norm.num_groups)
    whole = {i // per_group for i in removed}
    if len(removed) != len(whole) * per_group:
        # not a KpcError: a safety trial's cut lands here and leaves the group whole, a prune goes on without it
        raise ValueError(f"the cut removes part of a normalization group of a GroupNorm ({len(removed)} channels "
                         f"over {len(whole)} groups of {per_group})")
    return len(whole)


def norm_cuts(cuts: Iterable[tuple[object, Iterable[int]]]) -> list[tuple[nn.GroupNorm, int]]:
    """(GroupNorm, normalization groups removed) for every GroupNorm among (layer, removed channels) cuts.

    Checked before anything is cut: a cut that splits a normalization group raises
    ValueError and leaves the model as it was. A norm named twice (its input and output
    side) counts the union of its channels once.
    """
    by_norm: dict[int, tuple[nn.GroupNorm, set[int]]] = {}
    for layer, removed in cuts:
        if isinstance(layer, nn.GroupNorm):
            by_norm.setdefault(id(layer), (layer, set()))[1].update(int(i) for i in removed)
    return [(norm, check_cut(norm, removed)) for norm, removed in by_norm.values()]


def regroup(cuts: Sequence[tuple[nn.GroupNorm, int]]) -> None:
    """Lower each norm's `num_groups` by the whole groups its (already applied) cut removed."""
    for norm, removed_groups in cuts:
        norm.num_groups -= removed_groups


__all__ = ["check_cut", "norm_cuts", "normalization_blocks", "regroup"]
