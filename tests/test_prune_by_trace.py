"""Safety trials prune copies by the groups traced on the original (`kpc.apply.prune_by_trace`).

The shortcut must cut exactly what tracing the copy again and pruning group after group cuts
(`apply_kept`, the path a plan's replay takes), also through concats, splits, depthwise and
grouped convs, where the groups' indices meet in one layer.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from kpc.apply import apply_kept, prune_by_trace
from kpc.modelcopy import copy_model
from kpc.pruning import analyse_groups
from kpc.safety import probe_kept

MODELS = {
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=10),  # (C, 1, 1) layer scales
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),  # dense concats
    "ghostnet_100": lambda: timm.create_model("ghostnet_100", num_classes=10),  # concat then slice
    "regnety_008": lambda: timm.create_model("regnety_008", num_classes=10),  # grouped convs, SE
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pruning_by_the_trace_cuts_what_tracing_the_copy_cuts(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    example = torch.randn(1, 3, 32, 32)
    _graph, groups = analyse_groups(model, example, round_to=8, min_channels=8)
    chosen = [g for g in groups if g.prunable and g.heads is None]
    assert len(chosen) >= 5
    keep = probe_kept(8, 8)
    kept = {g.root: (g.width, keep(g)) for g in chosen}
    traced, retraced = copy_model(model), copy_model(model)
    prune_by_trace(traced, model, [(g.tp_group, [i for i in range(g.width) if i not in set(kept[g.root][1])])
                                   for g in chosen])
    apply_kept(retraced, example, kept)
    shapes = {k: v.shape for k, v in retraced.state_dict().items()}
    assert {k: v.shape for k, v in traced.state_dict().items()} == shapes
    assert sum(v.numel() for v in traced.state_dict().values()) < sum(v.numel() for v in model.state_dict().values())
    with torch.no_grad():
        torch.testing.assert_close(traced(example), retraced(example))


def test_safety_trials_by_the_trace_keep_layer_scales_prunable():
    """torch-pruning's pruners are shared and told which axis to cut just before each call; trials that
    skipped that cut a (C, 1, 1) layer scale along the wrong axis and left every ConvNeXt stream whole."""
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(num_classes=10).eval()
    _graph, groups = analyse_groups(model, torch.randn(1, 3, 32, 32), round_to=8, min_channels=8)
    unsafe = [(g.root, g.reason) for g in groups if not g.prunable and g.root != "classifier.2"]
    assert not unsafe
