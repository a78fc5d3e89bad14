"""Pruning real networks under a FLOPs budget: lands on the budget, runs, reloads bit-identically."""

from __future__ import annotations

import json

import pytest
import torch

import kpc
from kpc.artifact import load_artifact, open_model, save_artifact
from kpc.budget import Budget
from kpc.costs import count_macs
from kpc.errors import KpcError
from kpc.pruning import prune

from .conftest import SMALL, prune_spec

BUDGET_MODELS = ["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf"]


def _prune(spec: str, ratio: float, **settings):
    return prune_spec(spec, Budget(ratio=ratio), **settings)


@pytest.mark.parametrize("name", BUDGET_MODELS)
def test_counted_flops_land_on_the_budget(name):
    loaded, result = _prune(f"torchvision:{name}", 0.6)
    example = loaded.example_input()
    base, _ = count_macs(loaded.model, example)
    counted, _ = count_macs(result.model, example)  # counted independently of kpc's cost model
    budget = 0.6 * base
    assert counted <= budget
    assert counted >= 0.99 * budget, f"{counted / base:.4f} of the unpruned MACs for a 0.6 budget"
    assert result.round.counted_cost == pytest.approx(counted / 1e9)
    assert result.round.landed is True
    assert result.model(example).shape == loaded.model(example).shape
    assert any(g.kept_width < g.width for g in result.round.groups)


def test_exact_keeps_at_least_as_much_importance_as_greedy():
    torch.manual_seed(0)  # the same network (and so the same scores) for both solvers
    _, exact = _prune("torchvision:resnet18", 0.5)
    torch.manual_seed(0)
    _, greedy = _prune("torchvision:resnet18", 0.5, solver="greedy")
    assert exact.round.total_importance == pytest.approx(greedy.round.total_importance)
    assert greedy.round.counted_cost <= greedy.round.limit * (1 + 1e-9)
    assert exact.round.kept_importance >= greedy.round.kept_importance * 0.999


def test_artifact_round_trip_is_bit_identical(tmp_path):
    _loaded, result = _prune("torchvision:mobilenet_v3_large", 0.5)
    out = kpc.save(result, tmp_path / "child")
    with torch.no_grad():  # loading works under no_grad too (graph tracing needs autograd inside)
        reloaded = load_artifact(out)
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        assert torch.equal(reloaded.model(x), result.model(x))
    assert reloaded.plan.weights["sha256"] and reloaded.plan.versions["torch"] == torch.__version__
    assert reloaded.plan.model["name"] == "mobilenet_v3_large" and len(reloaded.rounds) == 1


def test_pruning_an_artifact_again_replays_both_rounds(tmp_path):
    _loaded, first = _prune("torchvision:resnet18", 0.7)
    kpc.save(first, tmp_path / "a")
    again = open_model(str(tmp_path / "a"))
    second = prune(again.model, again.example_input(), Budget(ratio=0.7))
    kpc.save(second, tmp_path / "b")
    reloaded = load_artifact(tmp_path / "b")
    x = torch.randn(1, *SMALL)
    with torch.no_grad():
        assert torch.equal(reloaded.model(x), second.model(x))
    assert len(reloaded.rounds) == 2


def test_load_refuses_edited_weights_and_foreign_plans(tmp_path):
    _loaded, result = _prune("torchvision:resnet18", 0.5)
    out = kpc.save(result, tmp_path / "r18")
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(KpcError, match="sha256"):
        load_artifact(out)
    out2 = save_artifact(tmp_path / "r18b", result.model, result.plan)
    foreign = json.loads((out2 / "plan.json").read_text())
    foreign["model"]["name"] = "mobilenet_v3_large"
    (out2 / "plan.json").write_text(json.dumps(foreign))
    with pytest.raises(KpcError, match="digest"):  # an edited plan is refused like edited weights
        load_artifact(out2)
    from kpc.plan import digest_of

    foreign["plan_sha256"] = digest_of(foreign)  # a consistent but foreign plan: refused by the replay
    (out2 / "plan.json").write_text(json.dumps(foreign))
    with pytest.raises(KpcError, match="another model"):
        load_artifact(out2)
    with pytest.raises(KpcError, match=r"plan\.json is missing"):
        load_artifact(tmp_path)


