"""Measured sensitivity: what cutting one group to a width does to the model's output.

Summed first-order scores say which channels of a group matter least, and they order
channels within a group well; across groups they are a poor exchange rate. On a
Fashion-MNIST ResNet-18 at half the MACs, kpc's Taylor sums kept 83-87% one-shot where
NVIDIA ModelOpt, which measures each candidate width, kept 90% (benchmarks/RESULTS.md).

Here the knapsack's value of a width is measured instead: the group's least important
channels (by the importance ranking) are masked to zero, every other group stays whole,
and the divergence of the model's output from the unpruned output is read on the
calibration images. Zeroing a channel at the output of every layer that produces it is
what removing it does downstream, so no copy is built. A few widths per group are
measured and the rest interpolated; values never fall as a group widens.

The value of keeping width w is `divergence(smallest width) - divergence(w)`: larger is
better, the sum over groups is what the knapsack maximises (additive, as each group is
measured alone), plus a tie-break by summed importance far below any measured difference.
Ranked by consumer-l2 (`kpc.importance`), the same teacher kept 88.7-91.3% (validation) at
half the MACs (benchmarks/oneshot.py, three calibration samples).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kpc.batchnorm import batchnorm_layers, reestimate_statistics
from kpc.channels import ChannelGroup, tie_of
from kpc.devices import module_device
from kpc.importance import as_batches
from kpc.planner import GroupChoices, tie_widths

log = logging.getLogger(__name__)

# `sensitivity: auto` (the default): measure AUTO_POINTS widths per group when the measurement is estimated to take
# at most AUTO_SECONDS on this machine, else value the knapsack by summed importance. At half the MACs of a
# Fashion-MNIST ResNet-18, measured values kept 88-91% one-shot where summed ones kept 80-88%, and matched NVIDIA
# ModelOpt at its measured latency where the sums lost 2.4 points (benchmarks/RESULTS.md); the measurement costs
# two passes over the calibration images per width, seconds for a small model and a quarter of an hour for a
# ResNet-50 at 224 on two cores, which a default must not impose unasked.
AUTO_POINTS = 5
AUTO_SECONDS = 60.0

_LAST_DIM_CHANNELS = (nn.Linear, nn.LayerNorm, nn.Embedding)  # modules whose channels are the last dimension


class SensitivityUnavailable(Exception):
    """A group's channels could not be masked at a layer's output (its shape does not say where they are)."""


def _channel_masks(group: ChannelGroup, removed: Sequence[int], graph: Any) -> list[tuple[nn.Module, int, Any]]:
    """(module, output width, member channel indices to zero) for every layer that produces the group's channels."""
    removed_roots = {int(i) for i in removed}
    masks = []
    for item in group.tp_group:  # type: ignore[attr-defined]
        module = item.dep.target.module
        if not isinstance(module, nn.Module) or not graph.is_out_channel_pruning_fn(item.dep.handler):
            continue
        roots = getattr(item, "root_idxs", None) or item.idxs
        zeroed = sorted({int(i) for i, r in zip(item.idxs, roots, strict=True) if int(r) in removed_roots})
        if not zeroed:
            continue
        pruner = graph.get_pruner_of_module(module)
        width = pruner.get_out_channels(module) if pruner is not None else None
        masks.append((module, None if width is None else int(width), zeroed))
    return masks


def _channel_axis(module: nn.Module, shape: Sequence[int], width: int | None) -> int:
    """Where a layer's output keeps its channels: dimension 1 (NCHW) or the last (tokens, NHWC, linear).

    The axis whose size is the layer's width; where both are (a 16x16 map of 16 channels), the
    layer's kind decides: linear layers and LayerNorm over the last dimension, the rest (convs,
    BatchNorm, timm's LayerNorm2d) dimension 1.
    """
    candidates = [axis for axis in dict.fromkeys((1, len(shape) - 1)) if width is None or shape[axis] == width]
    if not candidates:
        raise SensitivityUnavailable(f"an output of shape {tuple(shape)} for {width} channels")
    if len(candidates) == 1:
        return candidates[0]
    last = isinstance(module, _LAST_DIM_CHANNELS) and not type(module).__name__.endswith("2d")
    return len(shape) - 1 if last else 1


