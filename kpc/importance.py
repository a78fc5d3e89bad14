"""Channel importance: first-order Taylor |w * dL/dw| or weight magnitude, summed over a group.

Gradients are accumulated over all calibration batches before scoring (as in the
paper's code), BN stays in eval mode, and scores are not normalised per layer: a raw
score is comparable across the whole network, which is what lets one knapsack trade
channels of different layers against each other.

Calibration data is any iterable of image batches or (images, labels) pairs: a
DataLoader, a list, a generator. Unlabelled batches use the model's own prediction as
the target. A group whose score cannot be computed (an exotic concat-and-slice that
torch-pruning maps to the wrong length) or that scores zero everywhere is reported, so
the prune leaves it whole with the reason instead of crashing or starving it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from kpc import tp_compat
from kpc.errors import KpcError
from kpc.groups import ChannelGroup, is_grouped_conv_input, is_input_side
from kpc.layout import set_memory_format
from kpc.modelcopy import detach_cached_tensors

log = logging.getLogger(__name__)

METHODS = ("taylor", "magnitude", "taylor-signed", "taylor-normalized", "consumer-l2")
# taylor: the paper's score, sum over a group's weights of |w * dL/dw|.
# taylor-signed: per layer |sum of w * dL/dw| (the loss change of removing the channel's weights in that layer,
#   torch-pruning's "multivariable"), summed over the group's layers.
# taylor-normalized: taylor divided by its mean over the group (every group's channels average 1).
# magnitude: sum of |w|, needs no data.
# consumer-l2: sum of w^2 over the weights that read the channel (the next layers' input slices), needs no
#   data; NVIDIA ModelOpt ranks channels this way. It orders channels within a group best when the knapsack's
#   values are measured (`sensitivity`), and poorly across groups when they are summed (benchmarks/oneshot.py).
# Images per forward/backward in the importance pass. The loss is a sum, so splitting a batch gives the
# same gradient; it bounds the activation memory (ResNet-50 at 224: 4.6 GB for 32 images at once, whose
# page faults cost as much system time as the compute), at no cost in speed.
MICRO_BATCH = 8
# Number format of the importance pass. auto: bf16 where the hardware computes it natively (a CPU with
# AVX512-BF16/AMX, a GPU with bf16 units), else fp32. The scores rank channels, and bf16 keeps their order
# where it matters (benchmarks/oneshot.py, "bf16" arm) at about half the time of the pass, most of a prune.
PRECISIONS = ("auto", "fp32", "bf16")


def needs_data(method: str, sensitivity: int | str = 0) -> bool:
    """Whether a prune with this score and sensitivity reads calibration images (auto: it may measure)."""
    return needs_gradients(method) or sensitivity == "auto" or sensitivity > 0  # type: ignore[operator]


def needs_gradients(method: str) -> bool:
    """Whether a score reads dL/dw (and so needs calibration data)."""
    return method.startswith("taylor")


class SizedCalibration:
    """Calibration batches that must have the example's image size, checked as they are read (re-iterable).

    Images of another size ran silently: the importance pass and the BatchNorm statistics were
    then those of another resolution than the one the model is pruned and costed for.
    """

    def __init__(self, source: Iterable[Any], size: Sequence[int]) -> None:
        self.source, self.size = source, tuple(int(d) for d in size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for index, (images, labels) in enumerate(as_batches(self.source)):
            if tuple(images.shape[1:]) != self.size:
                raise KpcError(f"calibration batch {index} holds images of shape {tuple(images.shape[1:])}, but "
                               f"example_inputs are {self.size}: give calibration images at the size the model is "
                               "pruned for (or example_inputs of the calibration's size)")
            yield images, labels


def as_batches(calibration: Iterable[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(images, labels or None) from a DataLoader or any iterable of image tensors or (images, labels) pairs."""
    for index, item in enumerate(calibration):
        labels = None
        if isinstance(item, dict):
            item = (item.get("image", item.get("images", item.get("pixel_values"))), item.get("label",
                                                                                              item.get("labels")))
        if isinstance(item, (tuple, list)):
            if not item:
                raise KpcError(f"calibration batch {index} is empty")
            images = item[0]
            labels = item[1] if len(item) > 1 and isinstance(item[1], torch.Tensor) else None
        else:
            images = item
        if not isinstance(images, torch.Tensor) or images.ndim < 2:
            raise KpcError(f"calibration batch {index} is a {type(images).__name__}, not a batch of images: give "
                           "tensors of shape (N, C, H, W) or (images, labels) pairs")
        if not images.is_floating_point():  # raw pixels (torchvision.io.read_image): the scale is the user's call
            raise KpcError(f"calibration batch {index} holds {str(images.dtype).removeprefix('torch.')} images: give "
                           "float images transformed as the model was trained (e.g. scaled to [0, 1] and "
                           "normalized)")
        if images.dtype != torch.float32:  # float64 or half from a user's pipeline: the model's weights are fp32
            images = images.float()
        if labels is not None and (labels.ndim != 1 or labels.dtype.is_floating_point):
            labels = None  # one-hot, soft or dense targets: use the model's own prediction
        yield images, labels


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise KpcError(f"unknown importance precision {precision!r}: use one of {', '.join(PRECISIONS)}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 or bf16: what `precision` (one of PRECISIONS) means on this device."""
    check_precision(precision)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    from exporters.device import cpu_bf16_native

    return "bf16" if device.type == "cpu" and cpu_bf16_native() else "fp32"


def accumulate_gradients(model: nn.Module, batches: Iterable[Any], *, limit: int | None = None,
                         progress: Callable[[], None] | None = None, precision: str = "auto") -> tuple[int, str]:
    """Sum dL/dw over the batches (at most `limit`); returns the images seen and the precision used.

    In bf16 the forward and backward run under autocast; the gradients land in the fp32
    weights' .grad as usual. A model with an op that has no bf16 kernel falls back to fp32.
    """
    model.eval()
    model.zero_grad(set_to_none=True)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    used = resolve_precision(precision, device)
    # NHWC runs oneDNN's and cuDNN's convolutions about 10% faster here (ResNet-50, 224, CPU: 2.7 against
    # 3.0 CPU-s per 8 images forward and backward), where the model runs in it (`_first_forward`); the model
    # is put back in its own layout afterwards.
    try:
        images, bf16 = _accumulate(model, batches, device, limit, progress, bf16=used == "bf16",
                                   strict=precision == "bf16")
        return images, "bf16" if bf16 else "fp32"
    finally:
        set_memory_format(model, torch.contiguous_format)


def _accumulate(model: nn.Module, batches: Iterable[Any], device: torch.device, limit: int | None,
                progress: Callable[[], None] | None, *, bf16: bool, strict: bool) -> tuple[int, bool]:
    images_seen = 0
    nhwc: bool | None = None  # decided on the first forward (`_first_forward`)
    with torch.enable_grad():
        for index, (images, labels) in enumerate(as_batches(batches)):
            if limit is not None and index >= limit:
                break
            for start in range(0, images.shape[0], MICRO_BATCH):
                chunk = images[start:start + MICRO_BATCH].to(device)
                # a tensor a module caches across calls (LeViT's attention biases in eval mode) holds the graph of
                # the forward that made it, which the previous backward freed: cut it loose before each forward
                detach_cached_tensors(model)
                if nhwc is None:
                    logits, bf16, nhwc = _first_forward(model, chunk, device, bf16=bf16, strict=strict)
                else:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        logits = model(_laid_out(chunk, nhwc))
                if not isinstance(logits, torch.Tensor):
                    raise KpcError(f"the model returns a {type(logits).__name__}, not a tensor of logits: Taylor "
                                   "importance needs logits (use importance='magnitude')")
                if logits.ndim != 2:
                    logits = logits.flatten(1)
                logits = logits.float()
                target = labels[start:start + MICRO_BATCH].to(device) if labels is not None else \
                    logits.detach().argmax(dim=1)
                if int(target.max()) >= logits.shape[1] or int(target.min()) < 0:
                    raise KpcError(f"the data has label {int(target.max())} but the model has {logits.shape[1]} "
                                   "outputs: set --num-classes")
                F.cross_entropy(logits, target, reduction="sum").backward()
            images_seen += images.shape[0]
            if progress is not None:
                progress()
    if images_seen == 0:
        raise KpcError("the calibration data produced no batches")
    return images_seen, bf16


def _laid_out(chunk: torch.Tensor, nhwc: bool) -> torch.Tensor:
    return chunk.contiguous(memory_format=torch.channels_last) if nhwc and chunk.ndim == 4 else chunk


def _first_forward(model: nn.Module, chunk: torch.Tensor, device: torch.device, *, bf16: bool, strict: bool
                   ) -> tuple[Any, bool, bool]:
    """The first forward of the importance pass, in the fastest layout and precision the model runs in.

    Returns the logits, whether bf16 is used and whether NHWC is. NHWC fails on a model that
    flattens with `x.view(x.size(0), -1)` ("view size is not compatible with input tensor's
    size and stride"): kpc then runs it in its own layout, as it would be served, instead of
    failing. bf16 fails where an op has no bf16 kernel: fp32 then, or an error if asked for bf16.
    """
    attempts = [(True, bf16), (False, bf16)] + ([(True, False), (False, False)] if bf16 else [])
    errors: dict[bool, str] = {}
    for nhwc, low in attempts:
        set_memory_format(model, torch.channels_last if nhwc else torch.contiguous_format)
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
                logits = model(_laid_out(chunk, nhwc))
        except Exception as exc:  # a kernel, a view or a numpy round trip that cannot run so: the next attempt
            errors[low] = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            if (nhwc, low) == attempts[-1]:
                raise
            if low and not nhwc and strict:
                raise KpcError(f"the model does not run in bf16 ({errors[low]}): use --importance-precision "
                               "fp32") from exc
            continue
        if not nhwc:
            log.debug("the model does not run in NHWC (%s): importance pass in its own layout", errors.get(low))
        if bf16 and not low:
            log.info("the model does not run in bf16 (%s): importance pass in fp32", errors[True])
        return logits, low, nhwc
    raise AssertionError("unreachable: the last attempt returns or raises")


@dataclass
class Scores:
    """Per-channel importance of every prunable group, and the groups that could not be scored."""

    values: dict[int, np.ndarray] = field(default_factory=dict)  # group index -> scores (float64, length = width)
    failed: dict[int, str] = field(default_factory=dict)  # group index -> why no score could be computed
    empty: list[int] = field(default_factory=list)  # groups whose score is zero (or non-finite) on every channel

    def __getitem__(self, index: int) -> np.ndarray:
        return self.values[index]

    def total(self) -> float:
        return float(sum(v.sum() for v in self.values.values()))


def scorer_for(method: str) -> Any:
    if method == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    if method == "taylor-signed":
        return tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None, multivariable=True)
    if method == "taylor-normalized":
        return tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer="mean")
    if method == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum", normalizer=None)
    if method == "consumer-l2":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
    raise KpcError(f"unknown importance {method!r}: use one of {', '.join(METHODS)}")


