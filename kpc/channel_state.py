"""Per-channel state that torch-pruning's layer pruners do not know about, pruned with its channels.

torch-pruning removes a layer's weight rows and bias, a BatchNorm's statistics, and the bare
parameters it finds outside layers. Two common kinds of per-channel state fall between those,
and a model holding either broke in its forward pass once pruned, so its groups were left whole:

- **Extra per-output parameters of a layer subclass.** NFNet-style convs (timm's
  `ScaledStdConv2d`) keep a gain of shape (out, 1, 1, 1) beside the weight. `output_extras`
  finds such parameters on any conv or linear subclass, and `prune_output_extras` slices
  them with the output rows torch-pruning removed.
- **Per-channel buffers of parameter-free modules.** An anti-aliasing blur pool (timm's
  `BlurPool2d`, used by resnetblur, densenetblur, TResNet) holds one filter per channel as a
  buffer of shape (C, 1, k, k) and its channel count, and applies them with a functional
  conv that torch-pruning traces as an element-wise op. `channelwise_pruners` finds such
  modules by running the model once, and gives torch-pruning a pruner (its public
  `customized_pruners` hook) that slices their buffers and channel-count attributes, so the
  module joins the group of the channels it carries.

- **Norms torch-pruning does not know.** An RMSNorm (`torch.nn.RMSNorm`, timm's `RmsNorm*`) or a
  norm built without affine parameters keeps its width in `normalized_shape` and checks its
  input against it; torch-pruning slices its weight as a bare parameter but leaves the shape,
  and a parameter-free one (timm's `RmsNormFp32(affine=False)` before deepseek_vit's head) is
  not in any group at all. `normalized_shape_pruners` gives such classes a pruner that slices
  their per-channel parameters and shrinks the shape together.

All are detected from what a module holds and how it is called, never from its class name.
A module that looks per-channel but is not breaks the safety probe's forward pass, and its
group is left whole with that error, as for any other unsafe group.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from kpc.tracing import forward_with_hooks

LAYER_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
CHANNEL_COUNT_ATTRIBUTE = re.compile(r"(channels|features|chs|dim)$")


def _output_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.out_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    return None


def output_extras(module: nn.Module) -> list[str]:
    """Names of a conv or linear subclass's own parameters, besides weight and bias, indexed by output channel."""
    if type(module) in LAYER_BASES:
        return []
    width = _output_width(module)
    if width is None:
        return []
    return [name for name, parameter in module.named_parameters(recurse=False)
            if name not in ("weight", "bias") and parameter.ndim >= 1 and parameter.shape[0] == width]


def output_extras_of(group: Any, is_output_side: Any) -> list[tuple[nn.Module, list[str], int, list[int]]]:
    """Before a torch-pruning group is pruned: (layer, extra parameter names, width, removed rows) per layer."""
    found = []
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.Module) and is_output_side(item.dep.handler):
            names = output_extras(module)
            if names:
                found.append((module, names, _output_width(module) or 0, [int(i) for i in item.idxs]))
    return found


def prune_output_extras(found: Iterable[tuple[nn.Module, list[str], int, list[int]]]) -> None:
    """After the group is pruned: keep the extra parameters' rows that the layer's weight kept."""
    for module, names, width, removed in found:
        gone = set(removed)
        keep = torch.tensor([i for i in range(width) if i not in gone], dtype=torch.long)
        for name in names:
            parameter = getattr(module, name)
            if parameter.shape[0] != width:
                continue
            sliced = nn.Parameter(parameter.data.index_select(0, keep.to(parameter.device)).clone(),
                                  requires_grad=parameter.requires_grad)
            setattr(module, name, sliced)


def bare_parameter_owners(model: nn.Module, group: Any) -> list[tuple[nn.Module, str, tuple[int, ...]]]:
    """Before a group is pruned: (owner, name, shape) of every bare parameter in it owned by a module outside
    torch. The owner may keep the parameter's shape in Python for a view (metaformer's `Scale` holds
    `(dim, 1, 1)`), which torch-pruning, replacing the parameter, does not know to update."""
    params = {id(item.dep.target.module) for item in group if isinstance(item.dep.target.module, nn.Parameter)}
    if not params:
        return []
    return [(module, name, tuple(parameter.shape)) for module in model.modules()
            if type(module).__module__.split(".")[0] != "torch"
            for name, parameter in module.named_parameters(recurse=False) if id(parameter) in params]


