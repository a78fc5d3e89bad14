"""Every use of torch-pruning's private internals, in one place, applied explicitly, checked loudly.

kpc relies on torch-pruning's dependency graph (public API: `DependencyGraph`,
`get_pruning_group`, `Group.prune`, the importance classes). Three things it needs are
not public:

1. **Tolerant index mapping.** torch-pruning maps channel indices through every
   concat/split/reshape/slice of the graph at once, and one exotic node (a channel
   shuffle, GhostNet's concat-then-slice) raises and kills the whole graph. kpc wraps the
   module-level `update_*_index_mapping` functions so that a failing node is recorded and
   only the groups through it are left whole (`unmappable_nodes`). Pixel (un)shuffle and
   channel shuffle pass as element-wise ops, which they are not: their stand-ins
   (`ops._ElementWiseOp`) are recognised by the autograd node they keep in `_grad_fn` and
   marked unmappable too.
2. **A group minus some items.** kpc removes grouped convs' input channels itself (whole
   conv groups), so those items are dropped from a group before it is scored or pruned;
   a `Group` holds its items in `_group` and its graph in `_DG` (`graph_of` reads it).
3. **Reshapes that keep the channels where they are.** torch-pruning (1.6 on torch 2.x, whose
   view nodes no longer save `_saved_self_sizes`) maps every reshape as a flatten of channels,
   with a stride guessed from the layers around it. ECA's `(B, C) -> (B, 1, C)` before its
   channel-wise Conv1d and GC's `(B, C, H, W) -> (B, C, H*W)` got strides of C, which blew every
   index list up C-fold: a 2,048-channel group took minutes to trace and was left whole at the
   time limit. `recording_shapes` notes each traced reshape's output shape (for a reshape made
   inside another op, such as matmul's, autograd's private `_input_metadata` gives it); a reshape
   that only adds or drops singleton dims, or keeps the batch and channel dims and refactors the
   ones after them (`(B, C, H, W) <-> (B, C, H*W)`), keeps channel indices as they are and gets no
   mapping (`kept_channel_reshapes`). On EfficientViM the guessed strides grew index lists to
   392,000 entries; with this rule its prune took 10 CPU-seconds instead of 126. A stride is
   right only for a flatten of `(B, C, H, W)` into `(B, C*H*W)` (or back); where torch-pruning
   guesses one for any other view (Swin's relative position bias, attention maps merged into
   the batch), it is undone and the view recorded as unmappable, so its groups stay whole with
   the reason (swin_v2_b: 135 CPU-seconds to refuse, 27 to prune).
4. **MACs of layer subclasses.** torch-pruning's counter matches a module's exact type, so a
   conv subclass (timm's ScaledStdConv2d, Conv2dSame) counted as zero: an NFNet's budget was
   taken over its classifier alone. `count_ops_and_params` lends each subclass its nearest
   counted base's hook through the counter's `CUSTOM_MODULES_MAPPING`. Its whole-module
   formulas for timm's attention classes (`MODULES_MAPPING`) assume a square output
   projection, which a head-pruned model's is not: they are set aside while kpc counts, the
   layers inside are counted as layers and the products between activations by `kpc.matmuls`.
5. **Layers without a bias.** torch-pruning's pruning functions slice a norm layer's `bias`
   unconditionally (GroupNorm's in 1.6.1); a norm built with `bias=False` (timm's metaformer
   GroupNorm1NoBias) raised inside the prune and its group was left whole. The shared slicing
   helper `BasePruningFunc._prune_parameter_and_grad` passes a missing parameter through.
6. **Cutting a copy by a traced group** (`kpc.apply.prune_by_trace`). Each item of a traced
   group records the root channel each of its indices came from (`root_idxs`), the axis its
   handler cuts (its node's `pruning_dim`, which torch-pruning sets on the shared pruner
   before every call) and, for functional ops, a stand-in module of torch-pruning's own.
   `removals` and `call_handler` read and use those.
7. **A group's duplicate check by target.** While it traces a group, torch-pruning asks
   `Group.has_pruning_op` whether an item is already there before every step into a visited
   node, and that method scans the whole item list comparing index lists: quadratic in the
   group's size. On an attention model (EfficientViM at 224) 130,000 such scans took 90 of a
   prune's 120 CPU-seconds. `_index_duplicate_checks` compares the index lists of the items with
   the same node and handler only, kept in a dict as items are added (nodes by identity, handlers
   by value, index lists hashed as tuples). A node that collects more than
   `MAX_INDEX_LISTS_PER_NODE` different lists is a mapping going round a cycle and raises
   `RunawayTrace` (deepseek_vit's rotary attention: each qkv group ran into its 10 s limit).
8. **Splits and concats along another axis.** torch-pruning maps a split or concat as a cut of
   the channels unless autograd saved a dim other than 1, and a negative dim is saved as a huge
   unsigned number, so a gated token MLP's `chunk(2, dim=-1)` of `(B, C, N)` passed as a channel
   split and shifted a group's indices on every pass round the residual stream (gMixer: every
   group at its time limit). `kpc.axes.CutAxes` watches the traced forward pass through
   `recording_shapes` and the split and concat mappings skip the cuts it marks.
9. Nothing else: every other call goes through the public API.

`install()` applies (1), (3), (5), (7) and (8); it is called by `kpc.groups.build_graph`, never on import. Each
function checks that the installed torch-pruning still has what it touches and fails with
one line naming the tested versions when it does not.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from kpc.errors import KpcError

log = logging.getLogger(__name__)

TESTED_VERSIONS = ("1.6.1",)  # pyproject pins torch-pruning>=1.6,<1.7
INDEX_MAPPERS = ("update_concat_index_mapping", "update_split_index_mapping", "update_reshape_index_mapping",
                 "update_unbind_index_mapping", "update_expand_index_mapping", "update_slice_index_mapping")

RESHAPE_NODE = re.compile(r"view|reshape", re.IGNORECASE)  # the autograd nodes torch-pruning maps as reshapes
_failures: weakref.WeakKeyDictionary[Any, dict[Any, str]] = weakref.WeakKeyDictionary()
_shapes: weakref.WeakKeyDictionary[Any, dict[Any, tuple[int, ...]]] = weakref.WeakKeyDictionary()
_kept: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
# a built graph's nodes do not change: its rearranging ops are found once, not once per group asked about
_rearranging: weakref.WeakKeyDictionary[Any, dict[Any, str]] = weakref.WeakKeyDictionary()
_other_axis_cuts: weakref.WeakKeyDictionary[Any, set[Any]] = weakref.WeakKeyDictionary()
_installed = False


def _incompatible(what: str) -> KpcError:
    import torch_pruning

    version = getattr(torch_pruning, "__version__", "unknown")
    return KpcError(f"the installed torch-pruning {version} lacks {what}, which kpc relies on (tested with "
                    f"{', '.join(TESTED_VERSIONS)}): install torch-pruning=={TESTED_VERSIONS[-1]}")


def install() -> None:
    """Make channel index mapping tolerant of nodes it cannot map (idempotent)."""
    global _installed
    if _installed:
        return
    try:
        from torch_pruning.dependency import index_mapping
    except ImportError as exc:
        raise _incompatible("torch_pruning.dependency.index_mapping") from exc
    if not callable(getattr(index_mapping, "update_index_mapping", None)):
        raise _incompatible("index_mapping.update_index_mapping")
    for name in INDEX_MAPPERS:
        function = getattr(index_mapping, name, None)
        if function is None:
            if name == "update_expand_index_mapping":  # optional in some 1.x releases
                continue
            raise _incompatible(f"index_mapping.{name}")
        if not getattr(function, "__kpc_tolerant__", False):
            if name == "update_reshape_index_mapping":
                function = _unless_channels_kept(function)
            elif name in ("update_split_index_mapping", "update_concat_index_mapping"):
                function = _unless_other_axis(function)
            setattr(index_mapping, name, _tolerant(function))
    _pass_missing_parameters()
    _index_duplicate_checks()
    _installed = True


def _torch_pruning_attribute(module: str, name: str) -> Any:
    """`module.name` from torch-pruning, or the one-line incompatibility error naming it."""
    try:
        value = getattr(importlib.import_module(module), name, None)
    except ImportError as exc:
        raise _incompatible(module) from exc
    if value is None:
        raise _incompatible(f"{module}.{name}")
    return value


# A node reached with this many different index lists while one group is traced is a mapping that
# goes round a cycle shifting the indices each time (deepseek_vit's rotary attention: the q, k and v
# of one projection reached each other through unbind and concat without end); a real group meets a
# node through a few paths, each with one list.
MAX_INDEX_LISTS_PER_NODE = 64


class RunawayTrace(RuntimeError):
    """torch-pruning's search for one group's channels keeps finding new index lists for one node."""


def _index_duplicate_checks() -> None:
    """Answer `Group.has_pruning_op` from the items of the same node instead of scanning them all."""
    group_class = _torch_pruning_attribute("torch_pruning.dependency.group", "Group")
    scan = getattr(group_class, "has_pruning_op", None)
    replace = getattr(group_class, "__setitem__", None)
    if not callable(scan) or not callable(replace):
        raise _incompatible("Group.has_pruning_op and Group.__setitem__")
    if getattr(scan, "__kpc_indexed__", False):
        return

    def has_pruning_op(self: Any, dep: Any, idxs: Any) -> bool:
        items = self.__dict__.get("_group")
        if not isinstance(items, list):
            return scan(self, dep, idxs)
        index = self.__dict__.get("_kpc_item_index")
        if index is None or index[0] is not items or index[1] > len(items):
            index = [items, 0, {}]  # the list was replaced or shrank: index it again
            self.__dict__["_kpc_item_index"] = index
        by_target = index[2]
        for item_dep, item_idxs in items[index[1]:]:
            by_target.setdefault((id(item_dep.target), item_dep.handler), set()).add(tuple(item_idxs))
        index[1] = len(items)
        known = by_target.get((id(dep.target), dep.handler))
        if known is None:
            return False
        if len(known) > MAX_INDEX_LISTS_PER_NODE:
            raise RunawayTrace(f"the channel mapping through {dep.target.name} does not settle: it was reached "
                               f"with {len(known)} different index lists")
        return tuple(idxs) in known  # an index is an int or torch-pruning's (idx, root_idx) tuple

    def setitem(self: Any, key: Any, value: Any) -> None:
        self.__dict__.pop("_kpc_item_index", None)  # an item changed in place: index again on next use
        replace(self, key, value)

    has_pruning_op.__kpc_indexed__ = True  # type: ignore[attr-defined]
    has_pruning_op.__wrapped__ = scan  # type: ignore[attr-defined]
    setitem.__wrapped__ = replace  # type: ignore[attr-defined]
    group_class.has_pruning_op = has_pruning_op
    group_class.__setitem__ = setitem


def _pass_missing_parameters() -> None:
    """Let torch-pruning's parameter slicing return None for a parameter the layer does not have."""
    base = _torch_pruning_attribute("torch_pruning.pruner.function", "BasePruningFunc")
    slicing = getattr(base, "_prune_parameter_and_grad", None)
    if not callable(slicing):
        raise _incompatible("pruner.function.BasePruningFunc._prune_parameter_and_grad")
    if getattr(slicing, "__kpc_tolerant__", False):
        return

    def wrapper(self: Any, weight: Any, keep_idxs: Any, pruning_dim: int) -> Any:
        if weight is None:  # a layer built without this parameter (bias=False): nothing to slice
            return None
        return slicing(self, weight, keep_idxs, pruning_dim)

    wrapper.__kpc_tolerant__ = True  # type: ignore[attr-defined]
    wrapper.__wrapped__ = slicing  # type: ignore[attr-defined]
    base._prune_parameter_and_grad = wrapper


