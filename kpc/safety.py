"""Finding groups that break a network when pruned, before and after the solve.

Pruning copies is cheap next to handing over a broken model: every candidate group is
pruned on a copy (by about half) and the copy is run; a failure is bisected to the
groups that cause it, which are then left whole with the error as the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from kpc.apply import prune_group
from kpc.channels import ChannelGroup
from kpc.errors import KpcError
from kpc.groups import build_graph
from kpc.modelcopy import copy_model


def first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit] if text else ''}"


def check_forward(model: nn.Module, example: torch.Tensor, expected_shape: torch.Size) -> str | None:
    """None when the model runs and keeps its output shape; else what went wrong."""
    try:
        with torch.no_grad():
            output = model(example)
    except Exception as exc:  # any failure here means the pruned structure is inconsistent
        return first_line(exc)
    if not isinstance(output, torch.Tensor):
        return f"output is {type(output).__name__}, not a tensor"
    if output.shape != expected_shape:
        return f"output shape {tuple(output.shape)} != {tuple(expected_shape)}"
    if not torch.isfinite(output).all():
        return "output has non-finite values"
    return None


def probe_kept(round_to: int, min_channels: int) -> Callable[[ChannelGroup], list[int]]:
    """Keep about half of a group's channels (its first ones) to exercise the index mapping."""

    def kept(group: ChannelGroup) -> list[int]:
        if group.blocks > 1:  # a tie keeps the same whole blocks in every member
            return list(range(max(1, group.blocks // 2) * group.block_width))
        half = max(min_channels, round_to * max(1, (group.width // 2) // max(1, round_to)))
        return list(range(min(half, group.width - 1)))

    return kept


def find_unsafe_groups(model: nn.Module, example: torch.Tensor, candidates: Sequence[ChannelGroup],
                       kept_of: Callable[[ChannelGroup], Sequence[int]]) -> dict[int, str]:
    """Prune copies with the candidates reduced and bisect to the groups that break the network.

    Cheap when everything works (one copy, one forward); a failure costs a few copies
    per bad group. A group that breaks on its own is reported with the error it caused.
    Tied groups are tried together and reported by their first member (see `leave_whole`).
    """
    with torch.no_grad():
        expected = model(example).shape

    def trial(subset: list[list[ChannelGroup]]) -> str | None:
        trial_model = copy_model(model)
        try:
            graph = build_graph(trial_model, example)
            for group in (g for unit in subset for g in unit):
                prune_group(graph, trial_model.get_submodule(group.root), group.width, kept_of(group))
        except KpcError:
            raise
        except Exception as exc:
            return f"pruning failed: {first_line(exc)}"
        return check_forward(trial_model, example, expected)

    bad: dict[int, str] = {}
    units: dict[int, list[ChannelGroup]] = {}  # tied groups are pruned together or not at all
    for group in candidates:
        units.setdefault(group.leader, []).append(group)

    def search(subset: list[list[ChannelGroup]]) -> None:
        if not subset:
            return
        error = trial(subset)
        if error is None:
            return
        if len(subset) == 1:
            bad[subset[0][0].index] = error
            return
        middle = len(subset) // 2
        search(subset[:middle])
        search(subset[middle:])
        if not any(unit[0].index in bad for unit in subset):
            # each half works alone but not together: leave the whole subset's last unit out and retry
            bad[subset[-1][0].index] = f"fails only in combination: {error}"
            search(subset[:-1])

    search(list(units.values()))
    return bad
