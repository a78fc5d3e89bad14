"""Apply a plan to a model: remove every channel a group does not keep, physically.

Used by the prune (on a copy, to check and count the candidate), by `kpc.load` (replaying
every recorded round onto a freshly built architecture) and by the safety probes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from kpc import tp_compat
from kpc.channel_state import (
    ChannelwiseBufferPruner,
    bare_parameter_owners,
    output_extras_of,
    prune_output_extras,
    update_owner_shapes,
)
from kpc.errors import KpcError
from kpc.group_norms import norm_cuts, regroup
from kpc.groups import build_graph, is_grouped_conv_input
from kpc.heads import HeadLayout, companion_layout, head_cut, shrink_attention
from kpc.parametrizations import bake


def prune_group(graph: tp.DependencyGraph, model: nn.Module, root: str, width: int, kept: Sequence[int], *,
                heads: bool = False) -> None:
    """Physically remove every channel of one group except `kept` (indices into the root's outputs).

    With `heads`, the group is an attention projection cut by whole heads (`kpc.heads`).
    """
    keep = {int(i) for i in kept}
    removed = [i for i in range(width) if i not in keep]
    if not removed:
        return
    module = model.get_submodule(root)
    pruner = graph.get_pruner_of_module(module)
    group = graph.get_pruning_group(module, pruner.prune_out_channels, removed)
    if heads:
        cut_heads(graph, model, root, width, sorted(keep), [(item.dep.target.module, item.dep.handler)
                                                             for item in group])
        return
    grouped_inputs = [item for item in group if is_grouped_conv_input(item)]
    if grouped_inputs:  # torch-pruning must not touch those: kpc removes their conv groups itself
        group = tp_compat.group_with_items(group, [item for item in group if item not in grouped_inputs])
    norms = norm_cuts((item.dep.target.module, item.idxs) for item in group)
    extras = output_extras_of(group, graph.is_out_channel_pruning_fn)
    owners = bare_parameter_owners(model, group)
    group.prune()
    prune_output_extras(extras)
    update_owner_shapes(owners)
    regroup(norms)
    for item in grouped_inputs:
        _remove_conv_groups(item.dep.target.module, item.idxs)


class NotTraced(ValueError):
    """A traced group names a module or parameter the model to prune does not have by that name."""


def prune_by_trace(model: nn.Module, source: nn.Module, cuts: Sequence[tuple[object, Collection[int]]]) -> None:
    """Prune `model`, a copy of `source`, by groups traced on `source`, without tracing `model` again.

    Each cut is (torch-pruning group traced on `source` with every root channel, root channels to
    remove). A group item keeps, for each of its indices, the root channel it came from
    (`root_idxs`), so the indices a cut removes from each layer are a selection, not a new trace:
    torch-pruning's `get_pruning_group` re-maps indices through every reshape of the graph, which
    took 70% of a transformer's prune (mobilevitv2: 124 of 190 s, in the safety trials alone).
    All cuts are read in `source`'s coordinates and each layer is pruned once with the union of
    its removed indices, so cuts through one concat do not shift each other. Plain channel groups
    only: head cuts go through `cut_heads`. Raises NotTraced, before pruning anything, when a layer is
    missing by name.
    """
    module_names = {id(m): n for n, m in source.named_modules()}
    param_names = {id(p): n for n, p in source.named_parameters()}
    # (is a parameter, name, handler, axis) -> (the traced target, indices to remove)
    merged: dict[tuple[bool, str, Any, int | None], tuple[object, set[int]]] = {}
    grouped_inputs: dict[str, set[int]] = {}
    graph = None
    for tp_group, removed in cuts:
        graph = graph or tp_compat.graph_of(tp_group)
        try:
            found = list(tp_compat.removals(tp_group, removed))
        except ValueError as exc:
            raise NotTraced(str(exc)) from exc
        for item, target, dim, indices in found:
            is_parameter = isinstance(target, nn.Parameter)
            name = (param_names if is_parameter else module_names).get(id(target))
            if name is None:
                raise NotTraced(f"{type(target).__name__} of a traced group is not part of the model it was traced on")
            if is_grouped_conv_input(item):
                grouped_inputs.setdefault(name, set()).update(indices)
            else:
                merged.setdefault((is_parameter, name, item.dep.handler, dim), (target, set()))[1].update(indices)
    if graph is None:
        return
    parameters = dict(model.named_parameters())
    cuts_in_copy, lent = [], []
    for (is_parameter, name, handler, dim), (traced, indices) in merged.items():
        target = parameters.get(name) if is_parameter else _submodule(model, name)
        if target is None:
            raise NotTraced(f"the copy has no parameter {name}")
        pruner = getattr(handler, "__self__", None)
        if isinstance(pruner, ChannelwiseBufferPruner) and target not in pruner.buffers:
            pruner.buffers[target] = pruner.buffers[traced]  # its buffers are known by module: lend the copy's
            lent.append((pruner, target))
        cuts_in_copy.append((name if is_parameter else None, target, handler, dim, sorted(indices)))
    grouped_convs = [(_submodule(model, name), sorted(indices)) for name, indices in grouped_inputs.items()]
    # kpc's helpers read torch-pruning group items: item.dep.target.module, item.dep.handler, item.idxs
    items = [SimpleNamespace(dep=SimpleNamespace(target=SimpleNamespace(module=target), handler=handler), idxs=idxs)
             for _name, target, handler, _dim, idxs in cuts_in_copy]
    try:  # a cut that splits a GroupNorm's normalization group raises here, before any layer is cut
        norms = norm_cuts((target, idxs) for _name, target, _handler, _dim, idxs in cuts_in_copy)
        extras = output_extras_of(items, graph.is_out_channel_pruning_fn)
        owners = bare_parameter_owners(model, items)
        for parameter_name, target, handler, dim, idxs in cuts_in_copy:
            cut = tp_compat.call_handler(handler, target, idxs, dim)
            if parameter_name is not None:  # the handler returns a new, smaller parameter
                owner, _, attribute = parameter_name.rpartition(".")
                setattr(model.get_submodule(owner) if owner else model, attribute, cut)
    finally:
        for pruner, target in lent:  # a trial's copy must not stay reachable from the source's graph
            pruner.buffers.pop(target, None)
    prune_output_extras(extras)
    update_owner_shapes(owners)
    regroup(norms)
    for conv, indices in grouped_convs:
        _remove_conv_groups(conv, indices)


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError as exc:
        raise NotTraced(f"the copy has no module {name}") from exc


def cut_heads(graph: tp.DependencyGraph, model: nn.Module, root: str, width: int, kept: Sequence[int],
              members: Sequence[tuple[object, Callable[..., object]]]) -> None:
    """Remove the heads of projection `root` whose rows `kept` does not hold, from every member of its group.

    Members are (module or parameter, torch-pruning handler) pairs of the root's group: the items of a
    group traced on `model`, or those of a group traced on the model `model` was copied from, mapped
    to the copy by name (a safety trial needs no graph of its own then). `graph` only answers channel
    counts, which depend on a module's type and shape, not on which graph traced it.
    """
    keep = sorted(int(i) for i in kept)
    cut = head_cut(model, root, width, keep)
    if cut is None:  # not a KpcError: a safety trial that prunes two projections of one attention lands here
        raise ValueError(f"the cut of {root} by heads keeps {len(keep)} of its {width} rows, which are not "
                         "whole heads of its attention module")
    kept_rows = set(keep)  # built once: a ViT-H projection has 3,840 rows, rebuilt per row it took 14 s
    removed = [i for i in range(width) if i not in kept_rows]
    _remove_heads(graph, members, model.get_submodule(root), width, removed, cut[0], cut[1])
    shrink_attention(model, root, width, keep)


def _remove_heads(graph: tp.DependencyGraph, members: Sequence[tuple[object, Callable[..., object]]], root: nn.Module,
                  width: int, removed: Sequence[int], layout: HeadLayout, kept_heads: Sequence[int]) -> None:
    """Remove whole heads: the projection's rows (and its companions' on the same rows, a norm after it), and
    each reader's input columns head block by head block.

    torch-pruning's index mapping through the reshape and split into heads assumes the q/k/v split
    is the outermost dimension; for a head-major layout it removes the wrong rows. The group's
    members are torch-pruning's; the indices are the heads'. Readers of the attention output see
    it head after head (the (heads, per-head) reshape every attention module ends with).
    """
    heads = layout.heads
    kept_set = set(kept_heads)
    gone = [h for h in range(heads) if h not in kept_set]
    for module, handler in members:
        if not isinstance(module, nn.Module):
            raise ValueError(f"a head cut of {type(root).__name__} reaches a bare parameter coupled to its channels")
        if not any(True for _ in module.parameters(recurse=False)):
            continue  # torch-pruning's own nodes for functional ops: nothing to remove
        if graph.is_out_channel_pruning_fn(handler):
            outputs = _channels(graph, module, outputs=True)
            if module is root or outputs == width:
                handler(module, list(removed))
            elif outputs == heads:  # a producer of one value per head (a relative position MLP's last layer)
                handler(module, gone)
            elif outputs % heads == 0:  # another projection of the same heads (PVT's q beside its kv)
                member = companion_layout(layout, outputs)
                handler(module, sorted(r for h in gone for r in member.rows(h)))
            else:
                raise ValueError(f"a head cut reaches {type(module).__name__} of {outputs} channels, not a "
                                 f"multiple of its {heads} heads")
        else:
            inputs = _channels(graph, module, outputs=False)
            if inputs % heads:
                raise ValueError(f"a head cut reaches {type(module).__name__} whose {inputs} inputs are not {heads} "
                                 "equal heads")
            per_head = inputs // heads
            handler(module, [h * per_head + j for h in gone for j in range(per_head)])


def _channels(graph: tp.DependencyGraph, module: nn.Module, *, outputs: bool) -> int:
    """A module's output or input channels, also for a module of a copy the graph did not trace."""
    if module in graph.module2node:
        count = graph.get_out_channels(module) if outputs else graph.get_in_channels(module)
    else:
        pruner = graph.get_pruner_of_module(module)
        count = None if pruner is None else (pruner.get_out_channels(module) if outputs
                                             else pruner.get_in_channels(module))
    return int(count or 0)


