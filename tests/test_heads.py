"""Attention heads: qkv projections are pruned whole head by whole head, in the layout the module uses.

Before, every group rooted at a transformer's qkv projection broke the reshape by the head
count when pruned and was left whole, and torch-pruning's counter took a timm attention
module's MACs from a formula that assumes a square output projection: a pruned ViT missed
a FLOPs budget by a quarter.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import kpc
from kpc.costs import count_macs
from kpc.heads import HeadLayout
from kpc.matmuls import activation_matmul_macs
from kpc.pruning import analyse_groups
from kpc.tp_compat import counted_whole


class HeadMajorAttention(nn.Module):
    """Each head's q, k and v rows together (LeViT's layout) and a per-head bias, cached in eval mode."""

    def __init__(self, dim: int = 32, num_heads: int = 4, head_dim: int = 8, scale_norm: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(dim, num_heads * head_dim * 3)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.bias = nn.Parameter(torch.randn(num_heads, 1, 1))
        self.norm = nn.LayerNorm(num_heads * head_dim) if scale_norm else nn.Identity()
        self.bias_cache: dict[str, torch.Tensor] = {}  # LeViT keeps its per-head biases like this in eval mode

    def train(self, mode: bool = True) -> HeadMajorAttention:
        self.bias_cache = {}  # rebuilt on the next eval-mode call, under whatever grad mode that runs in
        return super().train(mode)

    def cached_bias(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.bias * 1.0
        if str(device) not in self.bias_cache:
            self.bias_cache[str(device)] = self.bias * 1.0
        return self.bias_cache[str(device)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        attention = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5 + self.cached_bias(x.device)).softmax(-1)
        out = (attention @ v).transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return self.proj(self.norm(out))


class TinyTransformer(nn.Module):
    def __init__(self, scale_norm: bool = False) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, stride=4)
        self.attn = HeadMajorAttention(scale_norm=scale_norm)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def test_layouts_place_each_heads_rows():
    split = HeadLayout(heads=2, width=12, splits=3)  # timm: [q0 q1 | k0 k1 | v0 v1], two rows per head
    assert split.rows(1) == [2, 3, 6, 7, 10, 11]
    assert split.order() == (0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11)
    assert split.kept_heads([2, 3, 6, 7, 10, 11]) == [1]
    assert split.kept_heads([0, 1, 2, 3]) is None, "not whole heads"
    major = HeadLayout(heads=2, width=12)
    assert major.rows(1) == list(range(6, 12)) and major.kept_heads(range(6)) == [0]


def test_activation_products_are_counted_and_layer_products_are_not():
    module = HeadMajorAttention().eval()
    tokens = 16
    counted = activation_matmul_macs(module, torch.randn(1, tokens, 32), counted_whole)
    # q @ k^T and attention @ v: 4 heads x 16 x 16 x 8 each; the linears are the counter's
    assert counted == {module: 2 * 4 * tokens * tokens * 8}
    sdpa = activation_matmul_macs(_Sdpa(), torch.randn(2, 3, tokens, 8), counted_whole)
    assert sum(sdpa.values()) == 2 * 3 * tokens * tokens * (8 + 8)


class _Sdpa(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(x, x, x)


def test_a_timm_attention_with_a_narrower_output_is_counted_by_its_layers():
    """torch-pruning's formula for timm's Attention assumes proj is square; a pruned one is not."""
    attention = timm.models.vision_transformer.Attention(dim=48, num_heads=3).eval()
    attention.proj = nn.Linear(48, 24)
    tokens = 10
    macs, _ = count_macs(attention, torch.randn(1, tokens, 48))
    layers = tokens * 48 * 144 + tokens * 48 * 24 + 24  # qkv has no bias; proj adds one term per output
    products = 2 * 3 * tokens * tokens * 16
    assert macs == pytest.approx(layers + products, rel=1e-6)


def test_head_major_attention_loses_whole_heads_and_its_per_head_bias(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    example = torch.randn(1, 3, 32, 32)
    _graph, groups = analyse_groups(model, example, round_to=1, min_channels=1)
    qkv = next(g for g in groups if g.root == "attn.qkv")
    assert qkv.prunable and qkv.heads == 4, qkv.reason
    assert qkv.channel_order == HeadLayout(4, 96).order(), "the layout the check confirmed is head-major"
    calibration = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    # Taylor importance: the second batch's backward runs through the bias the first forward cached
    result = kpc.prune(model, example_inputs=example, budget=kpc.Budget(ratio=0.5), calibration=calibration)
    child = result.model.attn
    decision = next(g for g in result.round.groups if g.root == "attn.qkv")
    assert decision.heads == 4 and decision.kept_width % 24 == 0
    assert child.num_heads == decision.kept_width // 24 and child.bias.shape == (child.num_heads, 1, 1)
    counted, _ = count_macs(result.model, example)
    assert counted <= result.round.limit * 1e9 and result.round.landed  # four coarse groups: on the frontier
    out = kpc.save(result, tmp_path / "artifact")
    loaded = kpc.load(out, model=TinyTransformer())
    assert loaded.attn.num_heads == child.num_heads
    with torch.no_grad():
        assert torch.allclose(loaded(example), result.model(example), atol=1e-6)


def test_a_norm_across_heads_keeps_the_heads_whole():
    """Removing a head under a norm over every head's output changes the others: no layout passes the check,
    and as plain channels the projection breaks the reshape, so it is left whole."""
    model = TinyTransformer(scale_norm=True).eval()
    _graph, groups = analyse_groups(model, torch.randn(1, 3, 32, 32), round_to=1, min_channels=1)
    qkv = next(g for g in groups if g.root == "attn.qkv")
    assert not qkv.prunable and "unsafe to prune" in qkv.reason and qkv.heads is None
    assert all(g.prunable for g in groups if g.root not in ("attn.qkv", "head")), "the rest is still pruned"


def test_a_timm_vision_transformer_prunes_heads_and_lands(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10).eval()
    example = torch.randn(1, 3, 64, 64)
    result = kpc.prune(model, example_inputs=example, budget=kpc.Budget(ratio=0.5), importance="magnitude")
    whole = {g.root: g.reason for g in result.round.groups if not g.prunable}
    assert set(whole) == {"head"}, whole
    heads = [g for g in result.round.groups if g.heads]
    assert heads and any(g.pruned for g in heads), "some attention lost heads"
    for block in result.model.blocks:
        assert block.attn.qkv.out_features == 3 * block.attn.num_heads * block.attn.head_dim
    counted, _ = count_macs(result.model, example)
    assert result.round.limit * 1e9 * 0.99 <= counted <= result.round.limit * 1e9
    loaded = kpc.load(kpc.save(result, tmp_path / "vit"), model=timm.create_model("test_vit", num_classes=10))
    with torch.no_grad():
        assert torch.allclose(loaded(example), result.model(example), atol=1e-5)


class SeparateQueryAttention(nn.Module):
    """Queries and keys/values from two projections (PVT's layout): neither can lose a head on its own."""

    def __init__(self, dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q = self.q(x).reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(batch, tokens, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim))


def test_queries_from_their_own_projection_lose_the_same_heads(tmp_path):
    """torch-pruning puts PVT's q into its kv's group: q's rows go head by head with the kv's."""
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    model.attn = SeparateQueryAttention()
    example = torch.randn(1, 3, 32, 32)
    result = kpc.prune(model, example_inputs=example, budget=kpc.Budget(ratio=0.6), importance="magnitude")
    kv = next(g for g in result.round.groups if g.root == "attn.kv")
    assert kv.heads == 4 and kv.pruned, kv.reason
    attention = result.model.attn
    assert attention.q.out_features == attention.num_heads * 8
    assert attention.kv.out_features == 2 * attention.q.out_features
    factory = TinyTransformer()
    factory.attn = SeparateQueryAttention()
    loaded = kpc.load(kpc.save(result, tmp_path / "pvt"), model=factory)
    with torch.no_grad():
        assert torch.allclose(loaded(example), result.model(example), atol=1e-6)


class Unmixed(TinyTransformer):
    """No residual around the attention: its output projection roots a group of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.embed(x).flatten(2).transpose(1, 2))
        return self.head(self.mlp(x).mean(1))


def test_two_head_candidates_of_one_attention_do_not_refuse_the_model():
    """qkv and proj both looked like head projections; pruning qkv shrank the head count under proj, whose cut
    then raised and refused the whole prune (DaViT's). Now proj is judged as plain channels."""
    torch.manual_seed(0)
    model = Unmixed().eval()
    example = torch.randn(1, 3, 32, 32)
    _graph, groups = analyse_groups(model, example, round_to=1, min_channels=1)
    by_root = {g.root: g for g in groups}
    assert "attn.proj" in by_root and by_root["attn.qkv"].heads == 4
    assert by_root["attn.proj"].heads is None
    result = kpc.prune(model, example_inputs=example, budget=kpc.Budget(ratio=0.6), importance="magnitude")
    with torch.no_grad():
        assert result.model(example).shape == (1, 10)


def test_a_block_that_keeps_its_attentions_head_count_does_not_cut_its_mlp_by_heads():
    """torchvision's EncoderBlock stores `num_heads` beside its MLP: the MLP's hidden layer was taken for a head
    projection of the block and cut only in twelfths (and the confirmation copied the model twice per try)."""
    import torchvision

    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    assert model.encoder.layers[0].num_heads == 4  # the block holds the head count, as in vit_b_16
    _graph, groups = analyse_groups(model, torch.randn(1, 3, 32, 32), round_to=1, min_channels=1)
    hidden = [g for g in groups if g.root.endswith("mlp.0")]
    assert len(hidden) == 2
    for group in hidden:
        assert group.prunable and group.blocks == 1 and not group.head_layouts, (group.root, group.blocks)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "levit_128s", "mobilenetv3_small_050"])
def test_a_meta_copy_counts_what_the_model_itself_counts(name):
    """Large models are counted on meta tensors (kpc.costs.meta_shadow): the count must equal the CPU's, module for
    module, attention products (ViT), cached per-head biases (LeViT) and squeeze-excite (MobileNetV3) included."""
    from kpc.costs import _count_on, macs_by_module, meta_shadow

    model = timm.create_model(name, num_classes=10).eval()
    example = torch.randn(1, 3, 224, 224)
    shadow = meta_shadow(model, min_parameters=0)
    assert shadow is not None and next(shadow.parameters()).device.type == "meta"
    assert next(model.parameters()).device.type == "cpu", "the model keeps its own tensors"
    on_meta = _count_on(shadow, torch.empty_like(example, device="meta"))
    on_cpu = _count_on(model, example)
    assert on_meta[:2] == on_cpu[:2]  # MACs and parameters
    shadow_names = {m: n for n, m in shadow.named_modules()}
    assert {shadow_names[m]: v for m, v in on_meta[2].items()} == \
        {n: on_cpu[2][m] for n, m in model.named_modules() if m in on_cpu[2]}
    assert macs_by_module(model, example)[0] == on_cpu[0]
