"""`kpc.prune`: groups -> importance -> costs -> knapsack -> closed loop -> a pruned copy and its plan.

Model first: any `nn.Module` and an example input, calibration from any iterable of
batches. The model passed in is left untouched; the result holds the pruned copy and a
typed `Plan` that `kpc.save` writes and `kpc.load` replays.

Every step that can break a network is checked: unsafe groups are found before the
solve (by pruning copies), a group whose importance cannot be computed is left whole,
and every candidate the closed loop builds is run before it is counted or timed; a group
that still breaks is left whole and the loop continues. The plan records each attempt.
"""

from __future__ import annotations

import collections.abc
import logging
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from kpc.apply import apply_kept
from kpc.batchnorm import DEFAULT_BATCHES as DEFAULT_BN_BATCHES
from kpc.batchnorm import recalibrate_batchnorm
from kpc.budget import Budget
from kpc.channels import ChannelGroup, leave_whole, tie_of
from kpc.cost_model import CostModel
from kpc.costs import FlopsModel
from kpc.devices import module_device
from kpc.errors import KpcError
from kpc.groups import build_graph, discover_groups, find_classifier
from kpc.heads import mark_head_groups
from kpc.importance import (
    METHODS,
    SizedCalibration,
    accumulate_gradients,
    as_batches,
    check_precision,
    needs_gradients,
    resolve_precision,
    score_groups,
)
from kpc.landing import ClosedLoop, Realised, samples_of
from kpc.lazy import materialize
from kpc.modelcopy import copy_model
from kpc.parametrizations import bake
from kpc.plan import GroupDecision, Plan, PruneRound
from kpc.planner import (
    SOLVERS,
    SPEED_TOLERANCE,
    GroupChoices,
    Solution,
    SpeedTrade,
    fastest_within,
    kept_by_group,
    kept_by_root,
    make_choices,
    minimum_cost,
    smallest_group_widths,
    smallest_widths,
    solve_widths,
    value_of,
)
from kpc.safety import check_forward, confirm_head_layouts, find_unsafe_groups, first_line, probe_kept
from kpc.sensitivity import (
    AUTO_POINTS,
    auto_decision,
    estimated_seconds,
    measure_values,
    measured_passes,
)
from kpc.stopwatch import Stopwatch
from kpc.tracing import input_advice, refuse_scripted

log = logging.getLogger(__name__)

DEFAULT_ROUND_TO = 8  # width step when no runtime says otherwise
FILL_BUILDS = 24  # candidate models built (and counted) while growing a FLOPs plan to the budget's frontier
FILL_SLACK = 0.02  # steps predicted up to this much over the budget are still built and counted
COMPLETE_STEPS = 4096  # single-option steps the greedy completion takes on predictions before its one build


@dataclass
class PruneSettings:
    """How to prune. The CLI's options and the recipe's `prune:` section take their defaults from here."""

    importance: str = "auto"  # auto: taylor-signed, or consumer-l2 with `sensitivity` (benchmarks/oneshot.py)
    calib_batches: int = 8  # batches of the calibration data the importance pass reads
    calib_batch_size: int = 32  # batch size when kpc reads a data spec itself
    solver: str = "exact"  # exact (DP) or greedy (the paper code's value/cost ratio)
    round_to: int | None = None  # kept widths are multiples of this; None: the runtime's step, else 8
    min_channels: int = 8  # no group keeps fewer channels
    ignore: tuple[str, ...] = ()  # layer names or globs left whole
    seed: int = 0
    bins: int = 10_000  # cost bins of the exact knapsack
    bn_recalibrate: int | None = None  # batches re-estimating BatchNorm statistics; None: 20 with data, else 0
    importance_precision: str = "auto"  # number format of the importance and sensitivity passes (PRECISIONS)
    # widths per group whose effect on the output is measured to value the knapsack; 0: summed importance;
    # auto: AUTO_POINTS when calibration data is given and the measurement is estimated to fit AUTO_SECONDS
    sensitivity: int | str = "auto"

    def check(self) -> None:
        if self.importance != "auto" and self.importance not in METHODS:
            raise KpcError(f"unknown importance {self.importance!r}: use one of auto, {', '.join(METHODS)}")
        check_precision(self.importance_precision)
        if self.solver not in SOLVERS:
            raise KpcError(f"unknown solver {self.solver!r}: use one of {', '.join(SOLVERS)}")
        if self.sensitivity != "auto" and (isinstance(self.sensitivity, bool) or not isinstance(self.sensitivity, int)
                                           or self.sensitivity < 0):
            raise KpcError(f"--sensitivity must be auto or a non-negative number of widths per group (got "
                           f"{self.sensitivity!r})")
        for name in ("calib_batches", "calib_batch_size", "min_channels", "bins"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KpcError(f"--{name.replace('_', '-')} must be a positive integer (got {value!r})")
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                          or self.round_to < 1):
            raise KpcError(f"--round-to must be a positive integer (got {self.round_to!r})")
        if self.bn_recalibrate is not None and (isinstance(self.bn_recalibrate, bool) or not isinstance(
                self.bn_recalibrate, int) or self.bn_recalibrate < 0):
            raise KpcError(f"--bn-recalibrate must be a non-negative number of batches (got {self.bn_recalibrate!r})")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise KpcError(f"--seed must be an integer in 0..2**63-1 (got {self.seed!r})")

    def resolved(self) -> PruneSettings:
        """These settings with `importance: auto` made concrete, once the sensitivity is decided.

        Chosen on the validation split (benchmarks/oneshot.py, two Fashion-MNIST teachers):
        summed values rank best with taylor-signed; measured ones with consumer-l2, where
        taylor-signed's order lost 2-9 points at 2x and 4x. While `sensitivity` is still
        auto (decided in the prune, from the model and the data), so is the importance.
        """
        if self.importance != "auto" or self.sensitivity == "auto":
            return self
        return replace(self, importance="consumer-l2" if self.sensitivity else "taylor-signed")

    def may_need_gradients(self) -> bool:
        """Whether the importance pass may read gradients (undecided settings may still pick Taylor)."""
        chosen = self.resolved()
        return chosen.importance == "auto" or needs_gradients(chosen.importance)


