"""Cost of a width assignment: the whole network's MACs as a function of every group's width.

Each module's cost is taken from torch-pruning's counter at full width and scaled by
how its channel counts change: convolutions and linears are bilinear in their output
and input widths (the consumer side the paper's code forgot), depthwise convs, norms
and other per-channel modules are linear in their one width, and modules no group
touches are a constant. At full width the model equals the counted total exactly.

The knapsack needs a cost per group and width. Costs are coupled (a conv's cost
depends on the group feeding it), so `option_costs` gives each group's cost change
with all other groups held at the current assignment; the planner iterates to a
fixed point, where this is exact.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from kpc import tp_compat
from kpc.channels import ChannelGroup
from kpc.cost_model import FLOPS_LANDING, CostModel
from kpc.groups import is_grouped_conv
from kpc.heads import attention_of
from kpc.matmuls import activation_matmul_macs
from kpc.modelcopy import detach_cached_tensors
from kpc.tracing import forward_with_hooks

log = logging.getLogger(__name__)

__all__ = ["CostModel", "FlopsModel", "Side", "channel_sides", "count_macs", "is_depthwise"]


@dataclass
class Side:
    """One channel dimension of a module: a fixed part plus shares of group widths.

    Shared by every cost model: a module's channel count under any width assignment.
    """

    full: float
    fixed: float
    terms: list[tuple[int, float]] = field(default_factory=list)  # (group index, channels at full width)

    def value(self, widths: np.ndarray, full_widths: np.ndarray) -> float:
        return self.fixed + sum(count * widths[g] / full_widths[g] for g, count in self.terms)

    def share(self, group: int) -> float:
        return sum(count for g, count in self.terms if g == group)


@dataclass
class _ModuleCost:
    name: str
    full_cost: float
    bilinear: bool  # conv/linear: out x in; otherwise linear in `out`
    out: Side
    inp: Side

    def cost(self, widths: np.ndarray, full_widths: np.ndarray) -> float:
        out = self.out.value(widths, full_widths) / self.out.full
        if not self.bilinear:
            return self.full_cost * out
        return self.full_cost * out * self.inp.value(widths, full_widths) / self.inp.full


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1


def channel_sides(model: nn.Module, graph: tp.DependencyGraph, groups: list[ChannelGroup]
                  ) -> dict[nn.Module, tuple[Side, Side]]:
    """(output side, input side) of every module a prunable group touches."""
    names = {module: name for name, module in model.named_modules()}
    touched: dict[nn.Module, dict[str, dict[int, float]]] = {}
    for group in groups:
        if not group.prunable:
            continue
        for item in group.tp_group:
            module = item.dep.target.module
            if not isinstance(module, nn.Module) or module not in names:
                continue
            side = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
            shares = touched.setdefault(module, {"out": {}, "in": {}})[side]
            count = float(len(item.idxs))
            if group.heads:  # a head cut shrinks every member's side by the kept heads' fraction; torch-pruning's
                # index lists through the split into heads can be longer than the side (LeViT's proj)
                count = float((graph.get_out_channels(module) if side == "out" else graph.get_in_channels(module))
                              or count)
            # a tied group moves block for block with its leader: same fraction of its width, so its
            # channels count as a share of the leader's width
            shares[group.leader] = shares.get(group.leader, 0.0) + count
    sides = {}
    for module, shares in touched.items():
        out_full = float(graph.get_out_channels(module) or 0) or sum(shares["out"].values())
        in_full = float(graph.get_in_channels(module) or 0) or sum(shares["in"].values())
        sides[module] = (_side(out_full, shares["out"]), _side(in_full, shares["in"]))
    return sides


def _side(full: float, shares: dict[int, float]) -> Side:
    return Side(full, max(full - sum(shares.values()), 0.0), sorted(shares.items()))


# Below this many parameters the meta device's dispatch costs more than the copy and the forward it saves.
META_COUNT_MIN_PARAMETERS = 20_000_000


def count_macs(model: nn.Module, example: torch.Tensor) -> tuple[float, float]:
    """Independent count: MACs (torch-pruning's counter for layers, `kpc.matmuls` for activation products)
    and parameters."""
    total, params, _per_module, _products = _count(model, example)
    return total, params


def macs_by_module(model: nn.Module, example: torch.Tensor
                   ) -> tuple[float, dict[nn.Module, float | None], dict[nn.Module, int]]:
    """The whole model's MACs, each layer's (None where the counter counts none) and each module's
    activation products (attention cores), which the total includes."""
    total, _params, per_module, products = _count(model, example)
    return total, per_module, products


def _count(model: nn.Module, example: torch.Tensor
           ) -> tuple[float, float, dict[nn.Module, float | None], dict[nn.Module, int]]:
    """(MACs, parameters, MACs per layer, activation products per module), per module keyed by `model`'s modules.

    A large model is counted on a copy whose tensors live on the meta device (`meta_shadow`):
    MACs depend on shapes alone, and the counter's deep copy and two forward passes of a ViT-H
    cost 10 CPU-s on the CPU against 0.6 on meta (every build of the closed loop counts once).
    """
    shadow = meta_shadow(model)
    if shadow is not None:
        try:
            total, params, per_module, products = _count_on(shadow, torch.empty_like(example, device="meta"))
        except Exception as exc:  # an op without a meta kernel, a value read from the data
            log.debug("counting MACs on the meta device failed (%s); counting on the model itself", exc)
        else:
            original = dict(zip(shadow.modules(), model.modules(), strict=True))
            return (total, params, {original[m]: v for m, v in per_module.items()},
                    {original[m]: v for m, v in products.items()})
    return _count_on(model, example)


def _count_on(model: nn.Module, example: torch.Tensor
              ) -> tuple[float, float, dict[nn.Module, float | None], dict[nn.Module, int]]:
    """`_count` on the model's own tensors, whatever device they live on."""
    detach_cached_tensors(model)  # the counter deep-copies the model
    macs, params, per_module, _ = tp_compat.count_ops_and_params(model, example, layer_wise=True)
    products = activation_matmul_macs(model, example, tp_compat.counted_whole)
    return float(macs + sum(products.values())), float(params), per_module, products


def meta_shadow(model: nn.Module, *, min_parameters: int = META_COUNT_MIN_PARAMETERS) -> nn.Module | None:
    """A copy of `model` whose parameters and buffers are meta tensors (no data is copied), or None when the
    model is small or keeps tensors elsewhere (a cached CPU tensor the copy would mix with meta ones)."""
    if sum(p.numel() for p in model.parameters()) < min_parameters:
        return None
    detach_cached_tensors(model)
    memo: dict[int, Any] = {}
    for tensor in model.parameters():
        memo[id(tensor)] = nn.Parameter(torch.empty_like(tensor, device="meta"), requires_grad=tensor.requires_grad)
    for tensor in model.buffers():
        memo[id(tensor)] = torch.empty_like(tensor, device="meta")
    try:
        shadow = copy.deepcopy(model, memo)
    except Exception as exc:
        log.debug("no meta copy of the model (%s)", exc)
        return None
    if any(t.device.type != "meta" for t in (*shadow.parameters(), *shadow.buffers())):
        return None
    return shadow


class FlopsModel:
    """MACs of the whole network for any assignment of group widths (1 FLOP = 1 MAC, as in the literature)."""

    unit = "GFLOPs"
    scale = 1e9
    width_step = 1
    landing = FLOPS_LANDING

    def __init__(self, model: nn.Module, example: torch.Tensor, graph: tp.DependencyGraph,
                 groups: list[ChannelGroup]) -> None:
        self.example = example
        self.counted_full, per_module, products = macs_by_module(model, example)
        self.full_widths = np.array([g.width for g in groups], dtype=np.float64)
        names = {module: name for name, module in model.named_modules()}
        sides = channel_sides(model, graph, groups)
        self.modules: list[_ModuleCost] = []
        modelled = 0.0
        for module, (out, inp) in sides.items():
            cost = per_module.get(module) or 0.0
            if cost <= 0:
                continue
            # depthwise and grouped convs lose whole conv groups: their cost is linear in the kept channels
            bilinear = isinstance(module, (nn.Conv2d, nn.Linear)) and not is_depthwise(module) \
                and not is_grouped_conv(module)
            if not bilinear and not out.terms:  # a one-dimensional module reached from its input side
                out = inp
            if out.full <= 0 or (bilinear and inp.full <= 0):
                continue
            self.modules.append(_ModuleCost(names[module], float(cost), bilinear, out, inp))
            modelled += float(cost)
        modelled += self._attach_followers(model, example, per_module, names)
        modelled += self._attach_attention_cores(model, groups, sides, products, names)
        self.constant = self.counted_full - modelled
        self._by_group: dict[int, list[_ModuleCost]] = {}
        for entry in self.modules:
            for g in {g for g, _ in entry.out.terms} | {g for g, _ in entry.inp.terms}:
                self._by_group.setdefault(g, []).append(entry)

    def _attach_followers(self, model: nn.Module, example: torch.Tensor, per_module: dict, names: dict) -> float:
        """Model modules no group names (activations, pools) by the width of the tensor they consume.

        They are counted by the independent counter too, and holding them constant
        over-predicts a pruned model's cost by up to a few percent.
        """
        by_name = {entry.name: entry for entry in self.modules}
        trace: list[tuple[nn.Module, int, int, int]] = []
        alive: list[torch.Tensor] = []  # keep every traced tensor so no data pointer is reused


        def hook(module, inputs, output):
            first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            if first is None or not isinstance(output, torch.Tensor) or output.ndim < 2:
                return
            alive.extend((first, output))
            trace.append((module, first.data_ptr(), output.data_ptr(), int(output.shape[1])))

        forward_with_hooks(model, example, [m for m in model.modules() if not any(True for _ in m.children())], hook)
        alive.clear()
        side_of: dict[int, Side] = {}
        added = 0.0
        for module, in_ptr, out_ptr, channels in trace:
            entry = by_name.get(names.get(module, ""))
            if entry is not None:
                side_of[out_ptr] = entry.out
                continue
            side = side_of.get(in_ptr)
            if side is None or side.full != channels or not side.terms:
                continue
            side_of[out_ptr] = side
            cost = float(per_module.get(module) or 0.0)
            if cost > 0 and module in names:
                follower = _ModuleCost(names[module], cost, False, side, side)
                self.modules.append(follower)
                by_name[follower.name] = follower
                added += cost
        return added

    def _attach_attention_cores(self, model: nn.Module, groups: list[ChannelGroup], sides: dict,
                                products: dict[nn.Module, int], names: dict) -> float:
        """Model an attention module's q·kᵀ and attn·v MACs by its projection's width: both scale with the heads
        it keeps. Products in other modules stay in the constant part."""
        added = 0.0
        for group in groups:
            found = attention_of(model, group.root) if group.prunable and group.heads else None
            if found is None:
                continue
            macs = float(products.get(found[1], 0))
            side = sides.get(model.get_submodule(group.root))
            if macs <= 0 or side is None or not side[0].terms:
                continue
            self.modules.append(_ModuleCost(f"{found[0]} (attention products)", macs, False, side[0], side[0]))
            added += macs
        return added

    def total(self, widths: np.ndarray) -> float:
        return self.constant + sum(m.cost(widths, self.full_widths) for m in self.modules)

    def measure(self, model: nn.Module) -> float:
        """MACs of a built model, counted independently of this model's prediction."""
        return count_macs(model, self.example)[0]

    def option_costs(self, widths: np.ndarray, group: int, options: np.ndarray) -> np.ndarray:
        """Cost change of the modules this group touches when only its width moves to each option."""
        full = self.full_widths
        delta = np.zeros(len(options), dtype=np.float64)
        step = (options - widths[group]) / full[group]
        for entry in self._by_group.get(group, ()):
            out_now = entry.out.value(widths, full)
            out = (out_now + entry.out.share(group) * step) / entry.out.full
            if entry.bilinear:
                in_now = entry.inp.value(widths, full)
                inp = (in_now + entry.inp.share(group) * step) / entry.inp.full
                delta += entry.full_cost * (out * inp - out_now * in_now / (entry.out.full * entry.inp.full))
            else:
                delta += entry.full_cost * (out - out_now / entry.out.full)
        return delta
