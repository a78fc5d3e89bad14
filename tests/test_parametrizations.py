"""Parametrized weights (weight_norm, spectral_norm): baked into plain weights, then pruned like any other."""

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
