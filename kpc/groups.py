"""Coupled channel groups, found with torch-pruning's dependency graph.

A group is the unit kpc prunes: a root layer's output channels plus every layer and
parameter tied to them (a residual stream, a depthwise conv and its SE gate, the
inputs of the consumers). Groups that cannot be pruned safely are kept, marked whole
with a reason, so the rest of the network can still be pruned.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import math
import signal
import time
from collections.abc import Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn

from kpc import tp_compat
from kpc.axes import CutAxes, channel_axis_convs, lengthwise_linears, nchw_bare_parameters
from kpc.channel_state import channelwise_pruners, normalized_shape_pruners
from kpc.channels import ChannelGroup, leave_whole, tie_of
from kpc.errors import KpcError
from kpc.group_norms import normalization_blocks
from kpc.heads import per_head_parameters
from kpc.tracing import forward_with_hooks

GRAPH_TIME_LIMIT_S = 60


@contextlib.contextmanager
def time_limit(seconds: int, what: str) -> Iterator[None]:
    """Bound pure-Python work (graph tracing) that can run for minutes on exotic nets."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _expire(signum, frame):
        raise TimeoutError(f"{what} took longer than {seconds} s")

    try:
        previous = signal.signal(signal.SIGALRM, _expire)
    except ValueError:  # not the main thread: no alarm available, run unbounded
        yield
        return
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower()


def is_grouped_conv_input(item) -> bool:
    """A torch-pruning group item that prunes a grouped conv's input channels: kpc handles those itself
    (`_remove_conv_groups`), and their weights are the conv's output rows, scored on the output side."""
    return is_grouped_conv(item.dep.target.module) and item.dep.handler == tp.prune_conv_in_channels


def is_input_side(item) -> bool:
    """A torch-pruning group item that removes input channels of a layer reading the group (not its producers).

    BatchNorm's handler prunes both sides at once and counts as a producer.
    """
    return getattr(item.dep.handler, "__name__", None) == "prune_in_channels"


def is_grouped_conv(module: nn.Module) -> bool:
    """A grouped but not depthwise conv: slicing its channels independently breaks the groups."""
    return (isinstance(module, nn.Conv2d) and module.groups > 1
            and not module.groups == module.in_channels == module.out_channels)


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    return {module: name for name, module in model.named_modules()}


def find_classifier(model: nn.Module, example: torch.Tensor) -> set[str]:
    """Modules whose output is the network output: their output width is never pruned."""
    names = _module_names(model)
    order: list[tuple[str, torch.Tensor]] = []

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and isinstance(module, (nn.Conv2d, nn.Linear)):
            order.append((names[module], output))

    output = forward_with_hooks(model, example, [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))],
                                hook)
    found = {name for name, tensor in order if tensor is output or (tensor.shape == output.shape and
             tensor.data_ptr() == output.data_ptr())}
    if not found and order:
        found = {order[-1][0]}
    if hasattr(model, "get_classifier"):
        with contextlib.suppress(Exception):
            classifier = model.get_classifier()
            if isinstance(classifier, nn.Module) and classifier in names:
                found.add(names[classifier])
    return found


def build_graph(model: nn.Module, example: torch.Tensor, *, time_limit_s: int = GRAPH_TIME_LIMIT_S
                ) -> tp.DependencyGraph:
    """Trace the dependency graph; if tracing runs over the limit, retry with attention blocks left out.

    Tracing follows autograd, so it runs with gradients on even when the caller is under no_grad,
    and with every parameter requiring a gradient even when the model is frozen (a parent
    under distillation); the parameters' flags are restored afterwards.
    """
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for parameter in frozen:
            parameter.requires_grad_(True)
        with torch.enable_grad():
            return _build_graph(model, example, time_limit_s)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)


