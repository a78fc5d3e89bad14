"""Choose a width per group under a budget: the knapsack, iterated to a fixed point.

Pure: numpy and the standard library only (no torch), like `kpc.knapsack`.

Items are (group, width) options: a group keeps its top-k channels by importance, the
value is their summed importance and the cost comes from a `CostModel`. Because a
layer's cost depends on its own and its input group's width, costs are linearised at
the current assignment, the knapsack is solved, costs are recomputed at the solution
and the solve repeats until the widths stop changing. The exact cost of every
candidate is evaluated and the best one that truly fits the budget is kept; an outer
loop rescales the internal target when the fixed point lands short of or over it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kpc import knapsack
from kpc.channels import ChannelGroup, tie_of
from kpc.cost_model import CostModel
from kpc.errors import KpcError

SOLVERS = ("exact", "greedy")
LANDING_TOLERANCE = 0.01  # a solve is good enough once its predicted cost is within this fraction under the budget
# A FLOPs plan served on a measured runtime may give up this fraction of the model's total importance for speed.
SPEED_TOLERANCE = 0.01
SPEED_WEIGHTS = tuple(2.0**k for k in range(8))  # penalty weights tried, see `fastest_within`


@dataclass
class GroupChoices:
    """The widths a group may take and the importance each one keeps.

    A tie (groups on both sides of grouped convs, see `kpc.groups`) is one choice: its
    `order` ranks whole conv-group blocks instead of channels, and its followers' widths
    move with the leader's, block for block.
    """

    index: int
    widths: np.ndarray  # ascending, last one = full width
    values: np.ndarray  # kept importance for each width
    order: np.ndarray  # channel (or block) indices, most important first
    block: int = 1  # channels per entry of `order`
    followers: tuple[tuple[int, int], ...] = ()  # (group index, its channels per block)
    channel_order: tuple[int, ...] | None = None  # the leader's channels with its blocks contiguous (heads)

    def kept_indices(self, width: int, block: int | None = None) -> list[int]:
        """Kept channel indices at `width`; with `block`, those of a follower with that many channels per block."""
        size = self.block if block is None else block
        positions = (int(b) * size + j for b in self.order[: int(width) // self.block] for j in range(size))
        if block is None and self.channel_order is not None:
            return sorted(self.channel_order[p] for p in positions)
        return sorted(positions)

    def follower_widths(self, width: int) -> dict[int, int]:
        kept_blocks = int(width) // self.block
        return {index: kept_blocks * size for index, size in self.followers}

    def kept_by_group(self, width: int) -> dict[int, list[int]]:
        """Kept channel indices of the chosen group and of every follower, by group index."""
        kept = {self.index: self.kept_indices(width)}
        kept.update({index: self.kept_indices(width, size) for index, size in self.followers})
        return kept


def block_options(blocks: int, block_widths: Sequence[int], round_to: int, min_channels: int) -> np.ndarray:
    """Numbers of blocks a tie may keep: every member's width a multiple of `round_to` and at least the minimum.

    All blocks (the full width) are always an option. A lone group is a tie of one
    member whose blocks are single channels.
    """
    round_to = max(1, round_to)
    step = math.lcm(*(round_to // math.gcd(round_to, int(b)) for b in block_widths))
    lowest = max(-(-min(int(b) * blocks, max(1, min_channels)) // int(b)) for b in block_widths)
    first = -(-max(lowest, 1) // step) * step
    return np.array([*range(first, blocks, step), blocks], dtype=np.int64)


def tie_widths(members: Sequence[ChannelGroup], round_to: int, min_channels: int) -> dict[int, np.ndarray]:
    """The widths each member of a tie (or a lone group) may take, aligned option for option."""
    blocks = _blocks(members[0])
    counts = block_options(blocks, [m.width // blocks for m in members], round_to, min_channels)
    return {m.index: counts * (m.width // blocks) for m in members}


def smallest_group_widths(groups: Sequence[ChannelGroup], round_to: int, min_channels: int) -> np.ndarray:
    """Every prunable group at its smallest width (a tie's members together), the rest whole; needs no importance."""
    widths = np.array([g.width for g in groups], dtype=np.float64)
    for group in groups:
        if group.prunable and group.tied_to is None:
            for index, options in tie_widths(tie_of(groups, group), round_to, min_channels).items():
                widths[index] = options[0]
    return widths


def make_choices(members: Sequence[ChannelGroup], scores: dict[int, np.ndarray], round_to: int,
                 min_channels: int) -> GroupChoices:
    """The choice of a lone group, or of a tie (`members`, leader first) ranked by whole blocks."""
    leader, blocks = members[0], _blocks(members[0])
    widths = tie_widths(members, round_to, min_channels)
    block_scores = sum(_in_block_order(m, scores[m.index]).reshape(blocks, m.width // blocks).sum(axis=1)
                       for m in members)
    block = leader.width // blocks
    order = np.argsort(-block_scores, kind="stable")
    cumulative = np.concatenate([[0.0], np.cumsum(block_scores[order])])
    options = widths[leader.index]
    return GroupChoices(leader.index, options, cumulative[options // block], order, block,
                        tuple((m.index, m.width // blocks) for m in members[1:]), leader.channel_order)


def _in_block_order(group: ChannelGroup, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    return values if group.channel_order is None else values[np.asarray(group.channel_order, dtype=np.int64)]


def _blocks(leader: ChannelGroup) -> int:
    """Blocks a choice keeps or removes whole: a tie's conv groups, or a lone group's channels."""
    return leader.blocks if leader.blocks > 1 else leader.width


@dataclass
class Solution:
    widths: np.ndarray  # one entry per group (all groups, whole ones at full width)
    cost: float  # exact cost of the assignment under the cost model
    value: float  # kept importance
    iterations: int


def smallest_widths(full_widths: np.ndarray, choices: Sequence[GroupChoices]) -> np.ndarray:
    """Every choice at its smallest width (followers with it), whole groups at full width."""
    widths = full_widths.astype(np.float64).copy()
    for choice in choices:
        widths[choice.index] = choice.widths[0]
        for index, width in choice.follower_widths(choice.widths[0]).items():
            widths[index] = width
    return widths


def minimum_cost(cost: CostModel, full_widths: np.ndarray, choices: Sequence[GroupChoices]) -> float:
    return cost.total(smallest_widths(full_widths, choices))


@dataclass(frozen=True)
class Penalty:
    """Costs the solve lowers, each at its weight in value units per internal unit, while the budget binds.

    A FLOPs budget served on a measured runtime: the runtime's latency model at a positive
    weight, and the FLOPs model at the weight that makes an average channel free, so that
    only latency out of proportion to FLOPs is penalised and plans still fill the budget.
    """

    terms: tuple[tuple[CostModel, float], ...]

    @property
    def weight(self) -> float:
        return self.terms[0][1]

    def of(self, widths: np.ndarray) -> float:
        return sum(weight * cost.total(widths) for cost, weight in self.terms)

    def option_costs(self, widths: np.ndarray, group: int, options: np.ndarray) -> np.ndarray:
        return sum(weight * cost.option_costs(widths, group, options) for cost, weight in self.terms)


def _objective(solution: Solution, penalty: Penalty | None) -> float:
    return solution.value - (0.0 if penalty is None else penalty.of(solution.widths))


def _fixed_point(cost: CostModel, full_widths: np.ndarray, choices: Sequence[GroupChoices], target: float,
                 budget: float, solver: str, bins: int, max_iterations: int, penalty: Penalty | None = None
                 ) -> tuple[Solution | None, Solution]:
    """Iterate solve -> recompute costs; return (best solution within `budget`, last solution).

    With a `penalty`, each option's value is lowered by the penalty's cost, linearised at
    the current assignment like the budget's cost, and "best" is judged on that objective.
    """
    current = full_widths.astype(np.float64).copy()
    best: Solution | None = None
    last: Solution | None = None
    seen: set[tuple[float, ...]] = set()
    for iteration in range(1, max_iterations + 1):
        base = cost.total(current)
        options: list[list[knapsack.Option]] = []
        floor = 0.0
        for choice in choices:
            delta = cost.option_costs(current, choice.index, choice.widths.astype(np.float64))
            low = float(delta.min())
            floor += low
            values = choice.values.astype(np.float64)
            if penalty is not None:  # shifted per group: one option per group is chosen, so only differences count
                extra = penalty.option_costs(current, choice.index, choice.widths.astype(np.float64))
                values = values - (extra - extra.min())
            options.append([knapsack.Option(int(w), float(d - low), float(v))
                            for w, d, v in zip(choice.widths, delta, values, strict=True)])
        capacity = max(target - base - floor, 0.0)
        solved = knapsack.solve(options, capacity, method=solver, bins=bins)
        new = current.copy()
        for choice, pick in zip(choices, solved.choice, strict=True):
            new[choice.index] = choice.widths[pick]
            for index, width in choice.follower_widths(choice.widths[pick]).items():
                new[index] = width
        value = float(sum(c.values[p] for c, p in zip(choices, solved.choice, strict=True)))
        last = Solution(new, cost.total(new), value, iteration)
        if last.cost <= budget and (best is None or _objective(last, penalty) > _objective(best, penalty)):
            best = last
        key = tuple(new)
        if np.array_equal(new, current) or key in seen:
            break
        seen.add(key)
        current = new
    assert last is not None
    return best, last


def _walk_down_to_floor(cost: CostModel, full_widths: np.ndarray, choices: Sequence[GroupChoices], budget: float,
                        floor: float, solver: str, bins: int, max_iterations: int, penalty: Penalty | None = None
                        ) -> Solution | None:
    """Targets stepping from the budget to the floor, for when every linearised solve landed over the budget.

    Step-like latency costs can do that near the floor; the all-minimum assignment always fits there.
    """
    for fraction in np.linspace(0.9, 0.0, 10):
        found, _ = _fixed_point(cost, full_widths, choices, floor + fraction * (budget - floor), budget, solver,
                                bins, max_iterations, penalty)
        if found is not None:
            return found
    return None


def solve_widths(cost: CostModel, full_widths: np.ndarray, choices: Sequence[GroupChoices], budget: float, *,
                 solver: str = "exact", bins: int = 10_000, max_iterations: int = 30, rounds: int = 8,
                 penalty: Penalty | None = None) -> Solution:
    """Best width assignment whose exact cost is within `budget` (and, where reachable, within 1% of it).

    Best: the most kept importance, or with a `penalty` the most importance minus the penalty.
    """
    if solver not in SOLVERS:
        raise KpcError(f"unknown solver {solver!r}: use one of {', '.join(SOLVERS)}")
    floor = minimum_cost(cost, full_widths, choices)
    if budget < floor:
        raise KpcError(f"budget {budget / scale(cost):.4g} {cost.unit} is below the smallest achievable cost "
                       f"{floor / scale(cost):.4g} {cost.unit} (every group at its minimum width)")
    target = budget
    best: Solution | None = None
    for _ in range(rounds):
        found, last = _fixed_point(cost, full_widths, choices, target, budget, solver, bins, max_iterations, penalty)
        if found is not None and (best is None or _objective(found, penalty) > _objective(best, penalty)):
            best = found
        if best is not None and best.cost >= budget * (1 - LANDING_TOLERANCE / 2):
            break
        reference = last.cost if found is None else found.cost
        if reference <= 0:
            break
        target = min(target * budget / reference, budget * 1.5)
    if best is None:
        best = _walk_down_to_floor(cost, full_widths, choices, budget, floor, solver, bins, max_iterations, penalty)
    if best is None:
        raise KpcError(f"no width assignment fits {budget / scale(cost):.4g} {cost.unit}; the smallest is "
                       f"{floor / scale(cost):.4g} {cost.unit}")
    return best


@dataclass(frozen=True)
class SpeedTrade:
    """The plan a FLOPs budget keeps when a runtime's latency model breaks near-ties, and what it traded."""

    solution: Solution  # the plan kept: the fastest predicted among those within the tolerance
    reference: Solution  # the most important plan within the budget (no penalty)
    predicted: float  # the kept plan's predicted latency (the speed model's internal units)
    reference_predicted: float
    weight: float  # the penalty weight that found it (0: the reference itself)


def fastest_within(cost: CostModel, speed: CostModel, full_widths: np.ndarray, choices: Sequence[GroupChoices],
                   budget: float, *, tolerance: float = SPEED_TOLERANCE, solver: str = "exact", bins: int = 10_000
                   ) -> SpeedTrade:
    """The plan within `budget` that `speed` predicts fastest, giving up at most `tolerance` of the total importance.

    Why: at equal FLOPs, plans that keep nearly the same importance differ by 10% in latency
    on ONNX Runtime (where they cut matters: activation traffic, channel blocks). Each weight
    of `SPEED_WEIGHTS` (in units of tolerance x total importance per unpruned millisecond) is
    solved with a penalty on predicted latency less its FLOPs-proportional part (the
    unpruned model's milliseconds per FLOP): a plain latency penalty would leave the budget
    unspent wherever channels carry little importance, where the budget is what the user
    asked for. The fastest plan that keeps the reference's importance less the tolerance,
    and lands on the budget as well as the reference does, is kept.
    """
    reference = solve_widths(cost, full_widths, choices, budget, solver=solver, bins=bins)
    reference_ms = speed.total(reference.widths)
    kept = SpeedTrade(reference, reference, reference_ms, reference_ms, 0.0)
    total, full_ms = value_of(choices, full_widths), speed.total(full_widths)
    if tolerance <= 0 or total <= 0 or full_ms <= 0:
        return kept
    least_value = reference.value - tolerance * total
    least_cost = min(reference.cost, budget * (1 - LANDING_TOLERANCE))
    unit = tolerance * total / full_ms
    per_cost = full_ms / max(cost.total(full_widths), 1e-300)
    for factor in SPEED_WEIGHTS:
        penalty = Penalty(((speed, unit * factor), (cost, -unit * factor * per_cost)))
        candidate = solve_widths(cost, full_widths, choices, budget, solver=solver, bins=bins, penalty=penalty)
        predicted = speed.total(candidate.widths)
        if candidate.value >= least_value and candidate.cost >= least_cost and predicted < kept.predicted:
            kept = SpeedTrade(candidate, reference, predicted, reference_ms, penalty.weight)
    return kept


def scale(cost: CostModel) -> float:
    """Internal cost units per displayed unit (MACs per GFLOP; latency models work in ms)."""
    return float(cost.scale)


def kept_by_group(choices: Sequence[GroupChoices], widths: np.ndarray) -> dict[int, list[int]]:
    """Kept channel indices of every prunable group (tied followers included), by group index."""
    kept: dict[int, list[int]] = {}
    for choice in choices:
        kept.update(choice.kept_by_group(int(widths[choice.index])))
    return kept


def kept_by_root(groups: Sequence[ChannelGroup], choices: Sequence[GroupChoices], widths: np.ndarray
                 ) -> dict[str, tuple[int, list[int]]]:
    """Groups that lose channels: root name -> (full width, kept indices)."""
    return {groups[index].root: (groups[index].width, indices)
            for index, indices in kept_by_group(choices, widths).items() if len(indices) < groups[index].width}


def value_of(choices: Sequence[GroupChoices], widths: np.ndarray) -> float:
    """Kept importance of a width assignment."""
    return float(sum(c.values[int(np.searchsorted(c.widths, widths[c.index]))] for c in choices))
