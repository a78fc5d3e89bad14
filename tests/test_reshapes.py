"""Reshapes that keep channel indices where they are, and layers that run along another axis (ECA, token mixing).

torch-pruning mapped ECA's `(B, C) -> (B, 1, C)` as a flatten of stride C, so every group
through an ECA gate grew C-fold while traced: a 2,048-channel stage took minutes and was left
whole at the time limit (ecaresnetlight, eca_nfnet_l0). The ECA conv itself (one input and one
output channel, sliding along the channels) has nothing to prune. Likewise an MLP-Mixer's
token-mixing Linear reads the tokens after a transpose: torch-pruning coupled its input
features with the channels, and every residual-stream group of those models broke.
"""

from __future__ import annotations

import time

import torch
from timm.layers import EcaModule
from torch import nn

import kpc
from kpc import tp_compat
from kpc.axes import channel_axis_convs
from kpc.groups import build_graph, discover_groups


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


class TinyMixer(nn.Module):
    """Patch embedding, then token mixing (a Linear along the tokens, after a transpose) and channel mixing."""

    def __init__(self, dim: int = 32, tokens: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1 = nn.LayerNorm(dim)
        self.tokens_fc1 = nn.Linear(tokens, 24)
        self.tokens_fc2 = nn.Linear(24, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.channels_fc1 = nn.Linear(dim, 64)
        self.channels_fc2 = nn.Linear(64, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)  # (B, tokens, dim): channels last from here
        mixed = self.tokens_fc2(torch.nn.functional.gelu(self.tokens_fc1(self.norm1(x).transpose(1, 2))))
        x = x + mixed.transpose(1, 2)
        x = x + self.channels_fc2(torch.nn.functional.gelu(self.channels_fc1(self.norm2(x))))
        return self.head(x.mean(1))


def test_token_mixing_linears_are_found_and_the_channels_pass_through_them(tmp_path):
    from kpc.axes import lengthwise_linears

    model = TinyMixer().eval()
    example = torch.randn(1, 3, 16, 16)
    assert lengthwise_linears(model, example) == [model.tokens_fc1, model.tokens_fc2], \
        "the channel MLP and the head read channels; the stem's flatten-then-transpose is not a token axis"
    result = kpc.prune(model, example_inputs=example, budget=kpc.Budget(ratio=0.6), importance="magnitude",
                       round_to=8, min_channels=8)
    assert {g.root for g in result.round.groups if not g.prunable} == {"head"}, \
        {g.root: g.reason for g in result.round.groups}
    assert result.model.tokens_fc1.in_features == 16, "the token axis is never cut"
    reloaded = kpc.load(kpc.save(result, tmp_path / "child"), model=TinyMixer())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))


