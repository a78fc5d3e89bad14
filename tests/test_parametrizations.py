"""Parametrized weights (weight_norm, spectral_norm, torch.nn.utils.prune masks): baked into plain weights,
then pruned like any other."""

from __future__ import annotations

import json
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import kpc
from kpc.parametrizations import bake, parametrized_weights


class NormedNet(nn.Module):
    """Every kind torch offers: weight_norm and spectral_norm, as parametrizations and as the older hooks."""

    def __init__(self) -> None:
        super().__init__()
        with warnings.catch_warnings():  # the hook-based norms are deprecated, and still in models people have
            warnings.simplefilter("ignore")
            self.c1 = parametrizations.weight_norm(nn.Conv2d(3, 32, 3, padding=1))
            self.c2 = parametrizations.spectral_norm(nn.Conv2d(32, 48, 3, stride=2, padding=1))
            self.c3 = nn.utils.weight_norm(nn.Conv2d(48, 48, 3, padding=1))
            self.c4 = nn.utils.spectral_norm(nn.Conv2d(48, 64, 1))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.c1, self.c2, self.c3, self.c4):
            x = F.leaky_relu(conv(x), 0.2)
        return self.fc(x.mean((2, 3)))


def _net() -> NormedNet:
    torch.manual_seed(0)
    return NormedNet().eval()


def test_baking_keeps_what_the_model_computes_and_leaves_plain_trainable_weights():
    model, example = _net(), torch.randn(2, 3, 16, 16)
    assert len(parametrized_weights(model)) == 4
    with torch.no_grad():
        before = model(example)
    assert len(bake(model)) == 4 and parametrized_weights(model) == [] and bake(model) == []
    with torch.no_grad():
        torch.testing.assert_close(model(example), before, rtol=1e-5, atol=1e-6)
    for conv in (model.c1, model.c2, model.c3, model.c4):
        assert isinstance(conv.weight, nn.Parameter) and conv.weight.requires_grad
        assert {n for n, _ in conv.named_parameters()} == {"weight", "bias"}


def test_a_normed_network_prunes_to_its_budget_and_loads_back_onto_a_fresh_instance(tmp_path):
    model, example = _net(), torch.randn(1, 3, 16, 16)
    result = kpc.prune(model, example, kpc.Budget(ratio=0.5))
    convs = [g for g in result.round.groups if g.root.startswith("c")]
    assert len(convs) == 4 and all(g.prunable for g in convs), [(g.root, g.reason) for g in convs]
    assert result.round.landed and any(g.pruned for g in convs)
    assert parametrized_weights(model) == parametrized_weights(_net()), "the caller's model is untouched"
    with torch.no_grad():  # and still computes (baking a copy once deleted the weight property of its class)
        torch.testing.assert_close(model(example), _net()(example))
    assert result.round.baked_weights == ["c1.weight", "c2.weight", "c3.weight (weight_norm)",
                                          "c4.weight (spectral_norm)"]
    out = kpc.save(result, tmp_path / "child")
    assert json.loads((out / "plan.json").read_text())["format"] == "kpc-artifact/3"  # /2 readers would not bake
    reloaded = kpc.load(out, model=_net()).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(example), result.model.eval()(example))


def _masked_net() -> nn.Sequential:
    """Layers a user pruned with torch's own utility: an unstructured L1 mask and a structured one (on the bias too)."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 48, 3, stride=2, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                          nn.Conv2d(48, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 10))
    prune.l1_unstructured(model[3], "weight", amount=0.5)
    prune.ln_structured(model[6], "weight", amount=0.25, n=2, dim=0)
    prune.l1_unstructured(model[6], "bias", amount=0.25)
    return model.eval()


def test_torch_prune_masks_are_applied_and_the_network_prunes_and_reloads(tmp_path):
    """Before: torch-pruning sliced the mask hook's plain `weight` ("cannot assign 'torch.FloatTensor' as parameter
    'weight'") and every group through a masked layer was left whole."""
    model, example = _masked_net(), torch.randn(2, 3, 16, 16)
    assert parametrized_weights(model) == ["3.weight (torch.nn.utils.prune mask)",
                                           "6.weight (torch.nn.utils.prune mask)", "6.bias (torch.nn.utils.prune mask)"]
    result = kpc.prune(model, example, kpc.Budget(ratio=0.5))
    convs = [g for g in result.round.groups if g.root in ("0", "3")]
    assert all(g.prunable for g in convs) and any(g.pruned for g in convs), [(g.root, g.reason) for g in convs]
    assert result.round.landed and len(result.round.baked_weights) == 3
    assert len(parametrized_weights(model)) == 3, "the caller's model keeps its masks"
    with torch.no_grad():
        torch.testing.assert_close(model(example), _masked_net()(example))
    reloaded = kpc.load(kpc.save(result, tmp_path / "child"), model=_masked_net()).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(example), result.model.eval()(example))
    baked = _masked_net()
    bake(baked)
    with torch.no_grad():
        torch.testing.assert_close(baked(example), model(example))
    assert (baked[3].weight == 0).float().mean() >= 0.5, "the mask's zeros are in the plain weight"
