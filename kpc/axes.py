"""Which axis holds the channels: layers that run along another one, and bare parameters in NCHW layout.

torch-pruning couples a layer's input features with the channels of the tensor it reads.
That is wrong for a layer applied along another axis: an MLP-Mixer's token-mixing Linear
reads `(B, C, N)` after a transpose and mixes the N tokens; ECA's Conv1d slides along the
pooled channels as a length. Such a layer has no channel of the group to prune, and the
group's channels pass through it unchanged (it takes any number of them), so kpc hands it
to torch-pruning as an ignored layer: traced as an element-wise op, never pruned.
Bare parameters shaped like an NCHW activation are handed over with their channel axis.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WALK_LIMIT = 8  # autograd nodes followed back from a layer's input to the transpose that fed it
RESHAPE = re.compile(r"view|reshape", re.IGNORECASE)
# one-input autograd nodes that keep a tensor's shape (norms, activations, scaling), walked through
SHAPE_KEEPING = re.compile(r"Norm|Gelu|Relu|Silu|Sigmoid|Tanh|Hardswish|Hardsigmoid|Elu|Mish|Softplus|Mul|Add|Sub|"
                           r"Div|Clone|Dropout|ToCopy|Neg|Clamp|Transpose|Permute|Split", re.IGNORECASE)


def channel_axis_convs(model: nn.Module) -> list[nn.Module]:
    """Convs with one input and one output channel: nothing to prune, and along the channels where they meet a
    group (ECA's Conv1d over the pooled channels reshaped into a length)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)
            and m.in_channels == 1 and m.out_channels == 1 and m.groups == 1]


def _signed(dim: int) -> int:
    return dim - 2**64 if dim >= 2**63 else dim  # autograd saves negative dims as unsigned 64-bit integers


def _is_channel_axis(axis: int, ndim: int, channels_first: bool) -> bool:
    """Channels are dim 1 of an NCHW tensor or of one flattened from it, else the last dim (tokens)."""
    return axis == 1 if ndim == 4 or channels_first else axis == ndim - 1


def _inputs(grad_fn: Any) -> list[Any]:
    return [f for f, _ in grad_fn.next_functions if f is not None and type(f).__name__ != "AccumulateGrad"]


def _reshapes_4d(grad_fn: Any) -> bool:
    """Whether the autograd node is a reshape of a 4-D tensor."""
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    return RESHAPE.search(type(grad_fn).__name__) is not None and sizes is not None and len(sizes) == 4


def _flattened_from_nchw(grad_fn: Any) -> bool:
    """Whether a tensor came straight from a reshape of a 4-D tensor (a patch embedding's `flatten(2)`)."""
    sources = _inputs(grad_fn)
    return len(sources) == 1 and _reshapes_4d(sources[0])


def _reads_another_axis(grad_fn: Any, ndim: int, lengthwise_outputs: set[Any], layer_outputs: set[Any],
                        budget: int = WALK_LIMIT) -> bool:
    """Whether a Linear's input last axis came from a non-channel axis: a transpose or permute moved it there,
    or another lengthwise layer produced it, through shape-keeping ops (every input of a product must agree)."""
    if grad_fn is None or grad_fn in layer_outputs or budget <= 0:
        return False
    if grad_fn in lengthwise_outputs:
        return True
    name = type(grad_fn).__name__
    moved_from = None
    if name.startswith("TransposeBackward"):
        dims = {_signed(int(grad_fn._saved_dim0)) % ndim, _signed(int(grad_fn._saved_dim1)) % ndim}
        if ndim - 1 in dims and len(dims) == 2:
            moved_from = (dims - {ndim - 1}).pop()
    elif name.startswith("PermuteBackward"):
        dims = [_signed(int(d)) % ndim for d in grad_fn._saved_dims]
        if dims[-1] != ndim - 1:
            moved_from = dims[-1]
    elif not SHAPE_KEEPING.search(name):
        return False
    if moved_from is not None:
        return not _is_channel_axis(moved_from, ndim, _flattened_from_nchw(grad_fn))
    inputs = _inputs(grad_fn)
    return bool(inputs) and all(_reads_another_axis(f, ndim, lengthwise_outputs, layer_outputs, budget - 1)
                                for f in inputs)


