"""The multiple-choice knapsack against brute force, on real random instances (no mocks).

Brute force (`itertools.product` over every choice) is the ground truth. Where costs are
multiples of the bin size the DP must match it exactly; with arbitrary float costs it
must stay feasible and within the documented discretisation bound.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kpc import knapsack
from kpc.knapsack import (
    Infeasible,
    Option,
    Solution,
    max_cost,
    min_cost,
    solve,
    solve_exact,
    solve_greedy,
)

Groups = list[list[Option]]
REPO = Path(__file__).resolve().parents[1]
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def brute_force(groups: Groups, budget: float) -> float:
    """Best total value over all choices whose true cost fits `budget` (-inf if none does)."""
    best = -math.inf
    for combo in itertools.product(*groups):
        if math.fsum(o.cost for o in combo) <= budget:
            best = max(best, math.fsum(o.value for o in combo))
    return best


def check_solution(groups: Groups, solution: Solution, budget: float) -> None:
    """The reported cost/value are those of the reported choice, and it fits the budget."""
    assert len(solution.choice) == len(groups)
    picked = [group[i] for group, i in zip(groups, solution.choice, strict=True)]
    assert solution.cost == pytest.approx(math.fsum(o.cost for o in picked), abs=1e-12)
    assert solution.value == pytest.approx(math.fsum(o.value for o in picked), abs=1e-12)
    assert solution.cost <= budget + 1e-9


def make_groups(raw: list[list[tuple[float, float]]]) -> Groups:
    return [[Option(width=i + 1, cost=float(c), value=float(v)) for i, (c, v) in enumerate(g)] for g in raw]


integer_groups = st.lists(
    st.lists(st.tuples(st.integers(0, 20), st.integers(0, 50)), min_size=1, max_size=5),
    min_size=1, max_size=5,
).map(make_groups)

float_groups = st.lists(
    st.lists(
        st.tuples(st.floats(0.0, 100.0, allow_nan=False), st.floats(0.0, 100.0, allow_nan=False)),
        min_size=1, max_size=5,
    ),
    min_size=1, max_size=5,
).map(make_groups)


def integer_instance(groups: Groups, extra: int) -> tuple[float, int]:
    """An integer budget `extra` above the minimum and bins that make the bin size exactly 1."""
    budget = min_cost(groups) + extra
    return budget, max(extra, 1)


# --------------------------------------------------------------------------- exactness


@PROPERTY
@given(groups=integer_groups, extra=st.integers(0, 60))
def test_exact_matches_brute_force_on_integer_costs(groups: Groups, extra: int) -> None:
    budget, bins = integer_instance(groups, extra)
    solution = solve_exact(groups, budget, bins=bins)
    check_solution(groups, solution, budget)
    assert solution.cost <= budget
    assert solution.value == brute_force(groups, budget)


@PROPERTY
@given(groups=integer_groups, extra=st.integers(0, 60))
def test_dp_core_alone_is_exact_on_integer_costs(groups: Groups, extra: int) -> None:
    """The DP by itself (before the greedy polish can hide a bug) is optimal when bins are exact."""
    budget, bins = integer_instance(groups, extra)
    arrays = knapsack._arrays(groups)
    solution = knapsack._dp(arrays, budget - min_cost(groups), bins)
    check_solution(groups, solution, budget)
    assert solution.value == brute_force(groups, budget)


@PROPERTY
@given(groups=float_groups, fraction=st.floats(0.0, 1.2), bins=st.integers(1, 60))
def test_exact_with_float_costs_is_feasible_and_within_the_discretisation_bound(
    groups: Groups, fraction: float, bins: int
) -> None:
    low, high = min_cost(groups), max_cost(groups)
    budget = low + fraction * (high - low)
    bin_size = (budget - low) / bins
    optimum = brute_force(groups, budget)
    lower = brute_force(groups, budget - len(groups) * bin_size - 1e-9)
    for solution in (solve_exact(groups, budget, bins=bins),
                     knapsack._dp(knapsack._arrays(groups), budget - low, bins)):
        check_solution(groups, solution, budget)
        assert solution.value <= optimum + 1e-9
        if lower > -math.inf:
            assert solution.value >= lower - 1e-9


# --------------------------------------------------------------------------- greedy


@PROPERTY
@given(groups=integer_groups, extra=st.integers(0, 60))
def test_greedy_never_beats_exact(groups: Groups, extra: int) -> None:
    budget, bins = integer_instance(groups, extra)
    greedy = solve_greedy(groups, budget)
    check_solution(groups, greedy, budget)
    assert greedy.value <= solve_exact(groups, budget, bins=bins).value


@PROPERTY
@given(groups=float_groups, fraction=st.floats(0.0, 1.2))
def test_greedy_is_always_feasible(groups: Groups, fraction: float) -> None:
    low, high = min_cost(groups), max_cost(groups)
    budget = low + fraction * (high - low)
    greedy = solve_greedy(groups, budget)
    check_solution(groups, greedy, budget)
    assert greedy.cost <= budget
    # Exact (DP, polished, never below the greedy) is at least as good even with float costs.
    assert solve_exact(groups, budget, bins=50).value >= greedy.value


def test_a_budget_a_denormal_above_the_floor_is_solved() -> None:
    """Found by the property above: capacity 5e-324 over 50 bins underflowed a bin to 0, every option read as
    over the capacity, and the DP reduced an empty array."""
    groups = make_groups([[(0.0, 0.0), (1.0, 1.0)]])
    solved = solve_exact(groups, 5e-324, bins=50)
    assert solved.choice == (0,) and solved.cost == 0.0


def test_greedy_is_the_ratio_baseline_and_can_be_suboptimal() -> None:
    # A's upgrade has the better ratio (2 vs 1.5), takes 1 unit, and then B's no longer fits.
    groups = make_groups([[(0, 0), (1, 2)], [(0, 0), (10, 15)]])
    assert solve_greedy(groups, 10).choice == (1, 0)
    assert solve_greedy(groups, 10).value == 2
    exact = solve_exact(groups, 10, bins=10)
    assert exact.choice == (0, 1)
    assert exact.value == 15


def test_greedy_considers_non_adjacent_upgrades() -> None:
    # Jumping straight to the last option (ratio 5) beats the poor next step (ratio 0.1).
    groups = make_groups([[(0, 0), (1, 0.1), (2, 10)]])
    assert solve_greedy(groups, 2).choice == (2,)
    # With room for only the next step, it takes that.
    assert solve_greedy(groups, 1.5).choice == (1,)


# --------------------------------------------------------------------------- budgets and edges


@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_infeasible_reports_the_minimum(method: str) -> None:
    groups = make_groups([[(3, 1), (5, 2)], [(4.5, 1), (9, 3)]])
    with pytest.raises(Infeasible) as caught:
        solve(groups, 7.0, method=method)
    assert caught.value.min_cost == 7.5
    assert "7.5" in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_budget_equal_to_min_cost_is_feasible(method: str) -> None:
    groups = make_groups([[(0.1, 1), (5, 2)], [(0.2, 1), (9, 3)], [(0.3, 4)]])
    budget = min_cost(groups)
    solution = solve(groups, budget, method=method)
    assert solution.choice == (0, 0, 0)
    assert solution.cost == budget
    assert solution.value == 6


@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_budget_at_or_above_max_cost_keeps_everything(method: str) -> None:
    rng = np.random.default_rng(0)
    groups = monotone_instance(rng, 8, 12)
    for budget in (max_cost(groups), max_cost(groups) * 2):
        solution = solve(groups, budget, method=method)
        assert solution.choice == tuple(len(g) - 1 for g in groups)
        assert solution.value == pytest.approx(sum(g[-1].value for g in groups))


def test_no_groups_give_an_empty_solution() -> None:
    assert min_cost([]) == 0.0
    assert max_cost([]) == 0.0
    for method in ("exact", "greedy"):
        assert solve([], 0.0, method=method) == Solution((), 0.0, 0.0)
        with pytest.raises(Infeasible):
            solve([], -1.0, method=method)


def test_single_option_groups_and_zero_costs() -> None:
    groups = make_groups([[(0, 3)], [(0, 0), (0, 2), (4, 5)], [(2, 1)]])
    assert min_cost(groups) == 2
    assert max_cost(groups) == 6
    for method in ("exact", "greedy"):
        tight = solve(groups, 2, method=method)
        assert tight.choice == (0, 1, 0)  # the free upgrade is taken even with no slack
        assert tight.value == 6
        roomy = solve(groups, 6, method=method)
        assert roomy.choice == (0, 2, 0)


def test_ties_in_value_prefer_the_cheaper_choice() -> None:
    # The third group's upgrade never fits, so the DP (not the all-maxima shortcut) decides.
    groups = make_groups([[(0, 0), (3, 5), (6, 5)], [(0, 1), (2, 1)], [(0, 0), (100, 10)]])
    solution = solve_exact(groups, 8, bins=8)
    assert solution.choice == (1, 0, 0)
    assert solution.cost == 3
    core = knapsack._dp(knapsack._arrays(groups), 8, 8)
    assert core.choice == (1, 0, 0)


def test_an_empty_group_is_rejected() -> None:
    with pytest.raises(ValueError, match="group 1 has no options"):
        solve_exact(make_groups([[(1, 1)], []]), 5)


def test_unknown_method_lists_the_methods() -> None:
    groups = make_groups([[(1, 1)]])
    with pytest.raises(ValueError, match="exact") as caught:
        solve(groups, 2, method="simplex")
    assert "greedy" in str(caught.value)
    assert "simplex" in str(caught.value)


def test_dispatch_matches_the_solvers() -> None:
    rng = np.random.default_rng(3)
    groups = monotone_instance(rng, 10, 20)
    budget = min_cost(groups) + 0.3 * (max_cost(groups) - min_cost(groups))
    assert solve(groups, budget) == solve_exact(groups, budget)
    assert solve(groups, budget, method="exact", bins=500) == solve_exact(groups, budget, bins=500)
    assert solve(groups, budget, method="greedy") == solve_greedy(groups, budget)


# --------------------------------------------------------------------------- realistic size


def monotone_instance(rng: np.random.Generator, n_groups: int, n_options: int) -> Groups:
    """Costs increasing with width (FLOPs-like), values concave non-decreasing (sorted importance)."""
    groups: Groups = []
    for _ in range(n_groups):
        per_channel = rng.uniform(1e3, 1e5)
        widths = np.arange(1, n_options + 1)
        costs = per_channel * widths * rng.uniform(0.9, 1.1)
        values = np.cumsum(np.sort(rng.exponential(1.0, n_options))[::-1])
        options = zip(widths, costs, values, strict=True)
        groups.append([Option(int(w), float(c), float(v)) for w, c, v in options])
    return groups


def test_realistic_instance_solves_feasibly() -> None:
    rng = np.random.default_rng(42)
    groups = monotone_instance(rng, 50, 200)
    low, high = min_cost(groups), max_cost(groups)
    budget = low + 0.4 * (high - low)
    exact = solve_exact(groups, budget)
    greedy = solve_greedy(groups, budget)
    for solution in (exact, greedy):
        check_solution(groups, solution, budget)
        assert solution.cost <= budget
        assert all(0 <= i < 200 for i in solution.choice)
    assert exact.value >= greedy.value
    # The budget is used: at most the discretisation loss (50 bins of 10,000) is left over.
    assert exact.cost >= budget - 50 * (budget - low) / 10_000


# --------------------------------------------------------------------------- purity


def test_knapsack_does_not_import_torch() -> None:
    code = "import sys, kpc.knapsack; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
