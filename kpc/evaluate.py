"""Top-1 accuracy of a model on a data spec's validation split: the figure a deployment gate compares."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from kpc.data import DataSpec, load_dataset
from kpc.errors import KpcError


def evaluate_accuracy(model: nn.Module, data: DataSpec, input_size: tuple[int, int, int], *,
                      subset: int | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Accuracy (percent) and mean cross-entropy over the first `subset` validation images (all by default)."""
    loaded = load_dataset(data, "val", input_size)
    if not loaded.labeled:
        raise KpcError(f"data {data.label()} has no labels: accuracy needs a labeled validation split")
    dataset = loaded.dataset if subset is None else Subset(loaded.dataset, range(min(subset, len(loaded.dataset))))
    model.eval()
    correct = seen = 0
    loss = 0.0
    with torch.no_grad():
        for images, labels in DataLoader(dataset, batch_size=batch_size):
            logits = model(images)
            if logits.shape[-1] <= int(labels.max()):
                raise KpcError(f"the model has {logits.shape[-1]} outputs but {data.label()} has label "
                               f"{int(labels.max())}: set num_classes")
            loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
            seen += len(labels)
    return {"top1": 100.0 * correct / seen, "loss": loss / seen, "images": seen}
