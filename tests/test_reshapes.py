"""Reshapes that keep channel indices where they are, and convs that run along the channels (ECA).

torch-pruning mapped ECA's `(B, C) -> (B, 1, C)` as a flatten of stride C, so every group
through an ECA gate grew C-fold while traced: a 2,048-channel stage took minutes and was left
whole at the time limit (ecaresnetlight, eca_nfnet_l0). The ECA conv itself (one input and one
output channel, sliding along the channels) has nothing to prune.
"""

from __future__ import annotations

import time

import torch
from timm.layers import EcaModule
from torch import nn

import kpc
from kpc import tp_compat
from kpc.groups import build_graph, channel_axis_convs, discover_groups


class EcaNet(nn.Module):
    def __init__(self, width: int = 512, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.eca = EcaModule(width)
        self.body = nn.Sequential(nn.Conv2d(width, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.eca(self.stem(x))).mean((2, 3)))


def test_an_eca_gate_keeps_the_channels_of_the_group_it_gates():
    model = EcaNet().eval()
    example = torch.randn(1, 3, 16, 16)
    assert channel_axis_convs(model) == [model.eca.conv]
    graph = build_graph(model, example)
    assert len(tp_compat.kept_channel_reshapes(graph)) >= 2, "both views around the ECA conv keep the channels"
    started = time.perf_counter()
    groups = {g.root: g for g in discover_groups(model, graph)}
    assert time.perf_counter() - started < 5, "a 512-channel group through ECA traced without blowing up"
    stem = groups["stem.0"]
    assert stem.prunable and stem.width == 512 and "body.0<" in stem.layers, stem


def test_a_model_with_eca_prunes_through_the_gate_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = EcaNet(width=64).eval()
    example = torch.randn(1, 3, 16, 16)
    result = kpc.prune(model, example_inputs=example, budget=kpc.Budget(ratio=0.5), importance="magnitude",
                       round_to=8, min_channels=8)
    assert {g.root for g in result.round.groups if not g.prunable} == {"head"}
    assert any(g.pruned for g in result.round.groups) and result.round.landed
    reloaded = kpc.load(kpc.save(result, tmp_path / "child"), model=EcaNet(width=64))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))


def test_cutting_the_gated_stream_leaves_the_eca_conv_as_it_is():
    from kpc.apply import apply_kept

    model = EcaNet(width=64).eval()
    weight = model.eca.conv.weight.detach().clone()
    apply_kept(model, torch.randn(1, 3, 16, 16), {"stem.0": (64, list(range(0, 64, 4)))})
    assert model.stem[0].out_channels == model.body[0].in_channels == 16
    assert torch.equal(model.eca.conv.weight, weight), "the conv along the channels takes any number of them"
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