def _remove_conv_groups(conv: nn.Conv2d, removed_inputs: Sequence[int]) -> None:
    """Remove whole conv groups from a grouped conv's input side.

    torch-pruning slices a grouped conv's per-group input weights and leaves `groups`
    as it was, which breaks the conv. kpc removes a grouped conv's channels only as
    whole conv groups, the same ones on its input side (the group feeding it) and on
    its output side (its weight rows, pruned as usual with the group it roots). On the
    input side each kept conv group keeps all its inputs: the weight stays as it is,
    `in_channels` and `groups` shrink.
    """
    per_group = conv.in_channels // conv.groups
    removed = {int(i) for i in removed_inputs}
    blocks = {i // per_group for i in removed}
    if len(removed) != len(blocks) * per_group:
        # not a KpcError: a safety trial's cut lands here and leaves the group whole, a prune goes on without it
        raise ValueError(f"the cut removes part of a conv group of a grouped conv ({len(removed)} input channels "
                         f"over {len(blocks)} groups of {per_group})")
    conv.in_channels -= len(removed)
    conv.groups -= len(blocks)


def apply_kept(model: nn.Module, example: torch.Tensor, kept: dict[str, tuple[int, Sequence[int]]], *,
               graph: tp.DependencyGraph | None = None, heads: Collection[str] = ()) -> nn.Module:
    """Prune `model` in place: `kept` maps a group's root name to (full width, kept indices); the roots in
    `heads` are attention projections cut by whole heads."""
    graph = graph if graph is not None else build_graph(model, example)
    for root, (width, indices) in kept.items():
        try:
            module = model.get_submodule(root)
        except AttributeError as exc:
            raise KpcError(f"the plan names a layer {root!r} that this model does not have: the plan belongs "
                           "to another model") from exc
        pruner = graph.get_pruner_of_module(module)
        actual = pruner.get_out_channels(module) if pruner is not None else None
        if actual is None or int(actual) != int(width):
            raise KpcError(f"the plan prunes {root} from {width} channels but this model's {root} has "
                           f"{actual}: the plan belongs to another model")
        prune_group(graph, model, root, width, indices, heads=root in heads)
    return model


def example_input(input_size: Sequence[int], batch: int = 1, seed: int = 0) -> torch.Tensor:
    """The fixed random input graph tracing and checks use (seeded, so every replay traces alike)."""
    return torch.randn((batch, *input_size), generator=torch.Generator().manual_seed(seed))


def replay(model: nn.Module, rounds: Sequence, input_size: Sequence[int]) -> nn.Module:
    """Re-apply recorded pruning rounds (`kpc.plan.PruneRound`) to a freshly built architecture."""
    example = example_input(input_size)
    if any(r.baked_weights for r in rounds):
        bake(model)  # as the prune did before its cut (`kpc.parametrizations`); older plans baked nothing
    modules = {name for name, _ in model.named_modules()}
    for number, plan_round in enumerate(rounds, 1):
        missing = [g.root for g in plan_round.groups if g.root not in modules]
        if missing:  # a group left whole is not replayed, but inspect and reports read its layer
            raise KpcError(f"replaying pruning round {number}: the plan names a layer {missing[0]!r} that this model "
                           "does not have: the plan belongs to another model")
        try:
            apply_kept(model, example, plan_round.kept_by_root(), heads=plan_round.head_roots())
        except KpcError as exc:
            raise KpcError(f"replaying pruning round {number}: {exc}") from exc
        except Exception as exc:  # torch-pruning or the model fails on a foreign plan: one line, not a traceback
            raise KpcError(f"replaying pruning round {number} failed ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}): the plan belongs to another model") \
                from exc
    return model