@dataclass
class PruneResult:
    """The pruned copy, its plan (this round appended to what the input model already carried), its groups."""

    model: nn.Module
    plan: Plan
    groups: list[ChannelGroup] = field(default_factory=list)
    parent: nn.Module | None = field(default=None, repr=False)  # the model pruned (untouched), for kpc.save's check

    @property
    def round(self) -> PruneRound:
        return self.plan.rounds[-1]


def prune(model: nn.Module, example_inputs: torch.Tensor, budget: Budget, calibration: Iterable[Any] | None = None,
          *, importance: str | None = None, round_to: int | None = None, min_channels: int | None = None,
          ignore: Sequence[str] | None = None, solver: str | None = None, seed: int | None = None,
          bn_recalibrate: int | None = None, recalibration: Iterable[Any] | None = None,
          settings: PruneSettings | None = None, data_label: str | None = None,
          progress: Callable[[], None] | None = None) -> PruneResult:
    """Prune a copy of `model` to `budget`; `model` itself is left untouched (its lazy layers, if any, take shapes).

    `example_inputs` is one input batch (N, C, H, W) the model accepts; `calibration` any
    iterable of image batches or (images, labels) pairs (a DataLoader). Without
    calibration data, Taylor importance falls back to weight magnitude. The pruned copy's
    BatchNorm statistics are re-estimated on `bn_recalibrate` batches (default 20 when
    calibration data is given, else none) of `recalibration`, else of the calibration data
    again. Keyword arguments override `settings` (a `PruneSettings`).
    """
    chosen = settings or PruneSettings()
    overrides = {k: v for k, v in {"importance": importance, "round_to": round_to, "min_channels": min_channels,
                                   "ignore": tuple(ignore) if ignore is not None else None, "solver": solver,
                                   "seed": seed, "bn_recalibrate": bn_recalibrate}.items() if v is not None}
    chosen = replace(chosen, **overrides)
    chosen.check()
    if chosen.sensitivity == "auto" and calibration is None:
        chosen = replace(chosen, sensitivity=0)
    chosen = chosen.resolved()
    if not isinstance(budget, Budget):
        raise KpcError(f"budget should be a kpc.Budget, got {type(budget).__name__}")
    if not isinstance(model, nn.Module):
        raise KpcError(f"model should be a torch.nn.Module, got {type(model).__name__}")
    example = _example(example_inputs)
    if needs_gradients(chosen.importance) and calibration is None:
        log.info("no calibration data: scoring channels by weight magnitude instead of Taylor importance")
        chosen = replace(chosen, importance="magnitude")
    if chosen.bn_recalibrate is None:
        chosen = replace(chosen, bn_recalibrate=DEFAULT_BN_BATCHES if calibration is not None else 0)
    if chosen.sensitivity and calibration is None:
        raise KpcError("--sensitivity needs data: give calibration batches (CLI: --data), or 0")
    if chosen.bn_recalibrate and calibration is None and recalibration is None:
        raise KpcError("--bn-recalibrate needs data: give calibration batches (CLI: --data), or 0")
    size = example.shape[1:]  # every image the importance pass and the BatchNorm statistics read has this size
    pruner = _Pruner(model, example, budget, chosen,
                     SizedCalibration(_Replayable(calibration), size) if calibration is not None else None,
                     data_label, progress)
    result = pruner.run()
    if chosen.bn_recalibrate:
        source = SizedCalibration(recalibration, size) if recalibration is not None else pruner.calibration
        with pruner.clock.step("batchnorm"):
            result.round.bn_recalibration = recalibrate_batchnorm(result.model, source, chosen.bn_recalibrate)
        result.model.eval()
    result.round.seconds = pruner.clock.as_json()
    log.info("prune steps: %s", pruner.clock.summary())
    return result


class _Replayable:
    """Calibration batches that can be read twice (importance, then BatchNorm recalibration).

    A DataLoader or a list is simply iterated again; a one-shot iterator (a generator) is
    kept as it is read, so the recalibration sees the same images.
    """

    def __init__(self, source: Iterable[Any]) -> None:
        self.source = source
        self.seen: list[Any] = []
        self.reiterable = not isinstance(source, collections.abc.Iterator)

    def __iter__(self) -> Any:
        if self.reiterable:
            yield from self.source
            return
        yield from self.seen
        for item in self.source:
            self.seen.append(item)
            yield item