def _build_graph(model: nn.Module, example: torch.Tensor, time_limit_s: int) -> tp.DependencyGraph:
    tp_compat.install()
    pruners = {**normalized_shape_pruners(model, example), **channelwise_pruners(model, example)}
    lengthwise_layers = lengthwise_linears(model, example)
    lengthwise = [*channel_axis_convs(model), *lengthwise_layers]
    bare = nchw_bare_parameters(model)
    per_head = per_head_parameters(model)

    def build(ignored: list[nn.Module]) -> tp.DependencyGraph:
        graph = tp.DependencyGraph()
        with tp_compat.recording_shapes(graph, CutAxes(lengthwise_layers)):
            return graph.build_dependency(model, example_inputs=example, verbose=False,
                                          ignored_layers=[*lengthwise, *ignored], customized_pruners=pruners,
                                          unwrapped_parameters=bare, ignored_params=per_head)

    try:
        with time_limit(time_limit_s, "building the dependency graph"):
            return build([])
    except TimeoutError:
        attention = [m for m in model.modules() if _is_attention(m)]
        if not attention:
            raise KpcError(f"building the dependency graph took over {time_limit_s} s; pass --ignore for the "
                           "parts of the network that should stay whole") from None
        with time_limit(time_limit_s, "building the dependency graph without attention"):
            return build(attention)


# torch-pruning's search for one root's coupled channels is pure Python over index lists; through the
# window reshapes of a Swin transformer it ran for minutes and grew to 17 GB. A root not traced in this
# time is left whole, and once the whole search has used its budget the remaining roots are too.
GROUP_TRACE_S = 10
DISCOVERY_S = 120


def _each_group(graph: tp.DependencyGraph) -> Iterator[tuple[nn.Module, object | None, str | None]]:
    """Like torch-pruning's get_all_groups, but a root whose group cannot be traced is reported, not raised."""
    visited: set[nn.Module] = set()
    deadline = time.monotonic() + DISCOVERY_S
    for module in list(graph.module2node):
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or module in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        width = int(pruner.get_out_channels(module))
        limit = min(GROUP_TRACE_S, int(deadline - time.monotonic()))
        if limit < 1:
            visited.add(module)
            yield module, None, f"dependencies not traced: the search for every group ran past {DISCOVERY_S} s"
            continue
        try:
            with time_limit(limit, "tracing one group's dependencies"):
                group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(width)))
        except TimeoutError:
            visited.add(module)
            yield module, None, f"dependencies not traced within {limit} s (torch-pruning)"
            continue
        except tp_compat.RunawayTrace as exc:
            visited.add(module)
            yield module, None, f"dependencies not traceable: {exc}"
            continue
        except Exception as exc:  # torch-pruning's index mapping fails on some split/concat patterns
            visited.add(module)
            yield module, None, f"dependencies not traceable ({type(exc).__name__} in torch-pruning)"
            continue
        for item in group:
            if graph.is_out_channel_pruning_fn(item.dep.handler) and isinstance(item.dep.target.module, nn.Module):
                visited.add(item.dep.target.module)
        yield module, group, None