def score_groups(groups: Sequence[ChannelGroup], method: str) -> Scores:
    """Score every prunable group; a group whose score fails or has the wrong length is reported, not raised."""
    scorer = scorer_for(method)
    scores = Scores()
    for group in groups:
        if not group.prunable:
            continue
        try:
            tp_group = _without_grouped_conv_inputs(group.tp_group)
            if group.heads:
                tp_group = _projection_only(tp_group)
            if method == "consumer-l2":
                tp_group = _consumers(tp_group)
            value = scorer(tp_group)
        except Exception as exc:  # torch-pruning's scorer can fail on one exotic group: that group stays whole
            scores.failed[group.index] = f"importance failed ({type(exc).__name__} in torch-pruning)"
            continue
        values = np.zeros(group.width) if value is None else value.detach().double().cpu().numpy().reshape(-1)
        if values.size > group.width and not np.any(values[group.width:]):
            # torch-pruning sizes its sum by the first member's length, which through a concat (GhostNet's
            # primary+cheap halves) is longer than the root; scores land at root indices, the rest stays zero
            values = values[:group.width]
        if values.shape != (group.width,):
            scores.failed[group.index] = (f"importance maps to {values.size} channels for a group of {group.width} "
                                          "(a concat or slice torch-pruning cannot follow)")
            continue
        finite = np.isfinite(values)
        if not finite.any() or not np.any(values[finite] > 0):
            scores.empty.append(group.index)
        scores.values[group.index] = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    return scores