def lengthwise_linears(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Linear layers applied along tokens or space rather than channels, found by one forward pass.

    Runs with gradients on (the caller traces under `enable_grad`), in eval mode, so each
    input's autograd history shows whether a transpose or permute moved a non-channel axis
    last before the layer read it.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2:  # a CNN's classifier: nothing to look for
        return []
    lengthwise: list[nn.Module] = []
    lengthwise_outputs: set[Any] = set()
    layer_outputs: set[Any] = set()

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        first = inputs[0] if inputs else None
        if not isinstance(output, torch.Tensor) or output.grad_fn is None:
            return
        if isinstance(first, torch.Tensor) and first.ndim >= 3 and \
                _reads_another_axis(first.grad_fn, first.ndim, lengthwise_outputs, layer_outputs):
            lengthwise.append(module)
            lengthwise_outputs.add(output.grad_fn)
        else:
            layer_outputs.add(output.grad_fn)

    training = model.training
    handles = [m.register_forward_hook(hook) for m in linears]
    model.eval()
    try:
        with torch.enable_grad():
            model(example)
    except Exception:  # the model's own forward fails: graph building reports that, not this probe
        return []
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return lengthwise


class CutAxes:
    """Watches the traced forward pass for splits and concats along an axis that is not the channels.

    torch-pruning maps every split and concat as a cut of the channels unless autograd saved
    a dim other than 1, and autograd saves a negative dim as a huge unsigned number, so a
    `chunk(2, dim=-1)` passes as a channel split. A gated token-mixing MLP (gMLP, gMixer)
    chunks `(B, C, N)` along its tokens; mapped as a channel split, every pass round the
    residual stream shifted the group's indices by half the tokens, and the trace ran until its
    time limit. `observe` sees each op with its inputs while torch-pruning traces; a split or
    concat that surely does not cut the channels (along the batch, a token axis, or the middle
    spatial dim of a 4-D tensor) is noted in `other_axis`, and its channels pass through whole.
    Where the layout is ambiguous, torch-pruning's mapping stands.
    """

    def __init__(self, lengthwise: list[nn.Module]) -> None:
        self._lengthwise_weights = {id(m.weight) for m in lengthwise if isinstance(m, nn.Linear)}
        self._lengthwise_outputs: set[Any] = set()
        self._layer_outputs: set[Any] = set()
        self.other_axis: set[Any] = set()  # autograd nodes of the splits and concats that keep every channel

    def observe(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
        if func is F.linear and len(args) >= 2 and isinstance(result, torch.Tensor) and result.grad_fn is not None:
            outputs = self._lengthwise_outputs if id(args[1]) in self._lengthwise_weights else self._layer_outputs
            outputs.add(result.grad_fn)
            return
        first = result[0] if isinstance(result, (tuple, list)) and result else result
        grad_fn = first.grad_fn if isinstance(first, torch.Tensor) else None
        name = type(grad_fn).__name__
        if name.startswith(("SplitBackward", "SplitWithSizesBackward")):
            sources = args[:1] if args else (kwargs.get("input"),)
        elif name.startswith("CatBackward"):
            sources = tuple(args[0] if args else kwargs.get("tensors", ()))
        else:
            return
        dim = getattr(grad_fn, "_saved_dim", None)
        if dim is None or first.ndim < 2:
            return
        inputs = [s.grad_fn for s in sources if isinstance(s, torch.Tensor)]
        if not self._cuts_channels(_signed(int(dim)) % first.ndim, first.ndim, inputs):
            self.other_axis.add(grad_fn)

    def _cuts_channels(self, dim: int, ndim: int, inputs: list[Any]) -> bool:
        """False only where the cut is surely not along the channels, whichever layout the tensor has."""
        if dim == 0:
            return False
        if ndim == 4:
            return dim != 2  # H in NCHW and W in NHWC; dims 1 and 3 are the channels in one layout or the other
        if ndim != 3:
            return True
        channels_first = bool(inputs) and all(
            g is not None and (_reads_another_axis(g, ndim, self._lengthwise_outputs, self._layer_outputs)
                               or _reshapes_4d(g) or _flattened_from_nchw(g)) for g in inputs)
        return _is_channel_axis(dim, ndim, channels_first)


LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
               nn.modules.instancenorm._InstanceNorm, nn.PReLU, nn.Embedding, nn.MultiheadAttention, nn.LSTM)


def nchw_bare_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Bare 4-D parameters shaped like an NCHW activation, (1, C, H, W), to be pruned along C (dim 1).

    torch-pruning prunes a parameter outside its known layers along its last dimension larger
    than one: right for a token model's (1, N, C) embedding or a (C, 1, 1) layer scale, wrong
    for a conv stage's (1, C, H, W) position embedding (visformer), whose W it took for the
    channels, so the group was left whole.
    """
    found = []
    for module in model.modules():
        if isinstance(module, LAYER_TYPES):
            continue
        for parameter in module.parameters(recurse=False):
            if parameter.ndim == 4 and parameter.shape[0] == 1 and parameter.shape[1] > 1:
                found.append((parameter, 1))
    return found


__all__ = ["CutAxes", "channel_axis_convs", "lengthwise_linears", "nchw_bare_parameters"]
