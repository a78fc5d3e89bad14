"""Channel importance: first-order Taylor |w * dL/dw| or weight magnitude, summed over a group.

Gradients are accumulated over all calibration batches before scoring (as in the
paper's code), BN stays in eval mode, and scores are not normalised per layer: a raw
score is comparable across the whole network, which is what lets one knapsack trade
channels of different layers against each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from kpc.errors import KpcError
from kpc.groups import ChannelGroup, is_grouped_conv_input

METHODS = ("taylor", "magnitude")


def accumulate_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                         *, progress=None) -> int:
    """Sum dL/dw over the batches; unlabeled batches use the model's own prediction as target."""
    model.eval()
    model.zero_grad(set_to_none=True)
    images_seen = 0
    for images, labels in batches:
        logits = model(images)
        if logits.ndim != 2:
            logits = logits.flatten(1)
        target = labels if labels is not None else logits.detach().argmax(dim=1)
        if target.max() >= logits.shape[1]:
            raise KpcError(f"data has label {int(target.max())} but the model has {logits.shape[1]} outputs: "
                           "set --num-classes")
        loss = F.cross_entropy(logits, target, reduction="sum")
        loss.backward()
        images_seen += images.shape[0]
        if progress is not None:
            progress()
    if images_seen == 0:
        raise KpcError("calibration data produced no batches")
    return images_seen


def score_groups(groups: Sequence[ChannelGroup], method: str) -> dict[int, np.ndarray]:
    """Per-channel importance of every prunable group (index -> scores, float64, length = width)."""
    if method == "taylor":
        scorer = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    elif method == "magnitude":
        scorer = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum", normalizer=None)
    else:
        raise KpcError(f"unknown importance {method!r}: use one of {', '.join(METHODS)}")
    scores: dict[int, np.ndarray] = {}
    for group in groups:
        if not group.prunable:
            continue
        value = scorer(_without_grouped_conv_inputs(group.tp_group))
        values = np.zeros(group.width) if value is None else value.detach().double().cpu().numpy()
        if values.shape != (group.width,):
            raise RuntimeError(f"importance of {group.root} has shape {values.shape}, expected ({group.width},)")
        scores[group.index] = np.nan_to_num(values, nan=0.0, posinf=0.0)
    return scores


def _without_grouped_conv_inputs(tp_group):
    """The group minus the input side of grouped convs, whose weights the output side already counts.

    Grouped convs lose whole conv groups (see `kpc.groups`): removing a block removes its
    weight rows, which the group holding the conv's output channels scores. torch-pruning
    scores the input side by repeating one group's pattern across all groups, which would
    add the same amount to every block and count those weights twice.
    """
    items = [item for item in tp_group if not is_grouped_conv_input(item)]
    if len(items) == len(tp_group):
        return tp_group
    filtered = tp.dependency.Group()
    filtered._group = items
    filtered._DG = getattr(tp_group, "_DG", None)
    return filtered