def _projection_only(tp_group: Any) -> Any:
    """An attention projection's own rows: torch-pruning maps its indices through the split into heads as if
    q, k and v were the outermost dimension, which for a head-major layout scores the wrong channels of the
    readers (`kpc.heads`); a head's rows alone score it the same way under every layout."""
    root = tp_group[0].dep.target.module
    return tp_compat.group_with_items(tp_group, [item for item in tp_group if item.dep.target.module is root])


def _consumers(tp_group: Any) -> Any:
    """The items of a group that read its channels (input sides); the whole group where none does."""
    items = [item for item in tp_group if is_input_side(item)]
    return tp_compat.group_with_items(tp_group, items) if items else tp_group


def _without_grouped_conv_inputs(tp_group: Any) -> Any:
    """The group minus the input side of grouped convs, whose weights the output side already counts.

    Grouped convs lose whole conv groups (see `kpc.groups`): removing a block removes its
    weight rows, which the group holding the conv's output channels scores. torch-pruning
    scores the input side by repeating one group's pattern across all groups, which would
    add the same amount to every block and count those weights twice.
    """
    items = [item for item in tp_group if not is_grouped_conv_input(item)]
    if len(items) == len(tp_group):
        return tp_group
    return tp_compat.group_with_items(tp_group, items)
