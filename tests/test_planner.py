"""The planner's speed preference: a FLOPs budget whose near-ties a runtime's latency model breaks."""

from __future__ import annotations

import numpy as np
import pytest

from kpc.cost_model import FLOPS_LANDING
from kpc.planner import GroupChoices, fastest_within, solve_widths, value_of


class Additive:
    """A cost that is a sum of per-channel prices, one price per group (a CostModel)."""

    unit, scale, width_step, landing = "units", 1.0, 1, FLOPS_LANDING

    def __init__(self, prices: list[float]) -> None:
        self.prices = np.asarray(prices, dtype=np.float64)

    def total(self, widths: np.ndarray) -> float:
        return float(self.prices @ np.asarray(widths, dtype=np.float64))

    def option_costs(self, widths: np.ndarray, group: int, options: np.ndarray) -> np.ndarray:
        return self.prices[group] * (np.asarray(options, dtype=np.float64) - widths[group])

    def measure(self, model: object) -> float:
        raise AssertionError("the planner never builds a model")


def choice(index: int, per_channel: list[float]) -> GroupChoices:
    """A group of len(per_channel) channels, ranked as given, each width a step of 1 from 1 up."""
    values = np.asarray(per_channel, dtype=np.float64)
    widths = np.arange(1, len(values) + 1)
    return GroupChoices(index, widths, np.cumsum(values)[widths - 1], np.arange(len(values)))


# Two groups of 8 channels, the same FLOPs per channel. Group 0 is four times as slow per channel
# on the runtime; its channels carry a hair more importance than group 1's.
FLOPS = Additive([1.0, 1.0])
SPEED = Additive([4.0, 1.0])
CHOICES = [choice(0, [1.0] * 8), choice(1, [0.99] * 8)]
FULL = np.array([8.0, 8.0])
BUDGET = 10.0


def test_the_most_important_plan_ignores_speed():
    reference = solve_widths(FLOPS, FULL, CHOICES, BUDGET)
    assert list(reference.widths) == [8, 2]  # every one of group 0's slightly more important channels


def test_a_flops_plan_trades_at_most_the_tolerance_for_speed():
    reference = solve_widths(FLOPS, FULL, CHOICES, BUDGET)
    trade = fastest_within(FLOPS, SPEED, FULL, CHOICES, BUDGET, tolerance=0.01)
    total = value_of(CHOICES, FULL)
    assert trade.reference.value == pytest.approx(reference.value)
    assert trade.solution.cost <= BUDGET and trade.solution.cost >= BUDGET * 0.99  # still lands on the budget
    assert trade.solution.value >= reference.value - 0.01 * total
    assert trade.predicted == pytest.approx(SPEED.total(trade.solution.widths))
    assert trade.predicted < trade.reference_predicted  # moved channels from the slow group to the fast one
    assert trade.solution.widths[0] < 8 and trade.weight > 0


def test_no_tolerance_keeps_the_most_important_plan():
    trade = fastest_within(FLOPS, SPEED, FULL, CHOICES, BUDGET, tolerance=0.0)
    assert list(trade.solution.widths) == [8, 2] and trade.weight == 0


def test_a_large_importance_gap_is_not_traded():
    """When the fast group's channels are worth much less, no weight within the tolerance moves the plan."""
    choices = [choice(0, [1.0] * 8), choice(1, [0.5] * 8)]
    trade = fastest_within(FLOPS, SPEED, FULL, choices, BUDGET, tolerance=0.01)
    assert list(trade.solution.widths) == [8, 2]
    assert trade.predicted == trade.reference_predicted