def test_budget_errors_say_what_is_possible():
    loaded = open_model("torchvision:resnet18", num_classes=10, input_size=SMALL)
    # and names the groups left whole, with why, in the same line (it once pointed at warnings never printed)
    with pytest.raises(KpcError, match=r"below the smallest achievable cost [0-9.]+ GFLOPs.*groups are left whole "
                                       r"\(fc: network output \(fc\)"):
        prune(loaded.model, loaded.example_input(), Budget(gflops=1e-6))
    with pytest.raises(KpcError, match="at or above the model's current cost"):
        prune(loaded.model, loaded.example_input(), Budget(gflops=100.0))
    with pytest.raises(KpcError, match="exactly one budget"):
        Budget(gflops=1.0, ratio=0.5)
    for bad in (float("nan"), float("inf"), -1.0, 0.0):
        with pytest.raises(KpcError, match="budget"):
            Budget(ratio=bad)


class _CountedBatches:
    """Calibration batches that count how often they are read."""

    def __init__(self, example: torch.Tensor) -> None:
        self.batches = [(example.repeat(4, 1, 1, 1), torch.zeros(4, dtype=torch.long))]
        self.reads = 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


@pytest.mark.parametrize("budget", [Budget(gflops=100.0), Budget(gflops=1e-6), Budget(ratio=0.001)])
def test_an_impossible_budget_is_refused_before_reading_data(budget):
    """The importance pass and the sensitivity measurement take seconds to minutes: none for a budget no plan meets."""
    loaded = open_model("torchvision:resnet18", num_classes=10, input_size=SMALL)
    data = _CountedBatches(loaded.example_input())
    with pytest.raises(KpcError, match=r"at or above the model's current cost|below the smallest achievable cost"):
        prune(loaded.model, loaded.example_input(), budget, data)
    assert data.reads == 0


def test_ignore_and_classifier_are_left_whole():
    _, result = _prune("torchvision:resnet18", 0.5, ignore=("layer4*",))
    groups = {g.root: g for g in result.round.groups}
    assert groups["fc"].prunable is False and "network output" in groups["fc"].reason
    assert groups["layer4.0.conv1"].kept_width == groups["layer4.0.conv1"].width
    assert "ignored" in groups["layer4.0.conv1"].reason


def test_closed_loop_bisects_once_the_aim_is_bracketed():
    """Two rounds above the aim near a jump, one far below: the next target lies strictly between them."""
    from kpc.cost_model import LATENCY_LANDING
    from kpc.landing import next_target
    from kpc.plan import Attempt

    attempts = [Attempt(1.32, 1.0, 1.01), Attempt(1.70, 1.0, 1.40), Attempt(1.61, 1.0, 1.38)]
    following = next_target(attempts, 1.30, LATENCY_LANDING)
    assert following == pytest.approx((1.32 + 1.61) / 2)  # the secant (1.2475) left the bracket: bisect
    attempts.append(Attempt(following, 1.0, 1.01))  # the jump again: still below the aim
    assert following < next_target(attempts, 1.30, LATENCY_LANDING) < 1.61
    # no bracket yet: the ratio/secant step, strictly below after an overshoot
    assert next_target([Attempt(2.0, 2.0, 2.2)], 2.0, LATENCY_LANDING) < 2.0 * 2.0 / 2.2


def test_closed_loop_does_not_extrapolate_past_the_proportional_step():
    """Two rounds under the aim on a shallow slope (the 28x28 demo): the secant would jump far past the
    aim; the step is at most the proportional correction of the last round."""
    from kpc.cost_model import LATENCY_LANDING
    from kpc.landing import next_target
    from kpc.plan import Attempt

    attempts = [Attempt(0.347, 0.347, 0.292), Attempt(0.406, 0.406, 0.304)]
    following = next_target(attempts, 0.3415, LATENCY_LANDING)
    assert 0.406 < following <= 0.406 * 0.3415 / 0.304 + 1e-12
    # a steep slope keeps the secant (1.067), shorter than the proportional step (1.105)
    steep = [Attempt(1.0, 1.0, 0.80), Attempt(1.05, 1.05, 0.95)]
    assert next_target(steep, 1.0, LATENCY_LANDING) == pytest.approx(1.0 + (1.0 - 0.80) * 0.05 / 0.15)