class GatedMixer(nn.Module):
    """A gated token MLP (chunk along the tokens of `(B, C, N)`) beside a gated channel MLP (chunk along C).

    Both chunks use `dim=-1`, which autograd saves as an unsigned 2**64 - 1; one cuts tokens, the
    other channels. With 32 hidden tokens and 32 hidden channels, the sizes alone cannot tell them apart.
    """

    def __init__(self, dim: int = 32, tokens: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1 = nn.LayerNorm(dim)
        self.tokens_fc1 = nn.Linear(tokens, 2 * dim)
        self.tokens_fc2 = nn.Linear(dim, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.channels_fc1 = nn.Linear(dim, 2 * dim)
        self.channels_fc2 = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        gate, value = self.tokens_fc1(self.norm1(x).transpose(1, 2)).chunk(2, dim=-1)
        x = x + self.tokens_fc2(torch.sigmoid(gate) * value).transpose(1, 2)
        gate, value = self.channels_fc1(self.norm2(x)).chunk(2, dim=-1)
        x = x + self.channels_fc2(torch.nn.functional.silu(gate) * value)
        return self.head(x.mean(1))


def test_a_chunk_along_the_tokens_passes_the_channels_and_a_chunk_along_the_channels_cuts_them(tmp_path):
    model = GatedMixer().eval()
    example = torch.randn(1, 3, 16, 16)
    groups = discover_groups(model, build_graph(model, example))
    stream = next(g for g in groups if "stem" in g.layers)
    assert stream.prunable and stream.width == 32, stream
    assert {"channels_fc1<", "channels_fc2", "head<", "norm1", "norm2"} <= set(stream.layers), stream.layers
    assert max(len(item.idxs) for item in stream.tp_group) == 32, "no index shifted past the stream's channels"
    result = kpc.prune(model, example_inputs=example, budget=kpc.Budget(ratio=0.6), importance="magnitude",
                       round_to=8, min_channels=8)
    assert {g.root for g in result.round.groups if not g.prunable} == {"head"}, \
        {g.root: g.reason for g in result.round.groups}
    child = result.model
    assert child.tokens_fc1.in_features == 16 and child.tokens_fc2.out_features == 16, "the token axis is never cut"
    assert child.channels_fc1.out_features == 2 * child.channels_fc2.in_features, "both halves of the gate cut alike"
    reloaded = kpc.load(kpc.save(result, tmp_path / "child"), model=GatedMixer())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(x), child(x))


def test_an_attention_model_whose_views_refactor_the_spatial_dims_traces_every_group():
    """EfficientViM views `(B, C, H*W) <-> (B, C, H, W)` and its attention biases `(N,) -> (1, N, 1)`.

    torch-pruning mapped those views as flattens with strides guessed from nearby layers, so
    index lists grew past 390,000 entries: 36 of 45 groups hit their time limit (120 s in all).
    """
    import timm

    model = timm.create_model("efficientvim_m1", num_classes=10).eval()
    graph = build_graph(model, torch.randn(1, 3, 64, 64))
    groups = discover_groups(model, graph)
    assert not [g.reason for g in groups if "traced" in (g.reason or "")], "every group traced in time"
    widest_layer = max(max(getattr(m, "out_channels", 0), getattr(m, "out_features", 0)) for m in model.modules())
    assert max(len(item.idxs) for g in groups if g.tp_group for item in g.tp_group) <= widest_layer
    assert sum(g.prunable for g in groups) >= 10, {g.root: g.reason for g in groups}


def test_a_view_that_is_no_flatten_of_the_channels_leaves_its_groups_whole_with_the_reason():
    """torch-pruning gives any view whose neighbours' widths differ a flatten stride.

    Swin's relative position bias goes `(2401, heads) -> (49, 49, heads)`; a guessed stride
    mapped it (and on swin_v2_b made index lists 32-fold longer: 120 of a 135 s prune). Such a
    view is reported and the groups through it stay whole; a true flatten keeps its mapping.
    """
    import torchvision

    model = torchvision.models.swin_t(num_classes=10).eval()
    groups = discover_groups(model, build_graph(model, torch.randn(1, 3, 64, 64)))
    unmapped = [g for g in groups if "moves the channels in a way kpc cannot map" in (g.reason or "")]
    assert unmapped and all(not g.prunable for g in unmapped), {g.root: g.reason for g in groups}
    assert "(2401, 24) -> (49, 49, 24)" in unmapped[0].reason
    assert sum(g.prunable for g in groups) >= len(groups) - 2, "the other groups are still followed"


class FlattenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


def test_a_flatten_of_nchw_channels_keeps_its_stride():
    model = FlattenHead().eval()
    groups = {g.root: g for g in discover_groups(model, build_graph(model, torch.randn(1, 3, 4, 4)))}
    conv = groups["conv"]
    assert conv.prunable and "fc<" in conv.layers, conv
    fc_input = next(item for item in conv.tp_group if item.dep.target.module is model.fc)
    assert sorted(fc_input.idxs) == list(range(128)), "each channel owns its 16 flattened features"


class PixelShuffleNet(nn.Module):
    """A super-resolution body (conv of 4x channels, PixelShuffle(2)), then PixelUnshuffle(2) and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(32, 64 * 4, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU())
        self.after = nn.Sequential(nn.Conv2d(64, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU())
        self.tail = nn.Sequential(nn.Conv2d(256, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU())
        self.fc = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.after(nn.functional.pixel_shuffle(self.expand(self.stem(x)), 2))
        x = self.tail(nn.functional.pixel_unshuffle(x, 2))
        return self.fc(x.mean((2, 3)))


def test_groups_through_a_pixel_shuffle_are_whole_with_the_reason_and_the_rest_prunes():
    """torch-pruning traced pixel (un)shuffle as element-wise: the groups failed in its importance (an
    IndexError) or in the forward pass, with no word of why."""
    torch.manual_seed(0)
    model, example = PixelShuffleNet().eval(), torch.randn(1, 3, 32, 32)
    by_root = {g.root: g for g in discover_groups(model, build_graph(model, example))}
    assert "PixelShuffle moves channels" in by_root["expand.0"].reason
    assert "PixelUnshuffle moves channels" in by_root["after.0"].reason
    assert by_root["stem.0"].prunable and by_root["tail.0"].prunable
    result = kpc.prune(model, example, kpc.Budget(ratio=0.8))
    records = {g.root: g for g in result.round.groups}
    assert records["stem.0"].pruned or records["tail.0"].pruned
    assert result.round.landed and result.model(example).shape == (1, 10)