def _unless_channels_kept(update: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def wrapper(graph: Any, node: Any) -> Any:
        sizes = _reshape_sizes(graph, node)
        if sizes is not None and _keeps_channels(*sizes):
            _kept.setdefault(graph, set()).add(str(getattr(node, "name", node)))
            return None
        before = _mappings_around(node)
        result = update(graph, node)
        guessed = [dep for dep, mapping in _mappings_around(node).items() if mapping is not before.get(dep)]
        if guessed and sizes is not None and not _flattens_channels(*sizes):
            for dep in guessed:  # a stride guessed for a view that is no flatten of NCHW channels: undo it
                dep.index_mapping[0] = before.get(dep)
            _failures.setdefault(graph, {})[node] = (f"view {sizes[0]} -> {sizes[1]} at {getattr(node, 'name', node)} "
                                                     "moves the channels in a way kpc cannot map")
        return result

    wrapper.__wrapped__ = update  # type: ignore[attr-defined]
    return wrapper


def _mappings_around(node: Any) -> dict[Any, Any]:
    """The first index mapping of every dependency into and out of `node` (the slot reshape mapping sets)."""
    deps = list(getattr(node, "dependencies", ()))
    for neighbour in (*getattr(node, "inputs", ()), *getattr(node, "outputs", ())):
        deps.extend(dep for dep in getattr(neighbour, "dependencies", ()) if dep.target is node)
    return {dep: dep.index_mapping[0] for dep in deps if getattr(dep, "index_mapping", None)}


def _flattens_channels(before: tuple[int, ...], after: tuple[int, ...]) -> bool:
    """Whether a view flattens `(B, C, H, W)` into `(B, C*H*W)` or unflattens it: the one reshape whose channel
    mapping torch-pruning's stride describes (channel c owns the H*W entries from c*H*W)."""
    flat, grid = (before, after) if len(before) == 2 else (after, before)
    return len(flat) == 2 and len(grid) == 4 and flat[0] == grid[0] and flat[1] == math.prod(grid[1:])


def _keeps_channels(before: tuple[int, ...], after: tuple[int, ...]) -> bool:
    """A reshape that leaves every channel index where it was.

    Two kinds: one that only adds or drops singleton dims (`(C,) -> (1, C, 1)`), and one that keeps
    the batch and channel dims and refactors the dims after them (`(B, C, H, W) -> (B, C, H*W)` and
    back). torch-pruning would map both as flattens with a stride guessed from neighbouring layers:
    on an attention model that guess fed index lists hundreds of times longer than any channel
    count back into the trace, which then ran until its time limit.
    """
    if [d for d in before if d != 1] == [d for d in after if d != 1]:
        return True
    return (len(before) >= 3 and len(after) >= 3 and before[:2] == after[:2]
            and math.prod(before[2:]) == math.prod(after[2:]))


def _reshape_sizes(graph: Any, node: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """A traced reshape's input and output sizes, or None where autograd did not keep them.

    The output size comes from the shapes recorded while tracing, or, for a reshape made inside
    another op (matmul reshapes its operands where no torch function sees it), from the autograd
    node's private `_input_metadata` (the shape of the gradient it takes in: its output's).
    """
    grad_fn = getattr(node, "grad_fn", None)
    if grad_fn is None:
        return None
    before = getattr(grad_fn, "_saved_self_sym_sizes", None) or getattr(grad_fn, "_saved_self_sizes", None)
    if before is None:
        return None
    after = _shapes.get(graph, {}).get(grad_fn)
    if after is None:
        metadata = getattr(grad_fn, "_input_metadata", None)
        if not metadata or not hasattr(metadata[0], "shape"):
            return None
        after = metadata[0].shape
    return tuple(int(d) for d in before), tuple(int(d) for d in after)


class _ShapeRecorder(TorchFunctionMode):
    """A torch function mode noting the output shape of every reshape autograd records during tracing."""

    def __init__(self, shapes: dict[Any, tuple[int, ...]], watcher: Any = None) -> None:
        super().__init__()
        self.shapes = shapes
        self.watcher = watcher

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if self.watcher is not None:
            try:
                self.watcher.observe(func, args, kwargs or {}, result)
            except Exception as exc:  # an op the watcher cannot read keeps torch-pruning's own mapping
                log.debug("cut-axis check skipped %s: %s: %s", getattr(func, "__name__", func), type(exc).__name__, exc)
        for tensor in result if isinstance(result, (tuple, list)) else (result,):
            grad_fn = tensor.grad_fn if isinstance(tensor, torch.Tensor) else None
            if grad_fn is not None and RESHAPE_NODE.search(type(grad_fn).__name__):  # only reshapes are asked about
                self.shapes.setdefault(grad_fn, tuple(tensor.shape))
        return result


def recording_shapes(graph: Any, cut_axes: Any = None) -> Any:
    """Context for `graph.build_dependency(...)`: keeps the traced reshapes' shapes for the reshape mapping,
    and lets `cut_axes` (a `kpc.axes.CutAxes`) tell the splits and concats that do not cut the channels."""
    shapes: dict[Any, tuple[int, ...]] = {}
    _shapes[graph] = shapes
    if cut_axes is not None:
        _other_axis_cuts[graph] = cut_axes.other_axis
    return _ShapeRecorder(shapes, cut_axes)


def _unless_other_axis(update: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def wrapper(graph: Any, node: Any) -> Any:
        if getattr(node, "grad_fn", None) in _other_axis_cuts.get(graph, ()):
            return None  # a cut along tokens or space: every piece carries all the channels, indices unchanged
        return update(graph, node)

    wrapper.__wrapped__ = update  # type: ignore[attr-defined]
    return wrapper


def kept_channel_reshapes(graph: Any) -> set[str]:
    """Names of the reshape nodes whose channel mapping was left as the identity."""
    return set(_kept.get(graph, set()))


def _tolerant(update: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def wrapper(graph: Any, node: Any) -> Any:
        try:
            return update(graph, node)
        except Exception as exc:  # any failure of one node's mapping spoils only the groups through it
            _failures.setdefault(graph, {})[node] = (f"{type(exc).__name__} mapping channels through "
                                                     f"{getattr(node, 'name', node)}")
            return None

    wrapper.__kpc_tolerant__ = True  # type: ignore[attr-defined]
    wrapper.__wrapped__ = update  # type: ignore[attr-defined]
    return wrapper


# autograd nodes of ops that move channels into space or back, or permute them: torch-pruning traces them as
# element-wise ops (channel i in, channel i out), so the groups through them got wrong index lists
REARRANGING_OPS = ("PixelShuffleBackward", "PixelUnshuffleBackward", "ChannelShuffleBackward",
                   "NativeChannelShuffleBackward")


def unmappable_nodes(graph: Any) -> dict[Any, str]:
    """Nodes of `graph` whose channel index mapping failed or cannot be right, with why."""
    return {**_rearranging_nodes(graph), **_failures.get(graph, {})}


def _rearranging_nodes(graph: Any) -> dict[Any, str]:
    """Stand-ins for pixel (un)shuffle and channel shuffle: torch-pruning keeps the autograd node of a
    functional op in the stand-in's private `_grad_fn`.

    They used to pass as element-wise: a PixelShuffle(2) after a conv of 256 channels mapped the conv's
    channels onto the 64 the next conv reads, and the groups failed in torch-pruning's importance (an
    IndexError) or in the pruned model's forward pass instead of saying why.
    """
    import torch_pruning as tp

    if graph in _rearranging:
        return _rearranging[graph]
    element_wise = getattr(tp.ops, "_ElementWiseOp", None)
    if element_wise is None:
        raise _incompatible("ops._ElementWiseOp, its stand-in for element-wise functional ops")
    found: dict[Any, str] = {}
    for module, node in getattr(graph, "module2node", {}).items():
        if type(module) is not element_wise:
            continue
        if not hasattr(module, "_grad_fn"):
            raise _incompatible("the _grad_fn of its element-wise stand-ins")
        op = module._grad_fn if isinstance(module._grad_fn, str) else type(module._grad_fn).__name__
        if op.startswith(REARRANGING_OPS):
            found[node] = f"{op.removesuffix('0').removesuffix('Backward')} moves channels where kpc cannot follow them"
    _rearranging[graph] = found
    return found


def group_with_items(group: Any, items: Iterable[Any]) -> Any:
    """A torch-pruning Group holding `items` (a subset of `group`'s), bound to the same graph."""
    import torch_pruning as tp

    subset = tp.dependency.Group()
    if not hasattr(subset, "_group") or not hasattr(group, "_DG"):
        raise _incompatible("Group._group and Group._DG")
    subset._group = list(items)
    subset._DG = group._DG
    return subset


def removals(group: Any, removed: Iterable[int]) -> Iterator[tuple[Any, Any, int | None, set[int]]]:
    """(item, its module or parameter, the axis its handler cuts, its indices) for removing root channels
    `removed` of a group traced with every root channel; items the cut does not reach and torch-pruning's
    stand-ins for functional ops are skipped. Raises ValueError for an item without root indices."""
    gone = {int(i) for i in removed}
    for item in group:
        roots = getattr(item, "root_idxs", None)
        if roots is None or len(roots) != len(item.idxs):
            raise ValueError("a traced group item has no root indices")
        indices = {int(i) for i, r in zip(item.idxs, roots, strict=True) if int(r) in gone}
        target = item.dep.target.module
        if indices and not _is_functional_node(target):
            yield item, target, getattr(item.dep.target, "pruning_dim", None), indices


def call_handler(handler: Any, target: Any, indices: list[int], pruning_dim: int | None) -> Any:
    """Run a torch-pruning handler on `target` as its Dependency would: the pruner is shared, so it is
    told the axis first (a (C, 1, 1) layer scale cut along the last axis broke every ConvNeXt stream)."""
    pruner = getattr(handler, "__self__", None)
    if pruning_dim is not None and hasattr(pruner, "pruning_dim"):
        pruner.pruning_dim = pruning_dim
    return handler(target, indices)


def _is_functional_node(target: Any) -> bool:
    """A stand-in module torch-pruning puts in its graph for a functional op (concat, split, add, reshape, ...).

    Its pruning handler only updates the stand-in's own bookkeeping; the model holds no such module.
    """
    import torch_pruning as tp

    return isinstance(target, nn.Module) and type(target).__module__ == tp.ops.__name__ and \
        type(target).__name__.startswith("_")


def graph_of(group: Any) -> Any:
    """The DependencyGraph a torch-pruning Group was traced on (it answers which handlers prune outputs)."""
    graph = getattr(group, "_DG", None)
    if graph is None or not callable(getattr(graph, "is_out_channel_pruning_fn", None)):
        raise _incompatible("Group._DG")
    return graph


def count_ops_and_params(model: nn.Module, example: Any, *, layer_wise: bool = False) -> Any:
    """torch-pruning's MAC and parameter counter, which also counts subclasses of the layers it knows.

    Same return values as `torch_pruning.utils.count_ops_and_params`. A subclass is counted by
    the hook of its nearest base the counter knows (a ScaledStdConv2d as a Conv2d); should that
    hook fail on it, the count is retried with subclasses counted as zero, as torch-pruning does.
    The counter's whole-module formulas for timm attention classes are set aside: they assume
    a square output projection, which a pruned model's is not; their layers are counted as
    layers, and their products between activations by `kpc.matmuls`.
    """
    import torch_pruning as tp

    counter = getattr(getattr(tp, "utils", None), "op_counter", None)
    known = getattr(counter, "MODULES_MAPPING", None)
    if not isinstance(known, dict) or not isinstance(getattr(counter, "CUSTOM_MODULES_MAPPING", None), dict):
        raise _incompatible("utils.op_counter.MODULES_MAPPING and CUSTOM_MODULES_MAPPING")
    formulas = {cls: hook for cls, hook in known.items() if _is_attention_formula(cls, hook)}
    for cls in formulas:
        del known[cls]
    try:
        lent: dict[type, Any] = {}
        for module in model.modules():
            cls = type(module)
            if cls in known or cls in lent:
                continue
            base = next((b for b in cls.__mro__[1:] if b in known), None)
            if base is not None:
                lent[cls] = known[base]
        if lent:
            counter.CUSTOM_MODULES_MAPPING = dict(lent)  # the counter resets it to {} when it returns
            try:
                return tp.utils.count_ops_and_params(model, example, layer_wise=layer_wise)
            except Exception as exc:  # a subclass the base's hook cannot read: count it as zero, as before
                log.debug("counting MACs of layer subclasses failed (%s); counting them as zero", exc)
            finally:
                counter.CUSTOM_MODULES_MAPPING = {}
        return tp.utils.count_ops_and_params(model, example, layer_wise=layer_wise)
    finally:
        known.update(formulas)


def _is_attention_formula(cls: type, hook: Any) -> bool:
    """A whole-module formula for an attention class outside torch (timm's), not a layer's hook."""
    return "attention" in getattr(hook, "__name__", "") and not cls.__module__.startswith("torch.")


def counted_whole(module: nn.Module) -> bool:
    """Whether torch-pruning's counter counts `module` by a formula of its own (its inner products included)."""
    import torch_pruning as tp

    known = tp.utils.op_counter.MODULES_MAPPING
    return any(cls in known and not _is_attention_formula(cls, known[cls]) for cls in type(module).__mro__
               if cls is not nn.Module)
