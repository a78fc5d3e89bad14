"""Coverage: every zoo model prunes, runs, keeps its output shape and respects the budget.

Groups that cannot be pruned safely must be left whole (and say why), never break the network.
"""

from __future__ import annotations

import time

import pytest

from kpc.artifact import open_model
from kpc.costs import count_macs
from kpc.data import parse_data_spec
from kpc.prune import Budget, PruneSettings, prune

# (spec, budget ratio): models whose groups are mostly unsafe to prune (mixed-kernel splits,
# channel shuffles) get a budget their safe groups can reach.
ZOO = [
    ("torchvision:resnet18", 0.8),
    ("torchvision:resnet50", 0.8),
    ("torchvision:mobilenet_v3_large", 0.8),
    ("torchvision:efficientnet_b0", 0.8),
    ("torchvision:regnet_y_400mf", 0.8),
    ("torchvision:convnext_tiny", 0.8),
    ("torchvision:shufflenet_v2_x1_0", 0.9),
    ("torchvision:vit_b_16", 0.8),
    ("timm:mixnet_s", 0.95),
    ("timm:cspresnet50", 0.8),
]
SIZE = (3, 64, 64)


@pytest.mark.parametrize(("spec", "ratio"), ZOO, ids=[s for s, _ in ZOO])
def test_zoo_model_prunes_and_runs(spec, ratio):
    started = time.perf_counter()
    loaded = open_model(spec, num_classes=10, input_size=SIZE)
    settings = PruneSettings(data=parse_data_spec("synthetic"), calib_batches=1, calib_batch_size=2)
    messages: list[str] = []
    result = prune(loaded, Budget(ratio=ratio), settings, log=messages.append)
    example = loaded.example_input()
    assert result.model(example).shape == loaded.model(example).shape
    counted, _ = count_macs(result.model, example)
    assert counted <= result.round["limit"] * 1e9 * (1 + 1e-9)
    whole = [g for g in result.round["groups"] if not g["prunable"]]
    assert all(g["reason"] for g in whole), "every group left whole says why"
    assert any(g["kept_width"] < g["width"] for g in result.round["groups"]), "something was pruned"
    print(f"{spec}: {len(result.round['groups'])} groups, {len(whole)} whole, "
          f"{time.perf_counter() - started:.1f} s")