def _loop_with_timings(timings: list[float]):
    """One plan, timed in turn at `timings` (the last one is the closing re-timing of the kept plan)."""
    import numpy as np

    from kpc.cost_model import LATENCY_LANDING
    from kpc.landing import ClosedLoop, Realised
    from kpc.planner import Solution

    queue = list(timings)
    loop = ClosedLoop(LATENCY_LANDING, 1.0, 0.1, 2.0, unit="ms", confirm=True)
    return loop.run(lambda target: Solution(np.array([8.0]), target, 1.0, 1), lambda s: Realised(model=object()),
                    lambda model: queue.pop(0))


def test_a_miss_inside_the_kept_plans_own_timing_spread_counts_as_landed(caplog):
    """0.930 and 0.955 ms: the median (-5.75%) is outside the -5% edge by less than two standard errors (2.7%)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="kpc.landing"):
        result = _loop_with_timings([0.930, 0.955])
    assert result.kept.samples == [0.930, 0.955] and result.landed
    assert "two standard errors of its own timings" in caplog.text
    # timings that agree closely: the same distance outside the window is a miss
    assert not _loop_with_timings([0.940, 0.945]).landed
    assert not _loop_with_timings([0.900, 0.905]).landed


def test_a_kept_plan_whose_timings_disagree_is_timed_again_until_they_settle(caplog):
    """1.20 then 0.95 ms (a 23% spread, median +7.5%): a third timing, 1.00, settles it inside the window."""
    import logging

    with caplog.at_level(logging.WARNING, logger="kpc.landing"):
        result = _loop_with_timings([1.20, 0.95, 1.00, 5.0])
    assert result.kept.samples == [1.20, 0.95, 1.00] and result.landed
    assert "standard errors of its own timings" not in caplog.text


def test_the_floor_timed_before_the_loop_is_never_timed_again():
    """A budget only the all-smallest plan meets: the loop solves to it and reuses the floor's timing."""
    import numpy as np

    from kpc.cost_model import LATENCY_LANDING
    from kpc.landing import ClosedLoop, Realised
    from kpc.planner import Solution

    floor = Solution(np.array([8.0]), 0.5, 1.0, 0)
    timed: list[object] = []

    def measure(model: object) -> float:
        timed.append(model)
        return 1.30 if model == "model 16" else 1.02  # the wider plan is over; then the floor's re-timing

    loop = ClosedLoop(LATENCY_LANDING, 1.0, 0.5, 2.0, unit="ms", confirm=True)
    loop.seed(floor, "floor model", 0.99)
    widths = {True: np.array([8.0]), False: np.array([16.0])}
    result = loop.run(lambda target: Solution(widths[target < 0.9], target, 2.0, 1),
                      lambda s: Realised(model=f"model {int(s.widths[0])}"), measure)
    assert timed.count("floor model") == 1  # only the closing re-timing of the kept plan
    assert result.kept.model == "floor model" and result.kept.samples == [0.99, 1.02] and result.landed
    assert result.attempts[0].counted == 0.99 and any(a.repeat_of == 1 for a in result.attempts)


def test_a_plan_within_the_timers_noise_of_the_aim_ends_the_loop():
    """Sessions scattering by about 4%: a plan timed 3% below the aim's centre is as centred as the machine can
    tell, so the loop stops after one round instead of chasing the timer (the same figures without scatter:
    it solves again)."""
    import numpy as np

    from kpc.cost_model import LATENCY_LANDING
    from kpc.landing import ClosedLoop, Realised
    from kpc.planner import Solution

    def run(sessions: list[float]):
        timed: list[float] = []

        def measure(model: object) -> list[float]:
            timed.append(float(model))  # type: ignore[arg-type]
            return sessions

        loop = ClosedLoop(LATENCY_LANDING, 1.0, 0.1, 2.0, unit="ms", confirm=False)
        solve = lambda target: Solution(np.array([round(100 * target)]), target, target, 1)  # noqa: E731
        return loop.run(solve, lambda s: Realised(model=s.widths[0]), measure), timed

    noisy, timed = run([0.915, 0.955, 0.990])  # median -4.5%, pooled scatter about 4%
    assert len(timed) == 1 and noisy.kept.counted == pytest.approx(0.955)
    _quiet, timed = run([0.954, 0.955, 0.956])
    assert len(timed) > 1, "a quiet machine still steers toward the aim"


