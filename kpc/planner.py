"""Choose a width per group under a budget: the knapsack, iterated to a fixed point.

Items are (group, width) options: a group keeps its top-k channels by importance, the
value is their summed importance and the cost comes from a `CostModel`. Because a
layer's cost depends on its own and its input group's width, costs are linearised at
the current assignment, the knapsack is solved, costs are recomputed at the solution
and the solve repeats until the widths stop changing. The exact cost of every
candidate is evaluated and the best one that truly fits the budget is kept; an outer
loop rescales the internal target when the fixed point lands short of or over it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kpc import knapsack
from kpc.costs import CostModel
from kpc.errors import KpcError

SOLVERS = ("exact", "greedy")
LANDING_TOLERANCE = 0.01  # a FLOPs plan may land at most this fraction under its budget


@dataclass
class GroupChoices:
    """The widths a group may take and the importance each one keeps."""

    index: int
    widths: np.ndarray  # ascending, last one = full width
    values: np.ndarray  # kept importance for each width
    order: np.ndarray  # channel indices, most important first

    def kept_indices(self, width: int) -> list[int]:
        return sorted(int(i) for i in self.order[:width])


def width_options(width: int, round_to: int, min_channels: int) -> np.ndarray:
    """Multiples of `round_to` from the smallest allowed up to the full width (always included)."""
    round_to = max(1, round_to)
    lowest = min(width, max(1, min_channels))
    first = -(-lowest // round_to) * round_to
    options = [w for w in range(first, width, round_to) if w >= lowest]
    return np.array([*options, width], dtype=np.int64)


def make_choices(index: int, scores: np.ndarray, round_to: int, min_channels: int) -> GroupChoices:
    order = np.argsort(-scores, kind="stable")
    cumulative = np.concatenate([[0.0], np.cumsum(scores[order])])
    widths = width_options(len(scores), round_to, min_channels)
    return GroupChoices(index, widths, cumulative[widths], order)


@dataclass
class Solution:
    widths: np.ndarray  # one entry per group (all groups, whole ones at full width)
    cost: float  # exact cost of the assignment under the cost model
    value: float  # kept importance
    iterations: int


def minimum_cost(cost: CostModel, full_widths: np.ndarray, choices: Sequence[GroupChoices]) -> float:
    widths = full_widths.astype(np.float64).copy()
    for choice in choices:
        widths[choice.index] = choice.widths[0]
    return cost.total(widths)


def _fixed_point(cost: CostModel, full_widths: np.ndarray, choices: Sequence[GroupChoices], target: float,
                 budget: float, solver: str, bins: int, max_iterations: int) -> tuple[Solution | None, Solution]:
    """Iterate solve -> recompute costs; return (best solution within `budget`, last solution)."""
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
            options.append([knapsack.Option(int(w), float(d - low), float(v))
                            for w, d, v in zip(choice.widths, delta, choice.values, strict=True)])
        capacity = max(target - base - floor, 0.0)
        solved = knapsack.solve(options, capacity, method=solver, bins=bins)
        new = current.copy()
        for choice, pick in zip(choices, solved.choice, strict=True):
            new[choice.index] = choice.widths[pick]
        value = float(sum(c.values[p] for c, p in zip(choices, solved.choice, strict=True)))
        last = Solution(new, cost.total(new), value, iteration)
        if last.cost <= budget and (best is None or last.value > best.value):
            best = last
        key = tuple(new)
        if np.array_equal(new, current) or key in seen:
            break
        seen.add(key)
        current = new
    assert last is not None
    return best, last


def _walk_down_to_floor(cost: CostModel, full_widths: np.ndarray, choices: Sequence[GroupChoices], budget: float,
                        floor: float, solver: str, bins: int, max_iterations: int) -> Solution | None:
    """Targets stepping from the budget to the floor, for when every linearised solve landed over the budget.

    Step-like latency costs can do that near the floor; the all-minimum assignment always fits there.
    """
    for fraction in np.linspace(0.9, 0.0, 10):
        found, _ = _fixed_point(cost, full_widths, choices, floor + fraction * (budget - floor), budget, solver,
                                bins, max_iterations)
        if found is not None:
            return found
    return None


def solve_widths(cost: CostModel, full_widths: np.ndarray, choices: Sequence[GroupChoices], budget: float, *,
                 solver: str = "exact", bins: int = 10_000, max_iterations: int = 30, rounds: int = 8
                 ) -> Solution:
    """Best width assignment whose exact cost is within `budget` (and, where reachable, within 1% of it)."""
    if solver not in SOLVERS:
        raise KpcError(f"unknown solver {solver!r}: use one of {', '.join(SOLVERS)}")
    floor = minimum_cost(cost, full_widths, choices)
    if budget < floor:
        raise KpcError(f"budget {budget / scale(cost):.4g} {cost.unit} is below the smallest achievable cost "
                       f"{floor / scale(cost):.4g} {cost.unit} (every group at its minimum width)")
    target = budget
    best: Solution | None = None
    for _ in range(rounds):
        found, last = _fixed_point(cost, full_widths, choices, target, budget, solver, bins, max_iterations)
        if found is not None and (best is None or found.value > best.value):
            best = found
        if best is not None and best.cost >= budget * (1 - LANDING_TOLERANCE / 2):
            break
        reference = last.cost if found is None else found.cost
        if reference <= 0:
            break
        target = min(target * budget / reference, budget * 1.5)
    if best is None:
        best = _walk_down_to_floor(cost, full_widths, choices, budget, floor, solver, bins, max_iterations)
    if best is None:
        raise KpcError(f"no width assignment fits {budget / scale(cost):.4g} {cost.unit}; the smallest is "
                       f"{floor / scale(cost):.4g} {cost.unit}")
    return best


def scale(cost: CostModel) -> float:
    """Internal cost units per displayed unit (MACs per GFLOP; latency models work in ms)."""
    return 1e9 if cost.unit == "GFLOPs" else 1.0