def _zeroing_hook(width: int | None, zeroed: list[int]) -> Callable[..., torch.Tensor]:
    def hook(module: nn.Module, _inputs: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or output.ndim < 2:
            raise SensitivityUnavailable("an output that is not a tensor of channels")
        axis = _channel_axis(module, output.shape, width)
        mask = torch.ones(output.shape[axis], dtype=output.dtype, device=output.device)
        mask[zeroed] = 0
        shape = [1] * output.ndim
        shape[axis] = -1
        return output * mask.view(shape)

    return hook


class _Masked:
    """Hooks that zero one plan's removed channels for the duration of a `with` block."""

    def __init__(self, masks: list[tuple[nn.Module, int | None, list[int]]]) -> None:
        self.masks, self.handles = masks, []

    def __enter__(self) -> _Masked:
        for module, width, zeroed in self.masks:
            self.handles.append(module.register_forward_hook(_zeroing_hook(width, zeroed)))
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def cut(graph: Any, groups: Sequence[ChannelGroup], choice: GroupChoices, width: int) -> _Masked:
    """Inside the block the model computes as if `choice` were cut to `width` (its followers with it)."""
    kept = choice.kept_by_group(width)
    return _Masked([mask for index, indices in kept.items() for mask in _channel_masks(
        groups[index], sorted(set(range(groups[index].width)) - set(indices)), graph)])


def measured_widths(widths: np.ndarray, points: int) -> list[int]:
    """Positions (into `widths`) measured: evenly spread, the smallest included, the full width implied."""
    if len(widths) <= 1:
        return []
    spread = np.unique(np.round(np.linspace(0, len(widths) - 1, max(points, 1) + 1)).astype(int))
    return [int(i) for i in spread if i < len(widths) - 1]


def measured_passes(groups: Sequence[ChannelGroup], round_to: int, min_channels: int, points: int) -> int:
    """How many widths `points` per group measures over the prunable groups (each costs two passes)."""
    total = 0
    for group in groups:
        if group.prunable and group.tied_to is None:
            widths = tie_widths(tie_of(groups, group), round_to, min_channels)[group.index]
            total += len(measured_widths(widths, points))
    return total


def estimated_seconds(model: nn.Module, images: torch.Tensor, *, batches: int, widths: int, bf16: bool) -> float:
    """Seconds the measurement of `widths` widths would take: one timed forward of a calibration batch, scaled.

    The measurement runs the calibration batches once for the reference, twice for the unpruned
    divergence and twice per width (BatchNorm re-estimation, then the divergence). The faster of
    two timed forwards is the unit, so a first call's warm-up does not double the estimate.
    """
    device = module_device(model)
    images = images.to(device)
    was_training = model.training
    model.eval()
    best = float("inf")
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for _ in range(2):
                started = time.perf_counter()
                model(images)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - started)
    except Exception:  # a kernel without bf16: the measurement falls back to fp32 too (measure_values)
        if not bf16:
            raise
        return estimated_seconds(model, images, batches=batches, widths=widths, bf16=False)
    finally:
        model.train(was_training)
    return best * batches * (3 + 2 * widths)


def auto_decision(estimate: float, widths: int) -> tuple[int, str, str]:
    """What `sensitivity: auto` does for a measurement of `widths` widths estimated at `estimate` seconds.

    Returns the widths per group to measure (0: summed importance), the plan's record of the
    decision, and the line that tells the user.
    """
    if estimate <= AUTO_SECONDS:
        return (AUTO_POINTS, f"auto: measured, estimated {estimate:.0f} s",
                f"sensitivity auto: measuring {AUTO_POINTS} widths per group ({widths} in all, estimated "
                f"{estimate:.0f} s; --sensitivity 0 skips it)")
    return (0, f"auto: summed importance, measuring estimated {estimate:.0f} s",
            f"sensitivity auto: measuring {widths} widths would take about {estimate:.0f} s here (over "
            f"{AUTO_SECONDS:.0f} s): the knapsack uses summed importance; --sensitivity {AUTO_POINTS} measures "
            "anyway, for more accuracy straight after the prune")