def test_a_new_plan_predicted_within_the_noise_of_a_measured_one_is_not_timed():
    """Once timings are known to scatter by 6%, a plan predicted 0.3% away from one already timed would be one more
    noisy sample of the same latency: it counts as a repeat of it, and the target moves on."""
    import numpy as np

    from kpc.cost_model import LATENCY_LANDING
    from kpc.landing import ClosedLoop, Realised
    from kpc.planner import Solution

    predictions = iter([1.000, 1.003, 0.997, 0.94, 0.93, 0.92, 0.91])
    timed: list[float] = []

    def solve(target: float) -> Solution:
        cost = next(predictions)
        return Solution(np.array([1000 * cost]), cost, cost, 1)

    def measure(model: float) -> list[float]:
        timed.append(model)
        return [1.02, 1.10, 1.14] if model > 950 else [0.96, 0.97, 0.99]

    loop = ClosedLoop(LATENCY_LANDING, 1.0, 0.1, 2.0, unit="ms", confirm=False)
    result = loop.run(solve, lambda s: Realised(model=float(s.widths[0])), measure)
    assert timed[0] == 1000 and all(abs(t - 1000) > 5 for t in timed[1:]), timed
    assert [a.repeat_of for a in result.attempts[1:3]] == [1, 1]
    assert result.kept.counted == pytest.approx(0.97)


def test_timings_scattering_wider_than_the_window_are_reported(caplog):
    """Sessions 20% apart: the landing is as close as the machine can tell, and the log says so."""
    import logging

    import numpy as np

    from kpc.cost_model import LATENCY_LANDING
    from kpc.landing import ClosedLoop, Realised
    from kpc.planner import Solution

    loop = ClosedLoop(LATENCY_LANDING, 1.0, 0.1, 2.0, unit="ms", confirm=True)
    with caplog.at_level(logging.WARNING, logger="kpc.landing"):
        result = loop.run(lambda target: Solution(np.array([8.0]), target, 1.0, 1), lambda s: Realised(model=1),
                          lambda model: [0.88, 0.98, 1.08])
    assert loop.noise() > LATENCY_LANDING.window[1] - LATENCY_LANDING.window[0]
    assert "scatter by" in caplog.text and result.kept.counted == pytest.approx(0.98)


def test_the_noise_is_read_near_the_budget():
    """The all-smallest plan, timed first at a quarter of the budget, scatters by 30%; the plans near the budget by
    1%: the loop's resolution is theirs, not the floor's."""
    import numpy as np

    from kpc.cost_model import LATENCY_LANDING
    from kpc.landing import Candidate, ClosedLoop
    from kpc.planner import Solution

    loop = ClosedLoop(LATENCY_LANDING, 1.0, 0.1, 2.0, unit="ms")
    loop.seed(Solution(np.array([8.0]), 0.2, 1.0, 0), "floor", [0.18, 0.25, 0.32])
    assert loop.noise() > 0.25  # nothing else timed yet: the floor's scatter is all there is
    near = Candidate((16.0,), "near", Solution(np.array([16.0]), 0.98, 2.0, 1), [0.97, 0.98, 0.99], 2)
    loop.candidates[near.key] = near
    assert loop.noise() == pytest.approx(0.0102, rel=0.01)


def test_a_plan_whose_figure_cannot_tell_it_from_the_aim_is_timed_again_and_pooled():
    """Sessions scattering by 19%: a plan timed at -14% may still be at the aim. When the next solve lands on it
    again, it is timed once more and its timings pooled (-4%: centred), instead of the loop stopping on one noisy
    figure or treating the second timing as a new plan."""
    import numpy as np

    from kpc.cost_model import LATENCY_LANDING
    from kpc.landing import ClosedLoop, Realised
    from kpc.planner import Solution

    plans = [0.75, 0.80, 0.85, 0.90, 1.0]
    timings = {1.0: [[1.40, 1.44, 1.48]], 0.75: [[0.70, 0.86, 1.02], [0.95, 0.97, 0.99]]}

    def solve(target: float) -> Solution:
        cost = max((p for p in plans if p <= target), default=plans[0])
        return Solution(np.array([100 * cost]), cost, cost, 1)

    loop = ClosedLoop(LATENCY_LANDING, 1.0, 0.5, 1.0, unit="ms", confirm=False)
    result = loop.run(solve, lambda s: Realised(model=float(s.widths[0]) / 100),
                      lambda model: timings[model].pop(0))
    assert result.kept.solution.cost == 0.75 and result.kept.timings == 2 and len(result.kept.samples) == 6
    assert result.kept.counted == pytest.approx(0.96) and result.landed
    again = [a for a in result.attempts if a.repeat_of == result.kept.attempt and a.timed_again]
    assert len(again) == 1 and again[0].counted == pytest.approx(0.96)
    assert not timings[0.75], "both timings of the plan were used"


