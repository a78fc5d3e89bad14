"""Grouped convolutions (RegNet, ResNeXt): pruned a whole conv group at a time, on both sides at once."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import kpc
from kpc.apply import apply_kept, replay
from kpc.artifact import open_model
from kpc.budget import Budget
from kpc.cli import app
from kpc.costs import FlopsModel, count_macs
from kpc.groups import build_graph, discover_groups, find_classifier
from kpc.importance import score_groups
from kpc.latency.profiler import ProfileSettings, model_layers, profile
from kpc.planner import block_options, make_choices

from .conftest import file_spec, prune_spec

GROUPED_NET = '''
import torch
from torch import nn


class GroupedNet(nn.Module):
    """1x1 -> grouped 3x3 (8 groups of 8) -> 1x1, RegNet's block without the residual."""

    def __init__(self, num_classes=10, width=64, groups=8, bias=False):
        super().__init__()
        self.a = nn.Conv2d(1, width, 3, 2, 1, bias=False)
        self.b = nn.Conv2d(width, width, 3, 1, 1, groups=groups, bias=bias)
        self.c = nn.Conv2d(width, 32, 1, bias=False)
        self.relu_a, self.relu_b, self.relu_c = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.relu_c(self.c(self.relu_b(self.b(self.relu_a(self.a(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


def grouped(num_classes=10):
    return GroupedNet(num_classes)
'''
SIZE = (1, 28, 28)
runner = CliRunner()


@pytest.fixture(scope="module")
def grouped_spec(tmp_path_factory) -> str:
    return file_spec(tmp_path_factory.mktemp("models"), "grouped_net.py", GROUPED_NET, "grouped")


def _groups(model: nn.Module, example: torch.Tensor, **kwargs):
    graph = build_graph(model, example)
    return graph, discover_groups(model, graph, never_prune=find_classifier(model, example), **kwargs)


def test_both_sides_of_a_grouped_conv_are_tied(grouped_spec):
    loaded = open_model(grouped_spec, num_classes=10, input_size=SIZE)
    _, groups = _groups(loaded.model, loaded.example_input())
    by_root = {g.root: g for g in groups}
    feeding, rooted = by_root["a"], by_root["b"]
    assert feeding.prunable and rooted.prunable
    assert feeding.blocks == rooted.blocks == 8 and feeding.block_width == 8
    assert {feeding.tied_to, rooted.tied_to} == {None, min(feeding.index, rooted.index)}


def test_removing_conv_groups_equals_zeroing_them(grouped_spec):
    """Pruned net == the unpruned net with the removed blocks' channels zeroed at the source (no biases)."""
    loaded = open_model(grouped_spec, num_classes=10, input_size=SIZE)
    model, example = loaded.model.eval(), loaded.example_input(batch=4)
    kept_blocks = [1, 2, 6]
    kept = sorted(b * 8 + j for b in kept_blocks for j in range(8))
    pruned = apply_kept(copy.deepcopy(model), example, {"a": (64, kept), "b": (64, kept)})
    assert (pruned.b.groups, pruned.b.in_channels, pruned.b.out_channels) == (3, 24, 24)
    assert tuple(pruned.b.weight.shape) == (24, 8, 3, 3)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        removed = [i for i in range(64) if i not in kept]
        zeroed.a.weight[removed] = 0
        torch.testing.assert_close(pruned(example), zeroed(example), rtol=1e-5, atol=1e-6)


def test_a_grouped_conv_is_scored_on_its_output_side_only(grouped_spec):
    """Its input-side weights are its output rows: counting them again in the feeding group would double them."""
    loaded = open_model(grouped_spec, num_classes=10, input_size=SIZE)
    _, groups = _groups(loaded.model, loaded.example_input())
    scores = score_groups(groups, "magnitude")
    feeding = next(g for g in groups if g.root == "a")
    expected = loaded.model.a.weight.detach().abs().sum(dim=(1, 2, 3)).double().numpy()
    np.testing.assert_allclose(scores[feeding.index], expected, rtol=1e-6)


def test_a_tie_is_whole_when_one_side_is_ignored(grouped_spec):
    loaded = open_model(grouped_spec, num_classes=10, input_size=SIZE)
    _, groups = _groups(loaded.model, loaded.example_input(), ignore=("a",))
    by_root = {g.root: g for g in groups}
    assert not by_root["a"].prunable and "--ignore" in by_root["a"].reason
    assert not by_root["b"].prunable and "tied through a grouped convolution to a" in by_root["b"].reason


def test_tie_choices_rank_whole_blocks_and_respect_the_width_step():
    assert block_options(13, [8, 8], round_to=16, min_channels=16).tolist() == [2, 4, 6, 8, 10, 12, 13]
    assert block_options(8, [8, 4], round_to=8, min_channels=8).tolist() == [2, 4, 6, 8]
    model = torch.nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=4),
                                nn.ReLU(), nn.Conv2d(32, 5, 1))
    example = torch.randn(1, 3, 8, 8)
    _, groups = _groups(model, example)
    members = sorted((g for g in groups if g.blocks == 4), key=lambda g: g.tied_to is not None)
    scores = {members[0].index: np.arange(32, dtype=float), members[1].index: np.ones(32)}
    choice = make_choices(members, scores, round_to=8, min_channels=8)
    assert choice.widths.tolist() == [8, 16, 24, 32] and choice.block == 8
    assert choice.order[0] == 3  # the block holding channels 24..31 scores highest
    kept = choice.kept_by_group(16)
    assert kept[members[0].index] == kept[members[1].index] == list(range(16, 32))


def test_regnet_prunes_its_grouped_blocks_and_replays(tmp_path):
    loaded, result = prune_spec("torchvision:regnet_y_400mf", Budget(ratio=0.35), input_size=(3, 64, 64),
                                calib_batches=1, calib_batch_size=2, round_to=16, min_channels=16)
    example = loaded.example_input()
    counted, _ = count_macs(result.model, example)
    assert counted <= result.round.limit * 1e9 * (1 + 1e-9)
    tied = [g for g in result.round.groups if g.conv_groups]
    assert tied and all(g.prunable for g in tied)
    assert any(g.kept_width < g.width for g in tied), "the grouped blocks were pruned"
    for record in tied:
        block = record.width // record.conv_groups
        assert record.kept_width % 16 == 0 or record.kept_width == record.width
        assert all(len({i // block for i in record.kept[k:k + block]}) == 1
                   for k in range(0, record.kept_width, block)), "whole blocks kept"
    for module in result.model.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            assert module.in_channels % module.groups == 0 and module.weight.shape[0] == module.out_channels
    fresh = open_model("torchvision:regnet_y_400mf", num_classes=10, input_size=(3, 64, 64))
    replayed = replay(fresh.model, [result.round], fresh.input_size)
    replayed.load_state_dict(result.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(replayed.eval()(example), result.model.eval()(example))


def test_flops_model_counts_grouped_convs_linearly(grouped_spec):
    loaded = open_model(grouped_spec, num_classes=10, input_size=SIZE)
    model, example = loaded.model, loaded.example_input()
    graph, groups = _groups(model, example)
    cost = FlopsModel(model, example, graph, groups)
    widths = np.array([g.width for g in groups], dtype=np.float64)
    by_root = {g.root: g for g in groups}
    for root in ("a", "b"):
        widths[by_root[root].index] = 24
    kept = list(range(24))
    pruned = apply_kept(copy.deepcopy(model), example, {"a": (64, kept), "b": (64, kept)})
    assert cost.total(widths) == pytest.approx(count_macs(pruned, example)[0], rel=1e-6)


def test_latency_table_measures_grouped_convs_by_whole_groups(grouped_spec, tmp_path):
    loaded = open_model(grouped_spec, num_classes=10, input_size=SIZE)
    settings = ProfileSettings(runtime="ort-cpu", threads=1, iters=5, warmup=2, model_iters=10, round_to=16,
                               min_channels=16)
    table = profile(loaded.model, loaded.example_input(), settings, tmp_path / "grouped.json")
    gconv = [e for s, e in table.entries.items() if s.startswith("gconv")]
    assert len(gconv) == 1 and gconv[0].ms.ndim == 1
    assert all(c % 8 == 0 for c in gconv[0].c_out) and np.array_equal(gconv[0].c_in, gconv[0].c_out)
    layers = model_layers(loaded.model, loaded.example_input(), table.header["round_to"], 16)
    tied = [g for g in layers.groups if g.blocks == 8]
    assert len(tied) == 2 and all(layers.min_widths[g.index] == 16 for g in tied)
    full_ms = table.header["full_model_ms"]
    _loaded, result = prune_spec(grouped_spec, Budget(ms=0.6 * full_ms, table=table), input_size=SIZE,
                                 calib_batches=1, calib_batch_size=2, round_to=16, min_channels=16)
    assert result.model.b.groups < 8 and result.model.b.out_channels == 8 * result.model.b.groups
    assert result.round.counted_cost < full_ms


def test_cli_prune_and_inspect_show_kept_conv_groups(grouped_spec, tmp_path):
    out = tmp_path / "grouped"
    result = runner.invoke(app, ["prune", grouped_spec, "--num-classes", "10", "--input-size", "1x28x28",
                                 "--budget-ratio", "0.4", "--data", "synthetic", "--calib-batches", "1",
                                 "--calib-batch-size", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    refused = runner.invoke(app, ["inspect", str(out), "--json"])  # an artifact never runs the file it names
    assert refused.exit_code == 2 and "--model-file" in refused.output
    summary = json.loads(runner.invoke(app, ["inspect", str(out), "--json", "--model-file", grouped_spec]).output)
    statuses = {g["root"]: g["status"] for g in summary["groups"]}
    assert re.fullmatch(r"pruned: [1-7] of 8 conv groups(, tied to \w+)?", statuses["a"]), statuses
    assert statuses["a"].split(",")[0] == statuses["b"].split(",")[0], "both sides keep the same number of groups"
    fresh = open_model(grouped_spec, num_classes=10, input_size=SIZE).model
    model = kpc.load(out, model=fresh)
    assert model.b.groups < 8 and model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
