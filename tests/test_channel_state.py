"""Per-channel state torch-pruning does not prune: a conv subclass's gain, a blur pool's per-channel filters.

Both broke the pruned network's forward pass, so every group through them was left whole
(NFNets, resnetblur, densenetblur, TResNet); and the conv subclass was counted as zero MACs,
so an NFNet's FLOPs budget was taken over its classifier alone.
"""

from __future__ import annotations

import pytest
import torch
from timm.layers import BlurPool2d, ScaledStdConv2d
from torch import nn

import kpc
from kpc.channel_state import channelwise_pruners, output_extras
from kpc.costs import count_macs


class BlurStdNet(nn.Module):
    """Scaled-standardised convs (a per-output gain) and an anti-aliasing blur pool between them."""

    def __init__(self, num_classes: int = 10, conv: type[nn.Conv2d] = ScaledStdConv2d) -> None:
        super().__init__()
        self.stem = conv(3, 32, 3, padding=1)
        self.blur = BlurPool2d(32, filt_size=3, stride=2)
        self.body = nn.Sequential(conv(32, 64, 3, padding=1), nn.ReLU(), conv(64, 48, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blur(torch.relu(self.stem(x)))
        return self.head(self.body(x).mean((2, 3)))


def test_a_conv_subclass_gain_and_a_blur_filter_are_found():
    model = BlurStdNet().eval()
    assert output_extras(model.stem) == ["gain"]
    assert output_extras(nn.Conv2d(3, 8, 3)) == [], "a plain conv has nothing beyond weight and bias"
    pruners = channelwise_pruners(model, torch.randn(1, 3, 32, 32))
    assert list(pruners) == [BlurPool2d]
    assert pruners[BlurPool2d].buffers == {model.blur: ["filt"]}


def test_conv_subclasses_count_their_macs():
    """torch-pruning's counter matches exact types: a ScaledStdConv2d counted as zero."""
    example = torch.randn(1, 3, 32, 32)
    plain = BlurStdNet(conv=nn.Conv2d).eval()
    scaled = BlurStdNet().eval()
    assert count_macs(scaled, example)[0] == pytest.approx(count_macs(plain, example)[0], rel=1e-6)
    assert count_macs(scaled, example)[0] > 10 * 32 * 32 * 32 * 3 * 9 / 4  # the convs, not the head alone


def test_applying_a_cut_keeps_the_gain_rows_and_filters_of_the_kept_channels():
    from kpc.apply import apply_kept

    torch.manual_seed(0)
    model = BlurStdNet().eval()
    with torch.no_grad():
        model.stem.gain.copy_(torch.rand_like(model.stem.gain))
        model.blur.filt.mul_(torch.rand(32, 1, 1, 1))  # a distinct filter per channel, to see which rows stay
    gain, filt = model.stem.gain.detach().clone(), model.blur.filt.clone()
    kept = [1, 2, 3, 5, 8, 13, 21, 30]
    apply_kept(model, torch.randn(1, 3, 32, 32), {"stem": (32, kept)})
    assert model.stem.out_channels == model.blur.channels == 8 and model.body[0].in_channels == 8
    assert torch.equal(model.stem.gain, gain[kept]) and torch.equal(model.blur.filt, filt[kept])
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_prune_slices_the_gain_and_the_blur_filters_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = BlurStdNet().eval()
    example = torch.randn(1, 3, 32, 32)
    result = kpc.prune(model, example_inputs=example, budget=kpc.Budget(ratio=0.5), importance="magnitude",
                       round_to=8, min_channels=8)
    whole = {g.root: g.reason for g in result.round.groups if not g.prunable}
    assert set(whole) == {"head"}, whole
    child = result.model
    assert any(g.pruned for g in result.round.groups), "something was cut"
    for conv in (child.stem, child.body[0], child.body[2]):
        assert conv.gain.shape == (conv.out_channels, 1, 1, 1)
    assert child.blur.filt.shape[0] == child.blur.channels == child.stem.out_channels
    assert result.round.landed
    reloaded = kpc.load(kpc.save(result, tmp_path / "child"), model=BlurStdNet())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), child(x))