def update_owner_shapes(found: Iterable[tuple[nn.Module, str, tuple[int, ...]]]) -> None:
    """After the group is pruned: where one dimension of an owner's parameter shrank from `old` to `new`,
    replace `old` by `new` in the owner's integer tuples that describe the parameter (a view shape: same
    number of elements as the parameter had) and in its channel-count integers."""
    for owner, name, before in found:
        after = tuple(getattr(owner, name).shape)
        changed = [(a, b) for a, b in zip(before, after, strict=False) if a != b]
        if len(before) != len(after) or len(changed) != 1:
            continue
        old, new = changed[0]
        for attribute, value in list(vars(owner).items()):
            if attribute.startswith("_"):
                continue
            if isinstance(value, tuple) and value and all(type(v) is int for v in value) and old in value \
                    and math.prod(value) == math.prod(before):
                setattr(owner, attribute, tuple(new if v == old else v for v in value))
            elif type(value) is int and value == old and CHANNEL_COUNT_ATTRIBUTE.search(attribute):
                setattr(owner, attribute, new)


def _kept(width: int, removed: Sequence[int]) -> torch.Tensor:
    gone = {int(i) for i in removed}
    return torch.tensor([i for i in range(width) if i not in gone], dtype=torch.long)


def _set_channel_counts(layer: nn.Module, width: int, kept: int) -> None:
    """Replace `width` by `kept` in the layer's integer attributes named as channel counts."""
    for name, value in list(vars(layer).items()):
        if type(value) is int and value == width and CHANNEL_COUNT_ATTRIBUTE.search(name):
            setattr(layer, name, kept)


def _probe(model: nn.Module, example: torch.Tensor, modules: Sequence[nn.Module], hook: Any) -> bool:
    """One eval-mode forward pass with `hook` on `modules`; False when the model's own forward fails
    (graph building reports that, not this probe). A training-mode pass would move BatchNorm's statistics."""
    training = model.training
    model.eval()
    try:
        forward_with_hooks(model, example, modules, hook)
    except Exception:
        return False
    finally:
        model.train(training)
    return True


class ChannelwiseBufferPruner(tp.pruner.function.BasePruningFunc):
    """Prunes a parameter-free module's per-channel buffers (and its channel count) with its channels.

    In and out are the same channels, so `prune_in_channels` is `prune_out_channels`: torch-pruning
    then ties the module's input and output into one group, as it does for BatchNorm.
    """

    def __init__(self, buffers: dict[nn.Module, list[str]]) -> None:
        super().__init__()
        self.buffers = buffers

    def _width(self, layer: nn.Module) -> int:
        return int(getattr(layer, self.buffers[layer][0]).shape[0])

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        width = self._width(layer)
        keep = _kept(width, idxs)
        for name in self.buffers[layer]:
            buffer = getattr(layer, name)
            setattr(layer, name, buffer.index_select(0, keep.to(buffer.device)).contiguous())
        _set_channel_counts(layer, width, len(keep))
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return self._width(layer)

    def get_in_channels(self, layer: nn.Module) -> int:
        return self._width(layer)


def _channel_buffers(module: nn.Module, channels: int) -> list[str]:
    return [name for name, buffer in module.named_buffers(recurse=False)
            if buffer is not None and buffer.ndim >= 1 and buffer.shape[0] == channels
            and channels not in tuple(buffer.shape[1:]) and buffer.is_floating_point()]