def analyse_groups(model: nn.Module, example: torch.Tensor, *, round_to: int, min_channels: int,
                   ignore: Sequence[str] = (), clock: Stopwatch | None = None) -> tuple[Any, list[ChannelGroup]]:
    """Build the graph, list the groups and mark the ones that cannot be pruned safely (left whole, with why)."""
    clock = clock or Stopwatch()
    with clock.step("graph"):
        graph = build_graph(model, example)
    with clock.step("groups"):
        groups = discover_groups(model, graph, ignore=ignore, never_prune=find_classifier(model, example),
                                 min_channels=min_channels)
        mark_head_groups(model, groups)
        confirm_head_layouts(model, example, graph, groups)
    candidates = [g for g in groups if g.prunable]
    with clock.step("probe"):
        unsafe = find_unsafe_groups(model, example, candidates, probe_kept(round_to, min_channels))
    for index, reason in unsafe.items():
        for group in leave_whole(groups, index, f"unsafe to prune: {reason}"):
            log.info("group %s is left whole: %s", group.root, group.reason)
    return graph, groups


def _example(example_inputs: Any) -> torch.Tensor:
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.ndim != 4 or 0 in example_inputs.shape:
        shape = tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else type(example_inputs)
        raise KpcError(f"example_inputs should be one image batch of shape (N, C, H, W), got {shape}")
    return example_inputs.detach()[:1].float()


