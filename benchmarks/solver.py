"""Knapsack solver on ResNet-50's groups at 224: solve time on one core, and kept importance vs greedy.

Target (issue 2): one exact solve under 50 ms on one core. The importance comes from a
real Taylor pass over Fashion-MNIST images (upsampled to 3x224x224), the costs from
kpc's FLOPs model. Three solvers on the same options: the shipped exact solver (DP,
slack polish, greedy guard), the DP with polish alone, and the paper's greedy.

    python benchmarks/solver.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from _record import append_results

from kpc import knapsack
from kpc.artifact import open_model
from kpc.channels import tie_of
from kpc.costs import FlopsModel
from kpc.data import calibration_batches, parse_data_spec
from kpc.importance import accumulate_gradients, score_groups
from kpc.planner import make_choices, solve_widths
from kpc.pruning import analyse_groups


def linearised_options(cost, full, choices):
    """The knapsack instance of the first fixed-point iteration (costs linearised at full width)."""
    groups, floor = [], 0.0
    for choice in choices:
        delta = cost.option_costs(full, choice.index, choice.widths.astype(np.float64))
        floor += float(delta.min())
        groups.append([knapsack.Option(int(w), float(d - delta.min()), float(v))
                       for w, d, v in zip(choice.widths, delta, choice.values, strict=True)])
    return groups, floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)

    loaded = open_model("torchvision:resnet50", num_classes=10, input_size=(3, 224, 224))
    round_to, min_channels = 8, 8
    example = loaded.example_input()
    graph, groups = analyse_groups(loaded.model, example, round_to=round_to, min_channels=min_channels)
    accumulate_gradients(loaded.model, calibration_batches(parse_data_spec("fashion-mnist"), loaded.input_size,
                                                           batches=4, batch_size=8))
    scores = score_groups(groups, "taylor").values
    cost = FlopsModel(loaded.model, example, graph, groups)
    full = np.array([g.width for g in groups], dtype=np.float64)
    choices = [make_choices(tie_of(groups, g), scores, round_to, min_channels)
               for g in groups if g.prunable and g.tied_to is None]
    instance, shift = linearised_options(cost, full, choices)
    options = sum(len(g) for g in instance)
    full_cost = cost.total(full)
    total_importance = float(sum(s.sum() for s in scores.values()))

    rows = []
    for ratio in (0.3, 0.5, 0.7):
        budget = ratio * full_cost
        capacity = budget - full_cost - shift  # as in the planner's first iteration
        solvers = {
            "exact (shipped)": lambda cap=capacity: knapsack.solve_exact(instance, cap),
            "DP + polish only": lambda cap=capacity: knapsack.solve_exact(instance, cap, greedy_guard=False),
            "greedy": lambda cap=capacity: knapsack.solve_greedy(instance, cap),
        }
        single = {}
        for name, solve in solvers.items():
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                solution = solve()
                times.append((time.perf_counter() - started) * 1e3)
            single[name] = (statistics.median(times), solution.value)
        fixed_point = {}
        for solver in ("exact", "greedy"):
            started = time.perf_counter()
            solution = solve_widths(cost, full, choices, budget, solver=solver)
            fixed_point[solver] = ((time.perf_counter() - started) * 1e3, solution)
        for name, (ms, value) in single.items():
            rows.append([f"{ratio:.0%}", name, f"{ms:.1f}", f"{value / total_importance:.4%}", "", ""])
        for solver, (ms, solution) in fixed_point.items():
            rows.append([f"{ratio:.0%}", f"{solver}, full fixed point", f"{ms:.1f}",
                         f"{solution.value / total_importance:.4%}", f"{solution.cost / full_cost:.4f}",
                         solution.iterations])
    headers = ["budget (of FLOPs)", "solver", "median ms (1 core)", "kept importance", "cost / full",
               "iterations"]
    notes = [f"ResNet-50 at 3x224x224: {len(choices)} prunable groups, {options} width options, 10,000 bins; "
             f"importance: Taylor over 4x8 Fashion-MNIST images; {args.repeats} repeats per single solve",
             "'exact (shipped)' is the DP with slack polish and a greedy guard (the better of the two is kept); "
             "'DP + polish only' drops the guard"]
    from _record import markdown_table

    print(markdown_table(headers, rows))
    if not args.no_record:
        append_results("Knapsack solver on ResNet-50 groups (issue 2)", headers, rows, threads=1, notes=notes)


if __name__ == "__main__":
    main()