def discover_groups(model: nn.Module, graph: tp.DependencyGraph, *, ignore: Sequence[str] = (),
                    never_prune: set[str] = frozenset(), min_channels: int = 1) -> list[ChannelGroup]:
    """List every coupled group rooted at a conv or linear layer, marking the unsafe ones whole."""
    names = _module_names(model)
    param_names = {id(p): n for n, p in model.named_parameters()}
    param_dims = {id(p): int(dim) for p, dim in getattr(graph, "unwrapped_parameters", [])}
    ignored = {n for n in names.values() if n and any(_ignores(p, n) for p in ignore)}
    _check_ignore_patterns(ignore, [n for n in names.values() if n])
    groups: list[ChannelGroup] = []
    grouped: dict[str, dict[str, int | None]] = {}  # grouped conv -> its groups count and the group on each side
    normalized: dict[int, list[int]] = {}  # group index -> whole normalization groups of each GroupNorm it spans
    for root_module, tp_group, failure in _each_group(graph):
        root = names.get(root_module)
        if root is None:
            continue
        if tp_group is None:
            width = int(graph.get_pruner_of_module(root_module).get_out_channels(root_module))
            groups.append(ChannelGroup(len(groups), root, width, [root], False, failure))
            continue
        layers: list[str] = []
        out_names: list[str] = []
        reason = None
        width = len(tp_group[0].idxs)
        unmappable = tp_compat.unmappable_nodes(graph)
        for item in tp_group:
            for node in (item.dep.source, item.dep.target):
                if node in unmappable:
                    reason = f"channel order not traceable: {unmappable[node]}"
            module = item.dep.target.module
            if not isinstance(module, nn.Module) or module not in names:
                if isinstance(module, nn.Parameter):
                    name, problem = _bare_parameter(module, param_names, param_dims, item.idxs)
                    layers.append(name)
                    reason = reason or problem
                continue
            name = names[module]
            if _is_attention(module):
                reason = f"attention layer {name}: heads are left whole"
            elif isinstance(module, nn.GroupNorm):
                blocks, problem = normalization_blocks(module, item.idxs, getattr(item, "root_idxs", None), width)
                reason = reason or (problem and f"{problem} ({names[module]})")
                if blocks is not None:
                    normalized.setdefault(len(groups), []).append(blocks)
            elif is_grouped_conv(module):
                side = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
                aligned = list(item.idxs) == list(getattr(item, "root_idxs", None) or item.idxs) == \
                    list(range(len(item.idxs)))
                grouped.setdefault(name, {"groups": module.groups})[side] = len(groups) if aligned else None
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                out_names.append(name)
                if any(True for _ in module.parameters(recurse=False)):
                    layers.append(name)
            elif any(True for _ in module.parameters(recurse=False)):
                layers.append(name + "<")
        root_width = graph.get_pruner_of_module(root_module).get_out_channels(root_module)
        if reason is None and root_width is not None and int(root_width) != width:
            # a split torch-pruning does not follow (timm's Res2Net: a 1x1 conv of 128 channels whose chunks
            # separate convs read becomes a group of 288): such a group can be neither scored nor applied
            reason = f"torch-pruning maps {width} channels onto a layer of {int(root_width)} (a split it cannot follow)"
        group = ChannelGroup(len(groups), root, width, layers, tp_group=tp_group)
        touched_never = sorted(set(out_names) & never_prune)
        touched_ignored = sorted(set(out_names) & ignored)
        if touched_never:
            group.prunable, group.reason = False, f"network output ({touched_never[0]})"
        elif touched_ignored:
            group.prunable, group.reason = False, f"ignored by --ignore ({touched_ignored[0]})"
        elif reason is not None:
            group.prunable, group.reason = False, reason
        elif width <= min_channels:
            group.prunable, group.reason = False, f"only {width} channels (at or below --min-channels)"
        groups.append(group)
    if not groups:
        raise KpcError("found no prunable convolution or linear layers in this model")
    _tie_grouped_convs(groups, grouped)
    _cut_by_normalization_groups(groups, normalized)
    return groups


def _cut_by_normalization_groups(groups: list[ChannelGroup], normalized: dict[int, list[int]]) -> None:
    """Cut every group a GroupNorm normalizes by whole normalization groups (`kpc.group_norms`).

    A group several GroupNorms normalize is cut by blocks that are whole groups of each
    (their greatest common divisor). A group already cut by the conv groups of a grouped
    conv keeps those where each conv group is whole normalization groups, and is left
    whole, with the reason, where it is not.
    """
    for index, counts in normalized.items():
        group = groups[index]
        if not group.prunable:
            continue
        blocks = math.gcd(*counts)
        if blocks == 1:  # one whole normalization group (or groups of norms that share no smaller block)
            leave_whole(groups, index, "its channels form one whole GroupNorm group, which kpc keeps or removes "
                                       "whole")
            continue
        if group.blocks > 1:
            if blocks % group.blocks:
                leave_whole(groups, index, f"its {group.blocks} conv groups do not fall on whole GroupNorm groups "
                                           f"(it spans {blocks} of them)")
            continue
        if blocks < group.width:
            group.blocks, group.blocks_of = blocks, "GroupNorm groups"


def _ignores(pattern: str, name: str) -> bool:
    """--ignore matches a module by glob, by name, or as the parent of `name`."""
    return fnmatch.fnmatchcase(name, pattern) or name == pattern or name.startswith(pattern + ".")


