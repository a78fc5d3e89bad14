"""Find a network's top-level stages, the points where inner distillation compares features.

The rule (generic; no per-architecture tables):

1. Run the model once on an example input with a forward hook on every module, recording
   each module's output shape and the order modules first run.
2. Walk the module tree from the root, over children in execution order, keeping
   *blocks*: modules that have parameters, are not a single layer (a lone conv/BN/linear
   is stem or head, not a block) and output a 4-D feature map. A block whose own children
   output more than one spatial resolution spans several stages (torchvision's
   `features`, timm's `blocks`) and is opened up: its children are walked instead.
3. Split the blocks into runs of equal output resolution. Keep every *stage container*
   (a Sequential/ModuleList of blocks, e.g. ResNet's layer1..layer4, EfficientNet's
   stages) and the last block of each run (the block after which the resolution changes,
   e.g. MobileNetV3's InvertedResidual before each stride-2 block, and the final 1x1 conv).
4. A network with no blocks at all (every layer an attribute of the model itself, as a
   hand-written CNN's often are) takes its layers as the blocks: the last layer with a 4-D
   output before each change of resolution. Without this, `kpc distill` with its defaults
   refused such a network ("no stages") and asked for --ikd-weight 0.

On ResNet-18 this gives layer1..layer4 (torchvision and timm); on torchvision
MobileNetV3-Large features.1, .3, .6, .12 and .16; on timm EfficientNet every
`blocks` child; on a flat user CNN (conv, GroupNorm, ... as attributes) the last norm of
each resolution. A model with no 4-D features (a ViT) has no stages.
"""

from __future__ import annotations

import torch
from torch import nn


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_leaf(module: nn.Module) -> bool:
    return not any(_has_params(child) for child in module.children())


def _record(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, tuple[int, ...] | None], dict[str, int]]:
    shapes: dict[str, tuple[int, ...] | None] = {}
    order: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def record(_module: nn.Module, _inputs: object, output: object) -> None:
            if name not in order:
                order[name] = len(order)
                shapes[name] = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        return record

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return shapes, order


def find_stages(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules after which inner distillation compares child and parent features."""
    shapes, order = _record(model, example)

    def resolution(name: str) -> tuple[int, ...] | None:
        shape = shapes.get(name)
        return shape[-2:] if shape is not None and len(shape) == 4 else None

    def executed_children(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
        kids = [(f"{prefix}.{n}" if prefix else n, c) for n, c in module.named_children()]
        kids = [(n, c) for n, c in kids if n in order]
        return sorted(kids, key=lambda item: order[item[0]])

    def blocks(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
        found: list[tuple[str, nn.Module]] = []
        for name, child in executed_children(prefix, module):
            if not _has_params(child) or _is_leaf(child) or resolution(name) is None:
                continue
            inner = {resolution(n) for n, _ in executed_children(name, child)} - {None}
            if len(inner) > 1:
                found.extend(blocks(name, child))
            else:
                found.append((name, child))
        return found

    trunk = blocks("", model)
    if not trunk:  # a flat network: its layers are its blocks, and a stage ends where the resolution changes
        trunk = sorted(((n, m) for n, m in model.named_modules() if n in order and _has_params(m) and _is_leaf(m)
                        and resolution(n) is not None), key=lambda item: order[item[0]])
    stages: list[str] = []
    for index, (name, module) in enumerate(trunk):
        last_of_run = index + 1 == len(trunk) or resolution(trunk[index + 1][0]) != resolution(name)
        container = isinstance(module, nn.Sequential | nn.ModuleList) and all(
            not _is_leaf(c) for c in module.children() if _has_params(c))
        if container or last_of_run:
            stages.append(name)
    return stages


def stage_channels(model: nn.Module, example: torch.Tensor, stages: list[str]) -> dict[str, int]:
    """Output channels of each stage (to size the child->parent projections)."""
    shapes, _ = _record(model, example)
    return {name: int(shapes[name][1]) for name in stages if shapes.get(name) is not None}  # type: ignore[index]