def _divergence(model: nn.Module, inputs: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    """Mean KL divergence of the model's output distribution from the unpruned model's, per image."""
    total, count = 0.0, 0
    for images, reference in zip(inputs, references, strict=True):
        logits = model(images).flatten(1).float()
        total += float(F.kl_div(F.log_softmax(logits, dim=1), reference, log_target=True, reduction="sum"))
        count += images.shape[0]
    return total / max(count, 1)


class _RestatedBatchNorm:
    """BatchNorm statistics re-estimated on the calibration images inside the block, the model's own after it.

    A pruned model is used after its statistics are re-estimated (`kpc.batchnorm`), so a cut
    is judged as it will be used: without this, every later BatchNorm normalises by the
    unpruned model's statistics and a cut looks worse (or better) than it is.
    """

    def __init__(self, model: nn.Module, inputs: list[torch.Tensor]) -> None:
        self.model, self.inputs = model, inputs
        self.layers = batchnorm_layers(model)

    def __enter__(self) -> None:
        self.saved = [(layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone())
                      for layer in self.layers]
        reestimate_statistics(self.model, self.inputs, len(self.inputs))

    def __exit__(self, *_exc: object) -> None:
        for layer, (mean, var, tracked) in zip(self.layers, self.saved, strict=True):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            layer.num_batches_tracked.copy_(tracked)


def measure_values(model: nn.Module, graph: Any, groups: Sequence[ChannelGroup], choices: Sequence[GroupChoices],
                   calibration: Iterable[Any], *, batches: int, points: int, bf16: bool = False
                   ) -> dict[int, np.ndarray] | None:
    """Measured knapsack values for every choice (by leader index); None when some group cannot be masked.

    Each of a choice's `points` widths costs two passes over the calibration images (BatchNorm
    re-estimation, then the divergence). `bf16`: every pass, the unpruned reference included, under bf16 autocast.
    """
    device = module_device(model)
    inputs = [images.to(device) for index, (images, _) in enumerate(as_batches(calibration)) if index < batches]
    started = time.perf_counter()
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        try:
            references = [F.log_softmax(model(images).flatten(1).float(), dim=1) for images in inputs]
        except Exception as exc:  # a kernel without bf16: the unmasked model runs in fp32
            if not bf16:
                raise
            log.info("the model does not run in bf16 (%s): sensitivity measured in fp32", type(exc).__name__)
            return measure_values(model, graph, groups, choices, inputs, batches=batches, points=points,
                                  bf16=False)
        values: dict[int, np.ndarray] = {}
        with _RestatedBatchNorm(model, inputs):
            full = _divergence(model, inputs, references)  # what re-estimation alone changes
        passes = sum(len(measured_widths(c.widths, points)) for c in choices)
        log.info("measuring sensitivity: %d widths over %d groups, %d images each", passes, len(choices),
                 sum(i.shape[0] for i in inputs))
        every = max(1, -(-len(choices) // 10))  # about ten progress lines, however many groups
        for done, choice in enumerate(choices, start=1):
            positions = measured_widths(choice.widths, points)
            divergences = {len(choice.widths) - 1: full}
            for position in positions:
                try:
                    with cut(graph, groups, choice, int(choice.widths[position])), \
                            _RestatedBatchNorm(model, inputs):
                        divergences[position] = _divergence(model, inputs, references)
                except Exception as exc:  # the unmasked model ran: whatever fails here is the masking
                    reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
                    log.warning("sensitivity not measurable at %s (%s): the knapsack uses summed importance",
                                groups[choice.index].root, reason)
                    return None
            known = sorted(divergences)
            curve = np.interp(np.arange(len(choice.widths)), known, [divergences[k] for k in known])
            curve = np.maximum.accumulate(curve[::-1])[::-1]  # a narrower group never diverges less
            values[choice.index] = curve[0] - curve
            if done % every == 0 and done < len(choices):
                log.info("sensitivity: %d/%d groups measured (%.0f s)", done, len(choices),
                         time.perf_counter() - started)
    log.info("sensitivity measured in %.1f s", time.perf_counter() - started)
    return _with_tie_break(values, choices)


def _with_tie_break(values: dict[int, np.ndarray], choices: Sequence[GroupChoices]) -> dict[int, np.ndarray] | None:
    """Measured values plus a tie-break by summed importance that never outweighs a measured difference.

    A width whose cut the output does not notice measures the same as the full width; with
    nothing to gain from a wider group the knapsack would leave the budget unspent (a
    mobilenet_v3_large landed at 31% of a 50% FLOPs budget). The summed importance kept,
    scaled to a ten-thousandth of the largest measured value over all groups together, makes
    every wider option worth a little more. None (summed importance instead) when no cut
    changed the output at all: an untrained network whose outputs are all near zero.
    """
    scale = max((float(v.max()) for v in values.values()), default=0.0)
    if not scale > 1e-9:
        log.warning("no cut changed the model's output measurably (an untrained network?): the knapsack uses summed "
                    "importance")
        return None
    share = 1e-4 * scale / max(len(choices), 1)
    for choice in choices:
        summed = np.asarray(choice.values, dtype=np.float64)
        top = float(summed[-1]) if len(summed) and summed[-1] > 0 else 0.0
        kept = summed / top if top > 0 else choice.widths / choice.widths[-1]
        values[choice.index] = values[choice.index] + share * kept
    return values