class PosEmbedNet(nn.Module):
    """A conv stage with a learned (1, C, H, W) position embedding, as visformer has."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.pos_embed = nn.Parameter(torch.randn(1, 32, 16, 16))
        self.body = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x) + self.pos_embed)
        return self.head(torch.relu(self.body(x)).mean((2, 3)))


def test_an_nchw_position_embedding_is_pruned_along_its_channels(tmp_path):
    """torch-pruning took the embedding's last dimension (W) for its channels and the group was left whole."""
    from kpc.apply import apply_kept

    model = PosEmbedNet().eval()
    embedding = model.pos_embed.detach().clone()
    kept = list(range(0, 32, 2))
    apply_kept(model, torch.randn(1, 3, 32, 32), {"stem": (32, kept)})
    assert torch.equal(model.pos_embed, embedding[:, kept]) and model.body.in_channels == 16
    result = kpc.prune(PosEmbedNet().eval(), example_inputs=torch.randn(1, 3, 32, 32), budget=kpc.Budget(ratio=0.5),
                       importance="magnitude", round_to=8, min_channels=8)
    assert {g.root for g in result.round.groups if not g.prunable} == {"head"}
    reloaded = kpc.load(kpc.save(result, tmp_path / "child"), model=PosEmbedNet())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))


class ScaleViewNet(nn.Module):
    """metaformer's layer scale: a bare per-channel parameter whose owner keeps its view shape (C, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.metaformer import Scale

        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.scale = Scale(32)
        self.body = nn.Conv2d(32, 24, 3, padding=1)
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.scale(self.stem(x)))
        return self.head(torch.relu(self.body(x)).mean((2, 3)))


def test_a_bare_parameters_owner_keeps_its_view_shape_in_step():
    """torch-pruning slices the parameter but not the owner's (C, 1, 1): the view broke and the group stayed whole."""
    from kpc.pruning import analyse_groups

    torch.manual_seed(0)
    model = ScaleViewNet().eval()
    example = torch.randn(1, 3, 16, 16)
    _graph, groups = analyse_groups(model, example, round_to=1, min_channels=1)
    stem = next(g for g in groups if g.root == "stem")
    assert stem.prunable, stem.reason
    result = kpc.prune(model, example_inputs=example, budget=kpc.Budget(ratio=0.4), importance="magnitude")
    child = result.model
    width = child.stem.out_channels
    assert width < 32, "the stem's group was cut"
    assert child.scale.scale.shape == (width,) and child.scale.shape == (width, 1, 1)
    with torch.no_grad():
        assert child(example).shape == (1, 10)


class ConcatScaleNet(nn.Module):
    """A layer scale on one part of a concat that a residual add ties to a wider stream (RDNet's dense blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.skip = nn.Conv2d(3, 16, 1)
        self.part_a = nn.Conv2d(3, 8, 3, padding=1)
        self.part_b = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8))
        self.body = nn.Conv2d(16, 12, 3, padding=1)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = self.part_a(x) * self.gamma.view(1, -1, 1, 1)
        x = torch.relu(self.skip(x) + torch.cat([scaled, self.part_b(x)], dim=1))
        return self.head(torch.relu(self.body(x)).mean((2, 3)))


def test_a_layer_scale_on_one_part_of_a_concat_is_pruned_with_its_part():
    """torch-pruning maps the wide group's channels onto the scale's own 0..7; kpc compared the scale with the
    group's 16 channels and kept the stream whole."""
    from kpc.pruning import analyse_groups

    torch.manual_seed(0)
    model = ConcatScaleNet().eval()
    example = torch.randn(1, 3, 16, 16)
    _graph, groups = analyse_groups(model, example, round_to=1, min_channels=1)
    stream = next(g for g in groups if "gamma" in g.layers)
    assert stream.prunable and stream.width == 16, stream.reason
    result = kpc.prune(model, example_inputs=example, budget=kpc.Budget(ratio=0.5), importance="magnitude")
    child = result.model
    assert child.skip.out_channels < 16 and child.gamma.shape == (child.part_a.out_channels,)
    with torch.no_grad():
        assert child(example).shape == (1, 10)


