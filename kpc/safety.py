"""Finding groups that break a network when pruned, before and after the solve.

Pruning copies is cheap next to handing over a broken model: every candidate group is
pruned on a copy (by about half) and the copy is run; a failure is bisected to the
groups that cause it, which are then left whole with the error as the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from kpc.apply import NotTraced, cut_heads, prune_by_trace, prune_group
from kpc.channels import ChannelGroup
from kpc.errors import KpcError
from kpc.groups import build_graph, is_grouped_conv_input
from kpc.heads import HeadLayout, attention_of, use_layout, zero_head
from kpc.modelcopy import copy_model

log = logging.getLogger(__name__)


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


def same_output(output: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None when two outputs agree to float32 round-off; else by how much they differ."""
    scale = float(expected.abs().max()) or 1.0
    difference = float((output - expected).abs().max())
    return None if difference <= 1e-4 * scale else f"output differs by {difference:.3g} (scale {scale:.3g})"


def probe_kept(round_to: int, min_channels: int) -> Callable[[ChannelGroup], list[int]]:
    """Keep about half of a group's channels, spread over all of them, to exercise the index mapping.

    Spread, not the first half: a group that spans a concat (a dense block's parts tied by a
    residual add) would otherwise lose every channel of its last part, a conv of zero
    outputs that no real plan of importance-ranked channels is likely to ask for.
    """

    def kept(group: ChannelGroup) -> list[int]:
        if group.blocks > 1:  # a tie keeps the same whole blocks in every member, heads keep whole heads
            return group.in_channel_order(range(max(1, group.blocks // 2) * group.block_width))
        half = min(max(min_channels, round_to * max(1, (group.width // 2) // max(1, round_to))), group.width - 1)
        if any(is_grouped_conv_input(item) for item in group.tp_group or ()):
            return list(range(half))  # whole conv groups of the grouped convs it feeds, where half allows
        return [i * group.width // half for i in range(half)]

    return kept


def find_unsafe_groups(model: nn.Module, example: torch.Tensor, candidates: Sequence[ChannelGroup],
                       kept_of: Callable[[ChannelGroup], Sequence[int]],
                       reference: Callable[[list[ChannelGroup]], torch.Tensor] | None = None,
                       prune_copy: Callable[[nn.Module, list[ChannelGroup]], None] | None = None) -> dict[int, str]:
    """Prune copies with the candidates reduced and bisect to the groups that break the network.

    Cheap when everything works (one copy, one forward); a failure costs a few copies
    per bad group. A group that breaks on its own is reported with the error it caused.
    Tied groups are tried together and reported by their first member (see `leave_whole`).
    With `reference`, the pruned copy must also compute what `reference(groups)` returns
    (an exactness check: removing channels that contribute nothing). With `prune_copy`, that
    prunes each trial's copy instead of a dependency graph traced on it.
    """
    with torch.no_grad():
        expected = model(example).shape

    def trial(subset: list[list[ChannelGroup]]) -> str | None:
        trial_model = copy_model(model)
        members = [g for unit in subset for g in unit]
        try:
            if prune_copy is not None:
                prune_copy(trial_model, members)
            elif not _pruned_by_trace(trial_model, model, members, kept_of):
                graph = build_graph(trial_model, example)
                for group in members:
                    prune_group(graph, trial_model, group.root, group.width, kept_of(group),
                                heads=group.heads is not None)
        except KpcError:
            raise
        except Exception as exc:
            return f"pruning failed: {first_line(exc)}"
        error = check_forward(trial_model, example, expected)
        if error is not None or reference is None:
            return error
        with torch.no_grad():
            return same_output(trial_model(example), reference(members))

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


def _pruned_by_trace(copy: nn.Module, model: nn.Module, members: Sequence[ChannelGroup],
                     kept_of: Callable[[ChannelGroup], Sequence[int]]) -> bool:
    """Prune a trial's copy by the groups as traced on `model` (`kpc.apply.prune_by_trace`); False where it cannot
    (a head group, a group traced on another model): the caller traces the copy instead."""
    if any(g.heads is not None or g.tp_group is None for g in members):
        return False
    cuts = []
    for group in members:
        keep = {int(i) for i in kept_of(group)}
        cuts.append((group.tp_group, [i for i in range(group.width) if i not in keep]))
    try:
        prune_by_trace(copy, model, cuts)
    except NotTraced as exc:
        log.debug("a safety trial traces its copy again: %s", exc)
        return False
    return True


def confirm_head_layouts(model: nn.Module, example: torch.Tensor, graph: Any, groups: Sequence[ChannelGroup]
                         ) -> None:
    """Settle each head group's layout (`kpc.heads`), or make it a group of plain channels again.

    A layout passes when removing head 0 from a pruned copy computes what the original
    computes with head 0's rows zeroed. Candidates are tried in order, all head groups at
    once, and bisected only where one fails. A group no layout passes goes back to being a
    group of plain channels, for the usual safety probe to judge (a module that derives its
    head width from its input, such as DaViT's, breaks on any cut and is left whole there).
    """
    pending = [g for g in groups if g.prunable and g.head_layouts]
    if not pending:
        return
    names = {module: name for name, module in model.named_modules()}
    calls = _single_calls(model, example, {found[1] for g in pending if (found := attention_of(model, g.root))})
    attempt, last_error = 0, {}
    while pending:
        trying = [g for g in pending if attempt < len(g.head_layouts)]
        for group in pending:
            if attempt >= len(group.head_layouts):
                group.blocks, group.channel_order = 1, None
                log.info("%s: removing a whole head does not compute what zeroing it does under any layout kpc "
                         "knows (%s); its channels are judged as plain channels", group.root,
                         last_error.get(group.index))
        if not trying:
            break
        layout_of: dict[int, HeadLayout] = {}
        for group in trying:
            layout_of[group.index] = group.head_layouts[attempt]  # type: ignore[assignment]
            use_layout(group, layout_of[group.index])

        def without_head(group: ChannelGroup, layout_of: dict[int, HeadLayout] = layout_of) -> list[int]:
            removed = set(layout_of[group.index].rows(0))
            return [i for i in range(group.width) if i not in removed]

        def reference(members: list[ChannelGroup], layout_of: dict[int, HeadLayout] = layout_of) -> torch.Tensor:
            zeroed = copy_model(model)
            for member in members:
                zero_head(zeroed, member.root, layout_of[member.index])
            with torch.no_grad():
                return zeroed(example)

        def cut_copy(copy: nn.Module, members: list[ChannelGroup], without_head=without_head) -> None:
            for member in members:  # the original's group, mapped to the copy by name: no graph per trial
                cut_heads(graph, copy, member.root, member.width, without_head(member),
                          [(_in_copy(copy, names, item.dep.target.module), item.dep.handler)
                           for item in member.tp_group])

        bad: dict[int, str] = {}
        for group in trying:  # most failures show in the attention module alone, without a copy of the model
            error = _local_head_trial(model, graph, group, layout_of[group.index], without_head(group), names, calls)
            if error is not None:
                bad[group.index] = error
        survivors = [g for g in trying if g.index not in bad]
        bad.update(find_unsafe_groups(model, example, survivors, without_head, reference, cut_copy))
        last_error.update(bad)
        pending = [g for g in trying if g.index in bad]
        attempt += 1


def _in_copy(copy: nn.Module, names: dict[nn.Module, str], member: Any) -> Any:
    """A group member of the original model as the copy's module (torch-pruning's own op nodes and bare
    parameters stay as they are: a head cut skips the former and refuses the latter)."""
    name = names.get(member) if isinstance(member, nn.Module) else None
    return copy.get_submodule(name) if name is not None else member


def _single_calls(model: nn.Module, example: torch.Tensor, modules: set[nn.Module]
                  ) -> dict[nn.Module, tuple[tuple[Any, ...], dict[str, Any]]]:
    """The arguments of each listed module's call in one forward pass, for those called exactly once."""
    seen: dict[nn.Module, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.setdefault(module, []).append((args, dict(kwargs)))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            model(example)
    except Exception:  # the joint trial on the whole model judges these groups instead
        return {}
    finally:
        for handle in handles:
            handle.remove()
    return {m: calls[0] for m, calls in seen.items() if len(calls) == 1}


def _local_head_trial(model: nn.Module, graph: Any, group: ChannelGroup, layout: HeadLayout, kept: list[int],
                      names: dict[nn.Module, str], calls: dict[nn.Module, tuple[tuple[Any, ...], dict[str, Any]]]
                      ) -> str | None:
    """Remove head 0 from a copy of the attention module alone and compare with zeroing it; None when it passes
    or cannot be told this way (a member outside the module, a module called more than once)."""
    found = _attention_holding(model, group, names, calls)
    if found is None:
        return None
    prefix, attention = found
    relative = group.root[len(prefix) + 1:] if prefix else group.root
    args, kwargs = calls[attention]
    try:
        zeroed, cut = copy_model(attention), copy_model(attention)
        zero_head(zeroed, relative, layout)
        with torch.no_grad():
            expected = zeroed(*args, **kwargs)
        members = [(_in_copy(cut, {m: n[len(prefix) + 1:] if prefix else n for m, n in names.items()},
                             item.dep.target.module), item.dep.handler) for item in group.tp_group]
        cut_heads(graph, cut, relative, group.width, kept, members)
        with torch.no_grad():
            output = cut(*args, **kwargs)
    except KpcError:
        raise
    except Exception as exc:
        return f"pruning failed: {first_line(exc)}"
    if not isinstance(output, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return None
    if output.shape != expected.shape:
        return f"output shape {tuple(output.shape)} != {tuple(expected.shape)}"
    return same_output(output, expected)


def _attention_holding(model: nn.Module, group: ChannelGroup, names: dict[nn.Module, str],
                       calls: dict[nn.Module, tuple[tuple[Any, ...], dict[str, Any]]]) -> tuple[str, nn.Module] | None:
    """(name, module) of the group's attention module, when its call was recorded and it holds every
    parameterised member of the group."""
    found = attention_of(model, group.root)
    if found is None or found[1] not in calls:
        return None
    prefix = found[0]
    inside = all(isinstance(m := item.dep.target.module, nn.Module)
                 and (not any(True for _ in m.parameters(recurse=False)) or names.get(m, "").startswith(prefix + "."))
                 for item in group.tp_group)
    return found if inside else None