def _check_ignore_patterns(patterns: Sequence[str], names: list[str]) -> None:
    """A pattern that matches no module is a typo the user would not notice: the layers they meant get pruned."""
    for pattern in patterns:
        if not pattern.strip():
            raise KpcError("--ignore got an empty pattern: give a module name or a glob such as 'layer4.*'")
        if not any(_ignores(pattern, name) for name in names):
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
            hint = f" (close: {', '.join(close)})" if close else f" (e.g. {', '.join(names[:3])})"
            raise KpcError(f"--ignore {pattern!r} matches no module of this model{hint}: check the name "
                           "(kpc inspect lists the groups of a pruned model)")


def _bare_parameter(parameter: nn.Parameter, names: dict[int, str], dims: dict[int, int], indices: Sequence[int]
                    ) -> tuple[str, str | None]:
    """A per-channel parameter outside any layer (ConvNeXt's layer scale, a position embedding): its name, and
    why the group must stay whole (None: torch-pruning prunes it along a dimension of the group's channels).

    `indices` are the group's channels as torch-pruning maps them onto the parameter: through a concat
    (a dense block's layer scale, RDNet's) they are the parameter's own 0..n-1 in a wider group, which is
    fine; indices beyond the dimension mean torch-pruning chose the wrong one (visformer's W for C).
    """
    name = names.get(id(parameter), "<parameter>")
    dim = dims.get(id(parameter))
    if dim is None:
        return name, f"coupled to the bare parameter {name}, which torch-pruning does not prune"
    size = int(parameter.shape[dim])
    if sorted(int(i) for i in indices) != list(range(size)):
        return name, (f"coupled to the bare parameter {name} of shape {tuple(parameter.shape)}, which would be "
                      f"pruned along a dimension of {size}, not the group's {len(indices)} channels")
    return name, None


def _tie_grouped_convs(groups: list[ChannelGroup], grouped: dict[str, dict[str, int | None]]) -> None:
    """Tie the groups on both sides of every grouped conv so they keep the same whole conv groups.

    A grouped conv stays valid only when it loses whole conv groups, the same ones on
    its input side (the group feeding it) and its output side (the group it roots).
    Those groups, and any chained through further grouped convs, become one tie: the
    first one chooses how many blocks to keep and which, the others follow. A tie is
    left whole, with the reason, when any member is whole for another reason, a side
    of one of its grouped convs is not a group of its own, or its convs disagree on
    the number of conv groups.
    """
    parent = list(range(len(groups)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    problems: dict[int, str] = {}
    counts: dict[int, set[int]] = {}
    members_of_conv: list[tuple[str, list[int]]] = []
    for name, sides in grouped.items():
        members = [sides[k] for k in ("in", "out") if k in sides]
        known = [m for m in members if m is not None]
        for m in known[1:]:
            parent[find(m)] = find(known[0])
        members_of_conv.append((name, known))
        if len(known) < 2 or None in members:
            for m in known:
                problems.setdefault(m, f"grouped convolution {name} (groups={sides['groups']}): one side of it "
                                       "is not a channel group kpc can follow, so it is left whole")
    ties: dict[int, set[int]] = {}
    for name, known in members_of_conv:
        for m in known:
            counts.setdefault(find(m), set()).add(int(grouped[name]["groups"]))
            ties.setdefault(find(m), set()).add(m)
    for root, tied in ties.items():
        members = sorted(tied)
        leader = groups[members[0]]
        convs = sorted(counts[root])
        reason = next((problems[m] for m in members if m in problems), None)
        whole = next((groups[m] for m in members if not groups[m].prunable), None)
        if reason is None and len(convs) > 1:
            reason = f"grouped convolutions with different group counts ({convs}) share channels"
        if reason is None and any(groups[m].width % convs[0] for m in members):
            reason = f"a grouped convolution's {convs[0]} conv groups do not split its channels evenly"
        if reason is None and whole is not None:
            reason = f"tied through a grouped convolution to {whole.root}, which is whole: {whole.reason}"
        for m in members:
            group = groups[m]
            if reason is not None:
                if group.prunable:
                    group.prunable, group.reason = False, reason
                continue
            group.blocks = convs[0]
            group.tied_to = None if m == leader.index else leader.index


__all__ = ["ChannelGroup", "build_graph", "discover_groups", "find_classifier", "is_grouped_conv",
           "is_grouped_conv_input", "leave_whole", "tie_of", "time_limit"]