def channelwise_pruners(model: nn.Module, example: torch.Tensor) -> dict[type, ChannelwiseBufferPruner]:
    """torch-pruning pruners for module classes whose every called instance carries per-channel buffers.

    A candidate is a leaf module with no parameters and a floating-point buffer; it qualifies when
    one forward pass shows it keeps its input's channel count and a buffer's first dimension is that
    count. A class is registered only when all its called instances qualify (the pruner is per class).
    """
    candidates = [m for m in model.modules()
                  if type(m).__module__.split(".")[0] != "torch" and not any(True for _ in m.children())
                  and not any(True for _ in m.parameters(recurse=False))
                  and any(b is not None and b.ndim >= 1 and b.is_floating_point()
                          for b in m.buffers(recurse=False))]
    if not candidates:
        return {}
    found: dict[nn.Module, list[str]] = {}
    called: set[nn.Module] = set()

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        called.add(module)
        first = inputs[0] if inputs else None
        if not (isinstance(first, torch.Tensor) and isinstance(output, torch.Tensor)
                and first.ndim >= 2 and output.ndim >= 2 and first.shape[1] == output.shape[1]):
            return
        names = _channel_buffers(module, int(first.shape[1]))
        if names:
            found[module] = names

    if not _probe(model, example, candidates, hook):
        return {}
    pruners: dict[type, ChannelwiseBufferPruner] = {}
    for cls in {type(m) for m in found}:
        instances = [m for m in called if type(m) is cls]
        if all(m in found for m in instances):
            pruners[cls] = ChannelwiseBufferPruner({m: found[m] for m in instances})
    return pruners


class NormalizedShapePruner(tp.pruner.function.BasePruningFunc):
    """Prunes a norm over the last (channel) dimension that torch-pruning has no pruner for.

    Its per-channel parameters (weight, bias: shape `normalized_shape`) lose the removed rows and
    `normalized_shape` its width; in and out are the same channels, as for a LayerNorm.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        width = self.get_out_channels(layer)
        keep = _kept(width, idxs)
        for name, parameter in list(layer.named_parameters(recurse=False)):
            if tuple(parameter.shape) == (width,):
                setattr(layer, name, self._prune_parameter_and_grad(parameter, keep.to(parameter.device), 0))
        layer.normalized_shape = (*tuple(layer.normalized_shape)[:-1], len(keep))
        _set_channel_counts(layer, width, len(keep))
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.normalized_shape[-1])

    def get_in_channels(self, layer: nn.Module) -> int:
        return self.get_out_channels(layer)


def _normalizes_channels(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> bool:
    """A call of a one-dimensional norm over its input's channels: shape kept, `normalized_shape` = (C,),
    every parameter of shape (C,)."""
    first = inputs[0] if inputs else None
    shape = getattr(module, "normalized_shape", None)
    if not (isinstance(first, torch.Tensor) and isinstance(output, torch.Tensor) and first.shape == output.shape
            and first.ndim >= 2 and isinstance(shape, tuple | list) and len(shape) == 1 and type(shape[0]) is int):
        return False
    width = shape[0]
    if width not in (first.shape[-1], first.shape[1]):
        return False
    return all(tuple(p.shape) == (width,) for p in module.parameters(recurse=False))


def normalized_shape_pruners(model: nn.Module, example: torch.Tensor) -> dict[type, NormalizedShapePruner]:
    """torch-pruning pruners for norm classes it does not know, whose every called instance normalizes one
    channel dimension (`_normalizes_channels`). Classes torch-pruning prunes itself (LayerNorm) are left to it."""
    candidates = [m for m in model.modules()
                  if isinstance(getattr(m, "normalized_shape", None), tuple | list)
                  and not any(True for _ in m.children())
                  and tp.ops.module2type(m) == tp.ops.OPTYPE.ELEMENTWISE]
    if not candidates:
        return {}
    calls: dict[nn.Module, bool] = {}

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        calls[module] = calls.get(module, True) and _normalizes_channels(module, inputs, output)

    if not _probe(model, example, candidates, hook):
        return {}
    pruner = NormalizedShapePruner()
    classes = {type(m) for m in calls}
    return {cls: pruner for cls in classes if all(ok for m, ok in calls.items() if type(m) is cls)}


__all__ = ["ChannelwiseBufferPruner", "NormalizedShapePruner", "bare_parameter_owners", "channelwise_pruners",
           "normalized_shape_pruners", "output_extras", "output_extras_of", "prune_output_extras",
           "update_owner_shapes"]