class _Pruner:
    """One prune; methods are its steps."""

    def __init__(self, model: nn.Module, example: torch.Tensor, budget: Budget, settings: PruneSettings,
                 calibration: Iterable[Any] | None, data_label: str | None,
                 progress: Callable[[], None] | None) -> None:
        from kpc.artifact import provenance

        refuse_scripted(model)
        self.source_model = materialize(model, example.shape[1:])  # lazy layers take their shapes first
        other = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                        if p.is_floating_point() and p.dtype != torch.float32})
        if other:  # it failed in the first forward pass, with advice about the input size
            raise KpcError(f"the model's weights are {', '.join(other)}: kpc prunes float32 models; pass "
                           "model.float() and cast the pruned model back afterwards")
        self.work = copy_model(model).eval().requires_grad_(True)  # a frozen model still gets its gradients
        self.baked = bake(self.work)  # a parametrized weight (weight_norm, ...) cannot be sliced: its value can
        self.example = example
        self.budget, self.settings = budget, settings
        self.calibration, self.progress = calibration, progress
        self.data_label = data_label or ("user data" if calibration is not None else "none")
        self.input_size = tuple(int(d) for d in example.shape[1:])
        self.earlier = provenance(model)
        self.substituted: list[str] = []  # groups ranked by magnitude: Taylor found no gradient there
        self.gradient_precision: str | None = None  # the importance pass's number format, once it ran
        self.gradient_images = 0  # images the importance pass read
        self.sensitivity_decision = ""  # what `sensitivity: auto` decided, and why (recorded in the plan)
        self.auto_importance = settings.importance == "auto"  # chosen by kpc, so a fallback may change it
        self.clock = Stopwatch()
        try:
            with torch.no_grad():
                reference = self.work(example)
        except Exception as exc:
            raise KpcError(f"the model fails on an input of shape {tuple(example.shape)} ({first_line(exc)}): "
                           f"{input_advice(model)}") from exc
        if not isinstance(reference, torch.Tensor):
            raise KpcError(f"the model returns a {type(reference).__name__}; kpc prunes models that return one "
                           "tensor")
        self.output_shape = reference.shape

    # ------------------------------------------------------------ steps

    def run(self) -> PruneResult:
        graph, groups = self.analyse()
        with self.clock.step("cost model"):
            make_cost, round_to = self.cost_factory()
            cost: CostModel = make_cost(self.work, self.example, graph, groups)
            round_to = math.lcm(round_to, int(cost.width_step))
            speed = self.speed_model(graph, groups, round_to)
        full_widths = np.array([g.width for g in groups], dtype=np.float64)
        full_cost = cost.total(full_widths)
        # a budget no plan can meet is refused before the data passes (seconds to minutes): scoring can only
        # leave more groups whole, so the floor of the unscored choices is a lower bound of the final one
        limit = self.limit(full_cost, cost)
        self.refuse_below_floor(limit, cost.total(smallest_group_widths(groups, round_to, self.settings.min_channels)),
                                full_cost, cost, groups, round_to)
        self.decide_sensitivity(groups, round_to)
        with self.clock.step("importance"):
            scores = self.score(groups)
        state = _State(groups, scores, round_to, self.settings.min_channels)
        self.measure_sensitivity(graph, groups, state)
        with self.clock.step("solve"):  # the closed loop: solves, builds, counts or timings
            floor = minimum_cost(cost, full_widths, state.choices)
            smallest = self.check_reachable(limit, floor, full_cost, cost, state, full_widths, round_to)
            loop = ClosedLoop(cost.landing, limit, floor, full_cost, unit=cost.unit, scale=cost.scale,
                              confirm=cost.unit == "ms")
            if smallest is not None:
                loop.seed(*smallest)

            # by target: the loop may ask for one target again (a FLOPs plan short of its budget asks for the full
            # cost until it stops), and a trade costs nine solves; only the kept plan's trade is timed (below)
            trades: dict[float, SpeedTrade] = {}
            checks: dict[tuple[Any, Any], dict[str, Any]] = {}

            def solve(target: float) -> Solution:
                low = minimum_cost(cost, full_widths, state.choices)
                target = min(max(target, low), full_cost)
                if speed is None:
                    return solve_widths(cost, full_widths, state.choices, target, solver=self.settings.solver,
                                        bins=self.settings.bins)
                if target not in trades:
                    trades[target] = fastest_within(cost, speed, full_widths, state.choices, target,
                                                    solver=self.settings.solver, bins=self.settings.bins)
                return trades[target].solution

            def realise(solution: Solution) -> Realised:
                return self.build(solution, state)

            outcome = loop.run(solve, realise, cost.measure)
            kept_trade = self.trade_of(outcome.kept, trades.values())
            if kept_trade is not None:
                outcome.kept, outcome.landed = self.confirm_kept(outcome.kept, kept_trade, cost, state, limit, checks,
                                                                 landed=outcome.landed)
            kept = outcome.kept
            if cost.landing.over_budget_is_error and kept.counted > limit * (1 + 1e-9):
                hint = self.unsafe_hint(groups, cost, full_widths, state, limit)
                raise KpcError(f"could not land under the budget: the best plan counts {kept.counted / cost.scale:.6g} "
                               f"{cost.unit}, {100 * (kept.counted / limit - 1):.2g}% over {limit / cost.scale:.6g}"
                               + (hint or f"; ask for at least {kept.counted / cost.scale:.6g}"))
            if not outcome.landed and cost.landing.over_budget_is_error and kept.counted <= limit * (1 + 1e-9):
                kept, frontier = self.fill(kept, cost, state, limit)
                # an exact cost whose steps are coarse (few, wide groups): once no group can grow one step within the
                # budget, no plan lands closer; that is a landing, not a miss, but the user is told how far under
                outcome.landed = cost.landing.lands(kept.counted, limit) or frontier
                if frontier and not cost.landing.lands(kept.counted, limit):
                    log.warning("the pruned model counts %.4g %s, %.1f%% under the budget of %.4g: it keeps the "
                                "most importance under the budget, and one more step of %d channels in any of its "
                                "groups goes over it (%d of %d groups can be cut); a smaller --round-to gives finer "
                                "steps", kept.counted / cost.scale, cost.unit, 100 * (1 - kept.counted / limit),
                                limit / cost.scale, round_to, sum(g.prunable for g in groups), len(groups))
        plan_round = PruneRound(
            budget=self.budget.to_json(), cost_unit=cost.unit, full_cost=float(full_cost / cost.scale),
            limit=float(limit / cost.scale), predicted_cost=float(kept.solution.cost / cost.scale),
            counted_cost=float(kept.counted / cost.scale),
            groups=self.decisions(groups, state, kept.solution.widths), input_size=self.input_size,
            min_cost=float(floor / cost.scale), kept_importance=float(kept.solution.value),
            total_importance=state.total_value() if state.measured else scores.total(),
            attempts=[replace(a, target=float(a.target / cost.scale), predicted=float(a.predicted / cost.scale),
                              counted=None if a.counted is None else float(a.counted / cost.scale))
                      for a in outcome.attempts],
            importance={"method": self.settings.importance, "data": self.data_label,
                        **({"values": f"sensitivity at {self.settings.sensitivity} widths per group"}
                           if state.measured else {}),
                        **({"sensitivity": self.sensitivity_decision} if self.sensitivity_decision else {}),
                        "batches": self.settings.calib_batches, "batch_size": self.settings.calib_batch_size,
                        "seed": self.settings.seed,
                        **({"precision": self.gradient_precision, "images": self.gradient_images}
                           if self.gradient_precision else {}),
                        **({"magnitude_for_groups": self.substituted} if self.substituted else {})},
            solver=self.settings.solver, round_to=round_to, min_channels=self.settings.min_channels,
            ignore=list(self.settings.ignore), landed=outcome.landed,
            counted_samples=[float(s / cost.scale) for s in kept.samples],
            latency_table=self.table_record(speed, kept.solution, outcome.kept.solution, kept_trade, checks),
            baked_weights=self.baked,
        )
        if not outcome.landed:
            log.warning("after %d solves the pruned model measures %.4g %s against a budget of %.4g (%+.1f%%, "
                        "window %s); kept the closest", len(outcome.attempts), plan_round.counted_cost, cost.unit,
                        plan_round.limit, 100 * plan_round.miss, cost.landing.describe())
        return PruneResult(kept.model.eval(), self.plan_with(plan_round), groups, self.source_model)

    @staticmethod
    def unsafe_hint(groups: list[ChannelGroup], cost: CostModel, full_widths: np.ndarray, state: _State,
                    limit: float) -> str:
        """Why a budget the floor check let through was missed: groups the forward pass left whole on the way."""
        unsafe = [g for g in groups if not g.prunable and (g.reason or "").startswith("unsafe to prune")]
        floor = minimum_cost(cost, full_widths, state.choices)
        if not unsafe or floor <= limit:  # the plans left could still meet it: the groups are not why it missed
            return ""
        return (f"; {len(unsafe)} of {len(groups)} groups failed the pruned model's forward pass and were left whole "
                f"({whole_groups(unsafe)}), so the smallest plan left counts {floor / cost.scale:.4g} {cost.unit}: "
                "ask for at least that")

    def fill(self, kept: Any, cost: CostModel, state: _State, limit: float) -> tuple[Any, bool]:
        """Grow the kept plan, one option at a time, while its counted cost fits (exact costs only).

        Returns the grown plan and whether it is on the budget's frontier: every single step
        up was built and counted over the budget (the cost model's prediction is close but
        not exact after pruning, so each step is counted).
        """
        current, builds = self.complete(kept, cost, state, limit), 0
        while builds < FILL_BUILDS:
            steps = sorted(grow_steps(cost, current.solution.widths, state.choices, limit * (1 + FILL_SLACK)),
                           key=lambda step: -step[0])
            if not steps:
                return current, True
            for _ratio, widths in steps:
                builds += 1
                grown = self.count_plan(widths, cost, state, current)
                if grown is not None and grown.counted <= limit * (1 + 1e-9):
                    current = grown
                    break
                if builds >= FILL_BUILDS:
                    return current, False
            else:
                return current, True  # every step up counted over the budget
        return current, False

    def complete(self, kept: Any, cost: CostModel, state: _State, limit: float) -> Any:
        """Grow the kept plan greedily on predicted costs, many steps per build, then count it once.

        The solver can answer a target with a plan far under it, and a slightly larger target with
        one over it: timm's wide_resnet50_2 at 64x64 solved 0.4679 GFLOPs to 0.310, and 0.526 to
        0.525. One step per counted build (`fill`) then closes a 34% gap by 24 steps of 8
        channels. Here the steps with the most importance per predicted cost are taken while the
        prediction fits, and the result is built and counted; it replaces the kept plan only if
        its count fits the budget too.
        """
        widths = np.asarray(kept.solution.widths, dtype=np.float64).copy()
        for _ in range(COMPLETE_STEPS):
            steps = grow_steps(cost, widths, state.choices, limit)
            if not steps:
                break
            widths = max(steps, key=lambda step: step[0])[1]
        if np.array_equal(widths, kept.solution.widths):
            return kept
        grown = self.count_plan(widths, cost, state, kept)
        if grown is None or not kept.counted < grown.counted <= limit * (1 + 1e-9):
            return kept
        log.info("grew the kept plan from %.4g to %.4g %s within the budget", kept.counted / cost.scale,
                 grown.counted / cost.scale, cost.unit)
        return grown

    def count_plan(self, widths: np.ndarray, cost: CostModel, state: _State, grown_from: Any) -> Any:
        """The plan for `widths` (grown from the candidate `grown_from`), built and counted; None if unbuildable."""
        from kpc.landing import Candidate, plan_key

        solution = Solution(widths, cost.total(widths), value_of(state.choices, widths),
                            grown_from.solution.iterations)
        built = self.build(solution, state)
        if built.model is None:
            return None
        return Candidate(plan_key(widths), built.model, solution, samples_of(cost.measure(built.model)),
                         grown_from.attempt)

    def decide_sensitivity(self, groups: list[ChannelGroup], round_to: int) -> None:
        """Make `sensitivity: auto` a number: measure when the estimated time fits `AUTO_SECONDS`, else sum.

        The importance (`auto`) follows the decision, so it is taken before the importance pass.
        """
        s = self.settings
        if s.sensitivity != "auto":
            return
        assert self.calibration is not None  # prune() resolves auto to 0 without data
        first = next(as_batches(self.calibration), None)
        widths = measured_passes(groups, round_to, s.min_channels, AUTO_POINTS)
        if first is None or widths == 0:
            self.settings = replace(s, sensitivity=0).resolved()
            return
        with self.clock.step("sensitivity"):
            estimate = estimated_seconds(self.work, first[0], batches=s.calib_batches, widths=widths,
                                         bf16=self.passes_in_bf16())
        points, self.sensitivity_decision, line = auto_decision(estimate, widths)
        log.info("%s", line)
        self.settings = replace(s, sensitivity=points).resolved()

    def passes_in_bf16(self) -> bool:
        """Whether the sensitivity passes (and their estimate) run under bf16 autocast on the model's device."""
        return resolve_precision(self.settings.importance_precision, module_device(self.work)) == "bf16"

    def measure_sensitivity(self, graph: Any, groups: list[ChannelGroup], state: _State) -> None:
        """Value the knapsack's options by their measured effect on the output (`kpc.sensitivity`).

        Where the values cannot be measured, the knapsack sums importance; an importance that
        `auto` chose for measured values (consumer-l2, a poor exchange rate across groups when
        summed) is then replaced by the one chosen for sums, at the cost of its pass.
        """
        s = self.settings
        if not s.sensitivity or self.calibration is None:
            return
        with self.clock.step("sensitivity"):
            measured = measure_values(self.work, graph, groups, state.choices, self.calibration,
                                      batches=s.calib_batches, points=s.sensitivity,
                                      bf16=self.passes_in_bf16())
        if measured is not None:
            state.measured = measured
            state.rebuild()
            return
        if self.sensitivity_decision:
            self.sensitivity_decision += "; nothing measurable, summed importance"
        if self.auto_importance and s.importance != "taylor-signed":
            self.settings = replace(s, importance="taylor-signed")
            with self.clock.step("importance"):
                state.scores = self.score(groups)
            state.rebuild()

    def analyse(self) -> tuple[Any, list[ChannelGroup]]:
        s = self.settings
        return analyse_groups(self.work, self.example, round_to=s.round_to or DEFAULT_ROUND_TO,
                              min_channels=s.min_channels, ignore=s.ignore, clock=self.clock)

    def score(self, groups: list[ChannelGroup]) -> Any:
        s = self.settings
        torch.manual_seed(s.seed)
        if needs_gradients(s.importance):
            assert self.calibration is not None
            self.gradient_images, self.gradient_precision = accumulate_gradients(
                self.work, self.calibration, limit=s.calib_batches, progress=self.progress,
                precision=s.importance_precision)
        scores = score_groups(groups, s.importance)
        self.work.zero_grad(set_to_none=True)
        if needs_gradients(s.importance) and scores.values and len(scores.empty) == len(scores.values):
            log.warning("Taylor importance is zero on every group (no gradient reaches the layers, e.g. through a "
                        "zero-initialised classifier): scoring channels by weight magnitude instead")
            self.settings = replace(s, importance="magnitude")
            s = self.settings
            scores = score_groups(groups, s.importance)
        elif needs_gradients(s.importance) and scores.empty:
            self.substitute_magnitude(groups, scores)
        for index, reason in scores.failed.items():
            for group in leave_whole(groups, index, reason):
                log.warning("group %s is left whole: %s", group.root, group.reason)
        for index in scores.empty:
            if not groups[index].prunable:
                continue
            reason = (f"its {s.importance} importance is zero on every channel (its weights are all zero): kept "
                      "whole rather than cut to the minimum")
            for group in leave_whole(groups, index, reason):
                log.warning("group %s is left whole: %s", group.root, group.reason)
        return scores

    def substitute_magnitude(self, groups: list[ChannelGroup], scores: Any) -> None:
        """Rank the channels of groups no gradient reaches by weight magnitude, in Taylor's units.

        In an untrained network whose residual branches end in a zero-initialised BatchNorm
        (timm's RegNet and ResNet defaults), no gradient reaches a branch's inner layers: their
        Taylor score is zero everywhere and the knapsack would cut them to the minimum whatever
        the budget. Their magnitude scores, times the median Taylor/magnitude ratio of the
        groups that have both, keep them in the trade.
        """
        magnitude = score_groups(groups, "magnitude")
        ratios = [scores.values[i].sum() / magnitude.values[i].sum() for i in scores.values
                  if i not in scores.empty and i in magnitude.values and magnitude.values[i].sum() > 0]
        if not ratios:
            return
        factor = float(np.median(ratios))
        substituted = [i for i in scores.empty if i in magnitude.values and magnitude.values[i].sum() > 0]
        for index in substituted:
            scores.values[index] = magnitude.values[index] * factor
        scores.empty = [i for i in scores.empty if i not in substituted]
        self.substituted = [groups[i].root for i in substituted]
        log.warning("%d groups get no gradient from the calibration data (e.g. zero-initialised residual branches "
                    "of an untrained model): their channels are ranked by weight magnitude, scaled to Taylor's "
                    "units", len(substituted))

    def cost_factory(self) -> tuple[Callable[..., CostModel], int]:
        s = self.settings
        if not self.budget.latency:
            step = self.flops_width_step() if self.budget.speed_table is None else self.checked_table_step()
            return (lambda m, x, g, gs: FlopsModel(m, x, g, gs)), step
        from kpc.latency import latency_cost_factory

        round_to = self.checked_table_step()
        return latency_cost_factory(self.budget.table, self.work, self.input_size, round_to=round_to,
                                    min_channels=s.min_channels, target=self.budget.target,
                                    force=self.budget.force_table), round_to

    def checked_table_step(self) -> int:
        """The table's width step, after refusing a table measured for another target (unless forced)."""
        from kpc.latency import check_table, table_width_step

        table = self.budget.table
        for problem in check_table(table, self.input_size, force=self.budget.force_table, target=self.budget.target):
            log.warning("--force-lut: using a table measured for another target: %s", problem)
        return table_width_step(table, self.settings.round_to)

    def speed_model(self, graph: Any, groups: list[ChannelGroup], round_to: int) -> CostModel | None:
        """A FLOPs budget given a latency table: the table's predictions, to break near-ties toward speed."""
        if self.budget.speed_table is None:
            return None
        from kpc.latency import latency_cost_factory

        make = latency_cost_factory(self.budget.table, self.work, self.input_size, round_to=round_to,
                                    min_channels=self.settings.min_channels, target=self.budget.target,
                                    force=self.budget.force_table)
        return make(self.work, self.example, graph, groups)

    def flops_width_step(self) -> int:
        """A FLOPs prune's width step: the target runtime's channel block when one is named, else 8.

        Widths off a runtime's block fall off its fast kernels (ONNX Runtime's NCHWc convs on
        AVX-512 take multiples of 16), so a model pruned for FLOPs but served there should
        keep whole blocks; the figures behind the choice are in benchmarks/RESULTS.md.
        """
        from kpc.latency.profiler import channel_block, compatible_step

        runtime = self.budget.target.get("runtime")
        if runtime is None:
            return self.settings.round_to or DEFAULT_ROUND_TO
        precision = self.budget.target.get("precision") or "fp32"
        block = channel_block(runtime, precision)
        step = math.lcm(DEFAULT_ROUND_TO, block)
        if self.settings.round_to is None:
            return step
        return compatible_step(self.settings.round_to, block, f"{runtime}'s channel block here")

    def limit(self, full_cost: float, cost: CostModel) -> float:
        b = self.budget
        if b.ratio is not None:
            limit = b.ratio * full_cost
        elif b.gflops is not None:
            limit = b.gflops * 1e9
        else:
            limit = float(b.ms)  # type: ignore[arg-type]
        if limit >= full_cost:
            raise KpcError(f"budget {b.describe()} is at or above the model's current cost "
                           f"({full_cost / cost.scale:.4g} {cost.unit}): nothing to prune; ask for less")
        return limit

    def check_reachable(
        self, limit: float, floor: float, full_cost: float, cost: CostModel, state: _State, full_widths: np.ndarray,
        round_to: int,
    ) -> tuple[Solution, nn.Module, float | Sequence[float]] | None:
        """Refuse a budget below the smallest cost any plan reaches, naming that minimum.

        Returns the all-smallest plan when it was built and timed (latency budgets), so that
        the closed loop counts it as measured instead of timing it again.

        A latency table's prediction near the floor can be far off (or even negative after
        the remainder fit), so for a latency budget the all-minimum plan is built and timed:
        the refusal quotes a measured minimum. Always, not only near the predicted floor: on
        a launch-bound GPU (ResNet-50, fp16, batch 64, H200) the smallest widths predicted
        2.29 ms and measured 3.49, so a budget 1.56x the predicted floor was already below
        what widths can buy.
        """
        smallest = _smallest_width(self.settings.min_channels, round_to)
        self.refuse_below_floor(limit, floor, full_cost, cost, state.groups, round_to)
        if cost.unit != "ms":
            return None
        widths = smallest_widths(full_widths, state.choices)
        solution = Solution(widths, floor, value_of(state.choices, widths), 0)
        built = self.build(solution, state)
        if built.model is None:
            return None
        samples = cost.measure(built.model)
        measured = statistics.median(samples_of(samples))
        log.info("every group at its smallest width: predicted %.4g ms, measured %.4g ms", floor, measured)
        if measured > limit * (1 + cost.landing.window[1]):
            raise KpcError(f"budget {self.budget.describe()} is below the smallest achievable cost: {measured:.4g} ms "
                           f"measured on the table's target with every group at its smallest width ({smallest}); "
                           "ask for at least that")
        return solution, built.model, samples

    def refuse_below_floor(self, limit: float, floor: float, full_cost: float, cost: CostModel,
                           groups: list[ChannelGroup], round_to: int) -> None:
        """Refuse a budget below the predicted cost of every group at its smallest width, naming that minimum."""
        if limit >= floor:
            return
        smallest = _smallest_width(self.settings.min_channels, round_to)
        share = f", {max(floor, 0.0) / full_cost:.1%} of the unpruned model's" if full_cost > 0 else ""
        whole = [group for group in groups if not group.prunable]
        kept = f"; {len(whole)} of {len(groups)} groups are left whole ({whole_groups(whole)})" if whole else ""
        raise KpcError(f"budget {self.budget.describe()} is below the smallest achievable cost "
                       f"{max(floor, 0.0) / cost.scale:.4g} {cost.unit}{share} (every group at its smallest width, "
                       f"{smallest}{kept}); ask for at least that")

    def build(self, solution: Solution, state: _State) -> Realised:
        """The pruned copy for a solution, run once; a failure leaves the guilty groups whole."""
        kept = kept_by_root(state.groups, state.choices, solution.widths)
        pruned = copy_model(self.work)
        try:
            apply_kept(pruned, self.example, kept, heads={g.root for g in state.groups if g.heads})
            error = check_forward(pruned, self.example, self.output_shape)
        except KpcError:
            raise
        except Exception as exc:  # torch-pruning fails on this plan: find the group to blame below
            error = first_line(exc)
        if error is None:
            return Realised(model=pruned.eval())
        chosen = [g for g in state.groups if g.root in kept]
        all_kept = kept_by_group(state.choices, solution.widths)
        bad = find_unsafe_groups(self.work, self.example, chosen, lambda g: all_kept[g.index])
        if not bad:
            raise KpcError(f"the pruned model fails its forward pass ({error}) and no single group is to blame")
        for index, reason in bad.items():
            for group in leave_whole(state.groups, index, f"unsafe to prune: {reason}"):
                log.info("group %s is left whole: %s", group.root, group.reason)
        state.rebuild()
        return Realised(error=error, restart=True)

    def decisions(self, groups: list[ChannelGroup], state: _State, widths: np.ndarray) -> list[GroupDecision]:
        kept = kept_by_group(state.choices, widths)
        records = []
        for group in groups:
            indices = kept.get(group.index, list(range(group.width))) if group.prunable else list(range(group.width))
            record = GroupDecision(root=group.root, width=group.width, kept=sorted(indices),
                                   prunable=group.prunable, layers=list(group.layers), reason=group.reason)
            if group.heads is not None:
                record.heads = group.heads
            elif group.blocks > 1 and group.blocks_of != "conv groups":
                record.norm_groups = group.blocks
            elif group.blocks > 1:
                record.conv_groups, record.tied_to = group.blocks, group.tied_to
            records.append(record)
        return records

    @staticmethod
    def trade_of(kept: Any, trades: Iterable[SpeedTrade]) -> SpeedTrade | None:
        """The speed trade whose plan the loop kept, or None (no table, or no trade away from the reference)."""
        return next((trade for trade in trades if np.array_equal(trade.solution.widths, kept.solution.widths)), None)

    def confirm_kept(self, kept: Any, trade: SpeedTrade, cost: CostModel, state: _State, limit: float,
                     checks: dict[tuple[Any, Any], dict[str, Any]], *, landed: bool) -> tuple[Any, bool]:
        """The kept plan if the runtime times it faster than the most important plan at its target, else the latter.

        Timed once, for the plan the loop kept: confirming every solve's trade timed a pair of
        models per solve (about 100 CPU-s on a ResNet-50). The most important plan counts no
        more than the target it was solved for, so the landing is decided again on its count.
        """
        if self.confirm_faster(trade, state, checks) is trade.solution:
            return kept, landed
        reference = self.count_plan(trade.reference.widths, cost, state, kept)
        if reference is None:  # it was timed, so it built once; a rebuild that fails keeps the plan that landed
            log.warning("the most important plan did not build again: kept the plan the table predicts faster")
            return kept, landed
        return reference, cost.landing.lands(reference.counted, limit)

    def confirm_faster(self, trade: SpeedTrade, state: _State, checks: dict[tuple[Any, Any], dict[str, Any]]
                       ) -> Solution:
        """The traded plan if the runtime times it faster than the most important plan, else the latter.

        Each pair of plans is built and timed once (`kpc.speed_check`).
        """
        from kpc.landing import plan_key
        from kpc.latency import timing_target
        from kpc.speed_check import time_trade

        if np.array_equal(trade.solution.widths, trade.reference.widths):
            return trade.solution
        key = (plan_key(trade.reference.widths), plan_key(trade.solution.widths))
        if key not in checks:
            models = [self.build(solution, state).model for solution in (trade.reference, trade.solution)]
            if any(model is None for model in models):
                checks[key] = {"faster": False, "verdict": "a plan did not build: kept the most important plan"}
            else:
                target = timing_target(self.budget.table, self.budget.target)
                checks[key] = time_trade(models[0], models[1], self.input_size, target, trade.reference_predicted,
                                         1 - trade.predicted / trade.reference_predicted)
        return trade.solution if checks[key]["faster"] else trade.reference

    def table_record(self, speed: CostModel | None, kept: Solution, solved: Solution, trade: SpeedTrade | None,
                     checks: dict[tuple[Any, Any], dict[str, Any]]) -> dict[str, Any] | None:
        """The table's target; for a FLOPs budget, also what the speed preference predicted and traded.

        `solved` is the plan the loop kept (after the timed check), `kept` the same or grown from it
        to fill the budget; `trade` is the speed trade of the solve that proposed it, so the
        predictions recorded are of plans at the same target.
        """
        table = self.budget.table
        if table is None:
            return None
        record = {k: table.header.get(k) for k in ("device", "runtime", "runtime_version", "precision", "batch",
                                                   "threads", "model", "date", "full_model_ms")}
        if speed is None:
            return record
        record["role"] = (f"FLOPs budget: the fastest predicted plan within {SPEED_TOLERANCE:.0%} of the total "
                          "importance of the most important one, where timed faster")
        record["predicted_ms"] = float(speed.total(kept.widths))
        if trade is not None:
            record["predicted_ms_solved"] = float(speed.total(solved.widths))
            record["predicted_ms_most_important"] = float(trade.reference_predicted)
            record["importance_most_important"] = float(trade.reference.value)
        if checks:
            record["speed_checks"] = list(checks.values())
        return record

    def plan_with(self, plan_round: PruneRound) -> Plan:
        """This round appended to the plan the input model carried (kpc.load), or a fresh plan."""
        if self.earlier is not None:
            base = self.earlier.plan
            return Plan(kind="pruned", model=dict(base.model), input_size=self.input_size,
                        rounds=[*base.rounds, plan_round],
                        parent={"source": self.earlier.source, "weights_sha256": base.weights.get("sha256")},
                        normalization=base.normalization, data=base.data)
        cls = type(self.source_model)
        return Plan(kind="pruned", model={"source": "user", "class": f"{cls.__module__}.{cls.__qualname__}"},
                    input_size=self.input_size, rounds=[plan_round])