class NoBiasNormNet(nn.Module):
    """Norm layers built with bias=False (timm's metaformer GroupNorm1NoBias, LayerNorm2dNoBias)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.group_norm = nn.GroupNorm(1, 32, bias=False)
        self.body = nn.Conv2d(32, 24, 3, padding=1)
        self.layer_norm = nn.LayerNorm(24, bias=False)
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.group_norm(self.stem(x)))
        return self.head(self.layer_norm(torch.relu(self.body(x)).mean((2, 3))))


def test_norms_without_a_bias_are_pruned_with_their_group(tmp_path):
    """torch-pruning sliced GroupNorm's missing bias and raised: poolformerv2's streams were left whole."""
    from kpc.pruning import analyse_groups

    torch.manual_seed(0)
    model = NoBiasNormNet().eval()
    example = torch.randn(1, 3, 16, 16)
    _graph, groups = analyse_groups(model, example, round_to=1, min_channels=1)
    for root in ("stem", "body"):
        group = next(g for g in groups if g.root == root)
        assert group.prunable, group.reason
    result = kpc.prune(model, example_inputs=example, budget=kpc.Budget(ratio=0.5), importance="magnitude")
    child = result.model
    assert child.body.out_channels < 24 and child.layer_norm.normalized_shape == (child.body.out_channels,)
    assert child.group_norm.num_channels == child.stem.out_channels
    assert child.group_norm.bias is None and child.layer_norm.bias is None
    reloaded = kpc.load(kpc.save(result, tmp_path / "child"), model=NoBiasNormNet())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(example), child(example))


class TokenNormNet(nn.Module):
    """Tokens from a conv stem, a normed MLP on the residual stream, then a norm without parameters before the head.

    torch.nn.RMSNorm and a parameter-free norm both keep their width in `normalized_shape`, which
    torch-pruning does not know to shrink: the stream's group broke in the probe and was left whole.
    """

    def __init__(self, norm: type[nn.Module] = nn.RMSNorm, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 4, stride=4)
        self.norm1 = norm(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.norm = norm(32, elementwise_affine=False)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = x + self.fc2(torch.relu(self.fc1(self.norm1(x))))
        return self.head(self.norm(x.mean(1)))


def test_an_rms_norm_and_a_parameter_free_norm_shrink_with_the_stream(tmp_path):
    from kpc.apply import apply_kept
    from kpc.channel_state import NormalizedShapePruner, normalized_shape_pruners

    example = torch.randn(1, 3, 32, 32)
    model = TokenNormNet().eval()
    pruners = normalized_shape_pruners(model, example)
    assert list(pruners) == [nn.RMSNorm] and isinstance(pruners[nn.RMSNorm], NormalizedShapePruner)
    assert normalized_shape_pruners(TokenNormNet(nn.LayerNorm), example) == {}, "torch-pruning prunes LayerNorm"
    with torch.no_grad():
        model.norm1.weight.copy_(torch.arange(32.0))
    kept = list(range(1, 32, 2))
    apply_kept(model, example, {"fc2": (32, kept)})
    assert model.norm1.normalized_shape == model.norm.normalized_shape == (16,)
    assert torch.equal(model.norm1.weight, torch.arange(32.0)[kept]) and model.head.in_features == 16
    result = kpc.prune(TokenNormNet().eval(), example_inputs=example, budget=kpc.Budget(ratio=0.5),
                       importance="magnitude", round_to=8, min_channels=8)
    assert {g.root: g.reason for g in result.round.groups if not g.prunable} == {"head": "network output (head)"}
    reloaded = kpc.load(kpc.save(result, tmp_path / "child"), model=TokenNormNet())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))