def test_exact_counts_have_no_noise():
    """FLOPs are counted, one exact figure per plan: the loop's noise is 0 and only equal widths repeat."""
    import numpy as np

    from kpc.cost_model import FLOPS_LANDING
    from kpc.landing import ClosedLoop, samples_of
    from kpc.planner import Solution

    loop = ClosedLoop(FLOPS_LANDING, 1.0, 0.1, 2.0)
    loop.seed(Solution(np.array([8.0]), 0.5, 1.0, 0), "floor", 0.5)
    assert loop.noise() == 0 and loop.indistinguishable(Solution(np.array([9.0]), 0.5, 1.0, 0)) is None
    assert samples_of(3) == [3.0] and samples_of(np.array([1.0, 2.0])) == [1.0, 2.0]
    with pytest.raises(ValueError, match="without a single sample"):
        samples_of([])


class _CachesABias(torch.nn.Module):
    """Keeps a tensor computed from a parameter in a dict after an eval forward, as timm's EfficientViT does."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.body = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.head = torch.nn.Linear(32, 10)
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in eval mode the product is cached per input shape, computed with gradients on: not a leaf tensor
        scale = self.scale * 2 if self.training else self.cache.setdefault(tuple(x.shape), self.scale * 2)
        return self.head(torch.relu(self.body(torch.relu(self.stem(x)))).mean((2, 3)) * scale)


def test_a_model_caching_a_computed_tensor_prunes_and_reloads(tmp_path):
    model = _CachesABias().eval()
    example = torch.randn(1, 3, 16, 16)
    model(example)  # the user evaluated it once: the cache now holds a tensor of the autograd graph
    assert model.cache[tuple(example.shape)].grad_fn is not None
    result = kpc.prune(model, example, kpc.Budget(ratio=0.5), calibration=[torch.randn(4, 3, 16, 16)])
    assert count_macs(result.model, example)[0] <= 0.5 * count_macs(model, example)[0]
    loaded = kpc.load(kpc.save(result, tmp_path / "child"), model=_CachesABias())
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(example), result.model.eval()(example), atol=1e-6)


class _HoldsA5dParameter(torch.nn.Module):
    """A 5-D weight (a Conv3d's, timm's LambdaLayer position embedding): NHWC cannot be applied to it."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = torch.nn.Conv3d(1, 1, 3, padding=1)
        self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.body = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(x.unsqueeze(1)).squeeze(1)
        return self.head(torch.relu(self.body(torch.relu(self.stem(x)))).mean((2, 3)))


def test_a_model_with_a_5d_weight_gets_its_importance_pass():
    model = _HoldsA5dParameter().eval()
    example = torch.randn(1, 3, 16, 16)
    result = kpc.prune(model, example, kpc.Budget(ratio=0.6), calibration=[torch.randn(4, 3, 16, 16)])
    assert count_macs(result.model, example)[0] <= 0.6 * count_macs(model, example)[0]
    assert result.model.mix.weight.dim() == 5


def test_a_flops_plan_far_under_its_budget_for_coarse_steps_says_so(caplog):
    """One prunable group of 16 channels in steps of 8: half the MACs or all of them. A 70% budget lands at 50%,
    counted as landed (no plan with more importance fits), and the user is told how far under and why."""
    import logging

    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 10, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten()).eval()
    with caplog.at_level(logging.WARNING, logger="kpc.pruning"):
        result = prune(model, torch.randn(1, 3, 16, 16), Budget(ratio=0.7))
    r = result.round
    assert r.landed and r.counted_cost < 0.55 * r.full_cost and [g.kept_width for g in r.groups if g.prunable] == [8]
    under = f"{100 * (1 - r.counted_cost / r.limit):.1f}% under the budget"
    assert under in caplog.text and "one more step of 8 channels" in caplog.text, caplog.text
