"""GroupNorm (ResNet-GN, BiT, detection backbones): channels go in whole normalization groups."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import kpc
from kpc.apply import apply_kept
from kpc.artifact import open_model
from kpc.budget import Budget
from kpc.cli import app
from kpc.group_norms import check_cut, normalization_blocks

from .conftest import file_spec, prune_spec
from .test_grouped import _groups

GN_NET = '''
import torch
import torch.nn.functional as F
from torch import nn


class GroupNormNet(nn.Module):
    """GroupNorm of 32 groups of 2 and of 16 groups of 8; the second norm reads a concat of two convs."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.a = nn.Conv2d(1, 64, 3, 2, 1, bias=False)
        self.norm_a = nn.GroupNorm(32, 64)
        self.b = nn.Conv2d(64, 64, 3, 1, 1, bias=False)
        self.c = nn.Conv2d(64, 64, 3, 1, 1, bias=False)
        self.norm_bc = nn.GroupNorm(16, 128)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.relu(self.norm_a(self.a(x)))
        x = F.relu(self.norm_bc(torch.cat([self.b(x), self.c(x)], 1)))
        return self.fc(x.mean((2, 3)))


def net(num_classes=10):
    return GroupNormNet(num_classes)
'''
SIZE = (1, 28, 28)
runner = CliRunner()


@pytest.fixture(scope="module")
def gn_spec(tmp_path_factory) -> str:
    return file_spec(tmp_path_factory.mktemp("models"), "gn_net.py", GN_NET, "net")


def test_groups_a_groupnorm_normalizes_are_cut_by_its_groups(gn_spec):
    loaded = open_model(gn_spec, num_classes=10, input_size=SIZE)
    by_root = {g.root: g for g in _groups(loaded.model, loaded.example_input())[1]}
    assert by_root["a"].prunable and by_root["a"].blocks == 32 and by_root["a"].block_width == 2
    # each half of the concat is 8 of norm_bc's 16 groups of 8 channels
    for root in ("b", "c"):
        assert by_root[root].prunable and by_root[root].blocks == 8 and by_root[root].block_width == 8
        assert by_root[root].blocks_of == "GroupNorm groups"


def test_removing_whole_groups_keeps_the_other_channels_normalized_exactly(gn_spec):
    """The kept channels of norm_a's output are those of the unpruned net: their groups saw the same channels."""
    loaded = open_model(gn_spec, num_classes=10, input_size=SIZE)
    model, example = loaded.model.eval(), loaded.example_input(batch=3)
    kept_groups = [0, 5, 6, 31]
    kept = sorted(2 * g + j for g in kept_groups for j in range(2))
    pruned = apply_kept(copy.deepcopy(model), example, {"a": (64, kept)})
    assert (pruned.norm_a.num_groups, pruned.norm_a.num_channels) == (4, 8)
    seen = {}
    for name, net in (("full", model), ("pruned", pruned)):
        net.norm_a.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
        with torch.no_grad():
            net(example)
    torch.testing.assert_close(seen["pruned"], seen["full"][:, kept], rtol=1e-5, atol=1e-6)


def test_a_cut_inside_a_normalization_group_is_refused_before_anything_is_cut(gn_spec):
    loaded = open_model(gn_spec, num_classes=10, input_size=SIZE)
    model, example = copy.deepcopy(loaded.model), loaded.example_input()
    with pytest.raises(ValueError, match="part of a normalization group"):
        apply_kept(model, example, {"a": (64, [i for i in range(64) if i != 7])})
    assert model.a.out_channels == 64 and model.norm_a.num_channels == 64
    assert check_cut(nn.GroupNorm(4, 16), [4, 5, 6, 7, 12, 13, 14, 15]) == 2
    assert check_cut(nn.GroupNorm(1, 16), [3]) == 0  # one group: any channel may go


def test_channels_off_the_normalization_groups_leave_the_group_whole():
    norm = nn.GroupNorm(4, 48)  # groups of 12
    assert normalization_blocks(norm, list(range(12, 36)), list(range(24)), 24) == (2, None)
    assert normalization_blocks(norm, list(range(0, 16)), None, 16)[0] is None  # 16 is not whole groups of 12
    assert normalization_blocks(norm, list(range(0, 24)), None, 48)[0] is None  # half the group never reaches it
    assert normalization_blocks(nn.GroupNorm(1, 48), list(range(48)), None, 48) == (None, None)
    assert normalization_blocks(nn.GroupNorm(48, 48), list(range(48)), None, 48) == (None, None)
    class Concat(nn.Module):
        def __init__(self):
            super().__init__()
            self.left, self.right, self.norm = nn.Conv2d(3, 10, 1), nn.Conv2d(3, 14, 1), nn.GroupNorm(4, 24)
            self.out = nn.Conv2d(24, 5, 1)

        def forward(self, x):
            return self.out(self.norm(torch.cat([self.left(x), self.right(x)], 1)))

    by_root = {g.root: g for g in _groups(Concat(), torch.randn(1, 3, 8, 8))[1]}
    for root in ("left", "right"):  # 10 and 14 channels against groups of 6
        assert not by_root[root].prunable and "whole normalization groups" in by_root[root].reason

    class OneGroupEach(Concat):  # two convs of 12 over GroupNorm(2, 24): each conv is one normalization group
        def __init__(self):
            super().__init__()
            self.left, self.right, self.norm = nn.Conv2d(3, 12, 1), nn.Conv2d(3, 12, 1), nn.GroupNorm(2, 24)

    by_root = {g.root: g for g in _groups(OneGroupEach(), torch.randn(1, 3, 8, 8))[1]}
    for root in ("left", "right"):
        assert not by_root[root].prunable and "one whole GroupNorm group" in by_root[root].reason


def test_a_groupnorm_net_prunes_to_its_budget_and_loads_back(gn_spec, tmp_path):
    loaded, result = prune_spec(gn_spec, Budget(ratio=0.5), input_size=SIZE, calib_batches=1, calib_batch_size=4,
                                round_to=8, min_channels=8)
    records = {g.root: g for g in result.round.groups}
    assert any(records[r].pruned for r in ("a", "b", "c")), "the GroupNorm-normalized groups were pruned"
    for root, per_group in (("a", 2), ("b", 8), ("c", 8)):
        record = records[root]
        assert record.norm_groups == record.width // per_group
        assert all(len({i // per_group for i in record.kept[k:k + per_group]}) == 1
                   for k in range(0, record.kept_width, per_group)), "whole normalization groups kept"
    model = result.model
    assert model.norm_a.num_channels == 2 * model.norm_a.num_groups
    assert model.norm_bc.num_channels == 8 * model.norm_bc.num_groups
    assert result.round.counted_cost <= result.round.limit * (1 + 1e-9)
    out = tmp_path / "gn"
    kpc.save(result, out)
    # a reader of kpc-artifact/2 would replay the cut without lowering num_groups: it must refuse the plan
    assert json.loads((out / "plan.json").read_text())["format"] == "kpc-artifact/3"
    fresh = open_model(gn_spec, num_classes=10, input_size=SIZE).model
    reloaded = kpc.load(out, model=fresh).eval()
    example = loaded.example_input(batch=2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(example), model.eval()(example))


def test_cli_inspect_shows_kept_groupnorm_groups(gn_spec, tmp_path):
    out = tmp_path / "gn"
    result = runner.invoke(app, ["prune", gn_spec, "--num-classes", "10", "--input-size", "1x28x28",
                                 "--budget-ratio", "0.5", "--data", "synthetic", "--calib-batches", "1",
                                 "--calib-batch-size", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(runner.invoke(app, ["inspect", str(out), "--json", "--model-file", gn_spec]).output)
    statuses = {g["root"]: g["status"] for g in summary["groups"]}
    assert re.fullmatch(r"(pruned: \d+ of|kept all) 32 GroupNorm groups", statuses["a"]), statuses
    assert any(s.startswith("pruned:") for s in statuses.values()), statuses
