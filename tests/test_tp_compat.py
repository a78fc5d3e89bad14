"""The indexed duplicate check answers exactly what torch-pruning's scan answers.

`tp_compat` replaces `Group.has_pruning_op` (a linear scan per call, quadratic per traced
group) by a set lookup. Groups traced through it must be the ones the scan would trace: same
items, same indices, and the same verdict for every (node, handler, indices) asked.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency.group import Group

from kpc import tp_compat
from kpc.groups import build_graph


class SplitAndConcat(nn.Module):
    """A residual stream with a concat of two branches and a chunk: every mapper in one group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.left = nn.Conv2d(16, 8, 1)
        self.right = nn.Conv2d(16, 8, 1)
        self.mix = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.mix(torch.cat([self.left(x), self.right(x)], dim=1))
        first, _ = torch.chunk(x, 2, dim=1)
        return self.head(first.mean((2, 3)))


def _traced(graph: tp.DependencyGraph, module: nn.Module) -> list[tuple[int, str, list[int]]]:
    group = graph.get_pruning_group(module, tp.prune_conv_out_channels, list(range(module.out_channels)))
    return [(id(item.dep.target), str(item.dep.handler), list(item.idxs)) for item in group]


def test_the_indexed_check_traces_the_groups_the_scan_traces():
    model = SplitAndConcat().eval()
    graph = build_graph(model, torch.randn(1, 3, 8, 8))
    indexed = Group.has_pruning_op
    assert getattr(indexed, "__kpc_indexed__", False), "install() replaces the scan"
    convs = [model.stem, model.left, model.right, model.mix]
    with_index = [_traced(graph, conv) for conv in convs]
    Group.has_pruning_op = indexed.__wrapped__
    try:
        with_scan = [_traced(graph, conv) for conv in convs]
    finally:
        Group.has_pruning_op = indexed
    assert with_index == with_scan
    assert max(len(items) for items in with_index) >= 6, "the stem's group reaches the concat, chunk and head"


def test_the_indexed_check_agrees_with_the_scan_item_by_item_and_after_a_replacement():
    model = SplitAndConcat().eval()
    graph = build_graph(model, torch.randn(1, 3, 8, 8))
    group = graph.get_pruning_group(model.stem, tp.prune_conv_out_channels, list(range(16)))
    scan = Group.has_pruning_op.__wrapped__
    for item in group:
        idxs = list(item.idxs)
        assert group.has_pruning_op(item.dep, idxs) and scan(group, item.dep, idxs)
        assert not group.has_pruning_op(item.dep, idxs[:-1]) and not scan(group, item.dep, idxs[:-1])
    first = group[0]
    group[0] = type(first)(dep=first.dep, idxs=[0])  # an item changed in place must not leave a stale key
    assert group.has_pruning_op(first.dep, [0]) == scan(group, first.dep, [0]) is True
    full = list(range(16))
    assert group.has_pruning_op(first.dep, full) == scan(group, first.dep, full)


def test_install_is_idempotent_and_keeps_one_wrapper():
    tp_compat.install()
    indexed = Group.has_pruning_op
    tp_compat._index_duplicate_checks()
    assert Group.has_pruning_op is indexed
    assert not getattr(indexed.__wrapped__, "__kpc_indexed__", False)


def test_a_mapping_that_goes_round_a_cycle_is_stopped_with_its_node():
    """deepseek_vit's rotary attention: each qkv group's indices came back shifted through unbind and concat,
    without end, and every block ran into the 10 s limit (32 blocks: the whole discovery budget)."""
    import timm

    from kpc.groups import discover_groups

    model = timm.create_model("deepseek_vit_412m", depth=1, embed_dim=64, num_heads=2, img_size=28,
                              num_classes=10).eval()
    example = torch.randn(1, 3, 28, 28)
    groups = {g.root: g for g in discover_groups(model, build_graph(model, example), never_prune={"head"})}
    qkv = groups["encoder.blocks.0.attn.qkv"]
    assert not qkv.prunable and "does not settle" in qkv.reason, qkv.reason
    assert groups["encoder.blocks.0.mlp.fc1"].prunable and groups["encoder.blocks.0.mlp.fc2"].prunable
