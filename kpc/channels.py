"""A coupled channel group as data: what the planner needs to know of it, and nothing of torch.

Found by `kpc.groups` (torch-pruning's dependency graph); solved over by `kpc.planner`,
which stays importable without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class ChannelGroup:
    """One coupled set of channels, identified by the module that produces them."""

    index: int
    root: str  # name of the module whose output channels define the group
    width: int  # channels at full width
    layers: list[str]  # parameterised members, "name" for output side, "name<" for input side
    prunable: bool = True
    reason: str | None = None  # why the group is kept whole
    tp_group: object = field(default=None, repr=False)  # torch-pruning Group, valid for the analysed model
    blocks: int = 1  # equal channel blocks kept or removed whole (the conv groups of a grouped conv it feeds)
    blocks_of: str = "conv groups"  # what a block is: a grouped conv's conv groups, or a GroupNorm's groups
    tied_to: int | None = None  # the group whose choice of blocks this one follows (grouped convs tie groups)
    # channel indices in the order that makes each block contiguous (attention heads, see kpc.heads); None: as is
    channel_order: tuple[int, ...] | None = field(default=None, repr=False)
    head_layouts: tuple[object, ...] = field(default=(), repr=False)  # kpc.heads.HeadLayout candidates, best first

    @property
    def heads(self) -> int | None:
        """Attention heads the group is cut by (its blocks), None for a group of plain channels."""
        return self.blocks if self.channel_order is not None else None

    def in_channel_order(self, positions: Sequence[int]) -> list[int]:
        """Channel indices of block-ordered positions (the identity unless the group has a channel order)."""
        if self.channel_order is None:
            return sorted(int(p) for p in positions)
        return sorted(self.channel_order[int(p)] for p in positions)

    @property
    def block_width(self) -> int:
        return self.width // self.blocks

    @property
    def leader(self) -> int:
        return self.index if self.tied_to is None else self.tied_to


def tie_of(groups: Sequence[ChannelGroup], group: ChannelGroup) -> list[ChannelGroup]:
    """The group and every group tied to it, leader first (just the group when it is not tied)."""
    return [g for g in groups if g.leader == group.leader]


def leave_whole(groups: Sequence[ChannelGroup], index: int, reason: str) -> list[ChannelGroup]:
    """Mark a group whole, with every group tied to it; returns the groups marked."""
    marked = [g for g in tie_of(groups, groups[index]) if g.prunable]
    for group in marked:
        group.prunable = False
        group.reason = reason if group.index == index else f"tied to {groups[index].root}, which is whole: {reason}"
    return marked