def whole_groups(groups: Sequence[ChannelGroup], shown: int = 3) -> str:
    """The first groups left whole and why, for a one-line error (the rest counted; `kpc inspect` lists all)."""
    named = [f"{group.root}: {(group.reason or 'left whole')[:90]}" for group in groups[:shown]]
    more = f"; {len(groups) - shown} more" if len(groups) > shown else ""
    return "; ".join(named) + more


@dataclass
class _State:
    """The groups and the knapsack's choices over them; rebuilt when a group is left whole."""

    groups: list[ChannelGroup]
    scores: Any
    round_to: int
    min_channels: int
    choices: list[GroupChoices] = field(default_factory=list)
    measured: dict[int, np.ndarray] = field(default_factory=dict)  # measured values by leader (kpc.sensitivity)

    def __post_init__(self) -> None:
        self.rebuild()

    def rebuild(self) -> None:
        self.choices = [make_choices(tie_of(self.groups, g), self.scores.values, self.round_to, self.min_channels)
                        for g in self.groups if g.prunable and g.tied_to is None]
        for choice in self.choices:
            values = self.measured.get(choice.index)
            if values is not None and len(values) == len(choice.widths):
                choice.values = values

    def total_value(self) -> float:
        """The value of keeping every group whole, in the knapsack's units."""
        return float(sum(c.values[-1] for c in self.choices))


def grow_steps(cost: CostModel, widths: np.ndarray, choices: Sequence[GroupChoices], ceiling: float
               ) -> list[tuple[float, np.ndarray]]:
    """Every single-option step up whose predicted cost stays within `ceiling`, with its importance per cost."""
    total = cost.total(widths)
    steps = []
    for choice in choices:
        at = int(np.searchsorted(choice.widths, widths[choice.index]))
        if at + 1 >= len(choice.widths):
            continue
        wider = widths.copy()
        step = choice.widths[at + 1]
        wider[choice.index] = step
        for index, width in choice.follower_widths(step).items():
            wider[index] = width
        grown = cost.total(wider)
        if grown <= ceiling:
            gain = float(choice.values[at + 1] - choice.values[at])
            steps.append((gain / max(grown - total, 1e-12), wider))
    return steps


def _smallest_width(min_channels: int, round_to: int) -> str:
    """--min-channels as the prune applies it: rounded up to a multiple of the width step."""
    smallest = -(-max(1, min_channels) // round_to) * round_to
    if smallest == min_channels:
        return f"--min-channels {min_channels}"
    return f"{smallest} channels: --min-channels {min_channels} in steps of {round_to}"
