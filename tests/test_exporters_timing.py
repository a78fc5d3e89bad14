"""Timing and the bootstrap speedup CI: behaviour only, never wall-clock values."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from exporters import (
    ExporterError,
    TimingStats,
    bootstrap_ratio_ci,
    get_runner,
    interleaved,
    measure,
    ort_cpu_kernel_ms,
    ort_cpu_kernel_ratio,
)
from exporters.kernel_timing import LAYOUT_OPS, kernel_ms_per_run
from exporters.runners import Runner

pytestmark = pytest.mark.usefixtures("one_thread")


def image() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)}


def prepared(model: torch.nn.Module) -> Runner:
    runner = get_runner("torch-cpu", threads=1)
    runner.prepare(model.eval(), image())
    return runner


@pytest.fixture(scope="module")
def big() -> Iterator[Runner]:
    torch.manual_seed(0)
    runner = prepared(torchvision.models.resnet18(num_classes=10))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def tiny() -> Iterator[Runner]:
    runner = prepared(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)))
    yield runner
    runner.close()


def test_measure_summarises_every_timed_sample(tiny: Runner) -> None:
    stats = measure(tiny, image(), warmup=2, iters=15)
    assert stats.n == len(stats.samples_ms) == 15
    samples = np.array(stats.samples_ms)
    assert np.all(np.isfinite(samples)) and np.all(samples > 0)
    assert stats.median_ms == pytest.approx(float(np.median(samples)))
    assert stats.mean_ms == pytest.approx(float(samples.mean()))
    assert samples.min() <= stats.median_ms <= stats.p90_ms <= stats.p99_ms <= samples.max()
    assert set(stats.to_dict()) == {"median_ms", "p90_ms", "p99_ms", "mean_ms", "n"}


def test_measure_rejects_empty_runs(tiny: Runner) -> None:
    with pytest.raises(ExporterError, match="iters >= 1"):
        measure(tiny, image(), warmup=0, iters=0)


def test_interleaved_pairs_every_round(big: Runner, tiny: Runner) -> None:
    a, b = interleaved(big, image(), tiny, image(), warmup=1, iters=7)
    assert a.n == b.n == len(a.samples_ms) == len(b.samples_ms) == 7


def test_larger_model_is_slower_with_ci_above_one(big: Runner, tiny: Runner) -> None:
    a, b = interleaved(big, image(), tiny, image(), warmup=2, iters=20)
    ratio, low, high = bootstrap_ratio_ci(a.samples_ms, b.samples_ms)
    assert low <= ratio <= high
    assert ratio > 1 and low > 1  # B (tiny) is faster than A (resnet18)


def test_runner_against_itself_has_ci_containing_one(tiny: Runner) -> None:
    a, b = interleaved(tiny, image(), tiny, image(), warmup=3, iters=60)
    ratio, low, high = bootstrap_ratio_ci(a.samples_ms, b.samples_ms, confidence=0.999, resamples=4000)
    assert low <= ratio <= high
    # Identical work is no speedup. Not `low <= 1 <= high`: a microsecond model's medians can
    # differ by a systematic 0.3% on a busy host (CI saw [0.990, 0.997]), which is luck, not a
    # fault; a claimed 5% speedup or slowdown of a model against itself would be one.
    assert low < 1.05 and high > 1 / 1.05


def test_bootstrap_is_deterministic_and_brackets_the_ratio() -> None:
    rng = np.random.default_rng(42)
    noise = rng.lognormal(0.0, 0.2, size=50)
    a = 2.0 * noise * rng.lognormal(0.0, 0.05, size=50)
    b = noise
    first = bootstrap_ratio_ci(a, b, seed=7)
    assert first == bootstrap_ratio_ci(a, b, seed=7)
    ratio, low, high = first
    assert ratio == pytest.approx(float(np.median(a) / np.median(b)))
    assert low < ratio < high
    assert low < 2.0 < high
    _, wide_low, wide_high = bootstrap_ratio_ci(a, b, seed=7, confidence=0.99)
    assert wide_low <= low and wide_high >= high


def test_bootstrap_of_exact_multiple_is_exact() -> None:
    b = np.linspace(1.0, 2.0, 11)
    ratio, low, high = bootstrap_ratio_ci(3.0 * b, b)
    assert ratio == pytest.approx(3.0)
    assert low == pytest.approx(3.0) and high == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ([1.0, 2.0], [1.0, 2.0, 3.0], "equal-length"),
        ([1.0], [1.0], "equal-length"),
        ([1.0, 0.0], [1.0, 1.0], "positive"),
    ],
)
def test_bootstrap_rejects_bad_series(a: list[float], b: list[float], message: str) -> None:
    with pytest.raises(ExporterError, match=message):
        bootstrap_ratio_ci(a, b)


def test_timing_stats_from_seconds_converts_to_ms() -> None:
    stats = TimingStats.from_seconds([0.001, 0.002, 0.003])
    assert stats.median_ms == pytest.approx(2.0)
    assert stats.n == 3 and math.isclose(stats.mean_ms, 2.0)


def _conv_onnx(path: Path) -> Path:
    model = torch.nn.Conv2d(64, 32, 1).eval()
    torch.onnx.export(model, torch.randn(1, 64, 28, 28), str(path), input_names=["input"], dynamo=False)
    return path


def test_kernel_time_sums_compute_nodes_inside_each_run(tmp_path: Path) -> None:
    """Per run, the compute kernels are a part of the run: never more than the run, never more than all nodes."""
    import onnxruntime as ort

    path = _conv_onnx(tmp_path / "conv.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"input": np.random.default_rng(0).standard_normal((1, 64, 28, 28), dtype=np.float32)}
    for _ in range(4):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e["dur"] / 1000.0 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    compute = kernel_ms_per_run(events, LAYOUT_OPS)
    everything = kernel_ms_per_run(events, ())
    assert len(compute) == len(everything) == len(runs) == 4
    for part, whole, run in zip(compute, everything, runs, strict=True):
        assert 0.0 < part <= whole <= run


def test_kernel_time_of_a_layer_is_positive_and_checks_counts(tmp_path: Path) -> None:
    path = _conv_onnx(tmp_path / "conv.onnx")
    inputs = {"input": np.random.default_rng(0).standard_normal((1, 64, 28, 28), dtype=np.float32)}
    ms = ort_cpu_kernel_ms(path, inputs, threads=1, warmup=1, iters=5)
    assert math.isfinite(ms) and ms > 0
    with pytest.raises(ExporterError, match="iters >= 1"):
        ort_cpu_kernel_ms(path, inputs, threads=1, warmup=1, iters=0)


class _Sum(torch.nn.Module):
    """Two independent convs in one graph: the subject, and a reference whose ONNX names carry a marker.

    ONNX Runtime may rename a node after its output tensor, so the reference's output name carries it too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.subject = torch.nn.Conv2d(64, 32, 1)
        self.marked_reference = torch.nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x, y):
        return self.subject(x), self.marked_reference(y)


def _two_branch_onnx(path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((1, 64, 28, 28), dtype=np.float32),
            "y": rng.standard_normal((1, 16, 28, 28), dtype=np.float32)}
    torch.onnx.export(_Sum().eval(), (torch.from_numpy(feed["x"]), torch.from_numpy(feed["y"])), str(path),
                      input_names=["x", "y"], output_names=["subject_out", "marked_reference_out"], dynamo=False)
    return path, feed


def test_selected_nodes_split_each_run_without_losing_time(tmp_path: Path) -> None:
    """Subject plus reference kernels are, run by run, exactly all kernels: `select` partitions, never drops."""
    import onnxruntime as ort

    path, feed = _two_branch_onnx(tmp_path / "two.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    everything = kernel_ms_per_run(events, LAYOUT_OPS)
    reference = kernel_ms_per_run(events, LAYOUT_OPS, lambda name: "marked_reference" in name)
    subject = kernel_ms_per_run(events, LAYOUT_OPS, lambda name: "marked_reference" not in name)
    for whole, ref, sub in zip(everything, reference, subject, strict=True):
        assert ref > 0 and sub > 0
        assert ref + sub == pytest.approx(whole, rel=1e-12)


def test_kernel_ratio_reports_subject_against_reference(tmp_path: Path) -> None:
    path, feed = _two_branch_onnx(tmp_path / "two.onnx")
    timed = ort_cpu_kernel_ratio(path, feed, reference_marker="marked_reference", threads=1, warmup=1, iters=7,
                                 spinning=False)
    assert timed.subject_ms > 0 and timed.reference_ms > 0 and math.isfinite(timed.ratio) and timed.ratio > 0
    # a median of per-run ratios sits near the ratio of medians (same runs; only the pairing differs)
    assert 0.5 < timed.ratio / (timed.subject_ms / timed.reference_ms) < 2.0
    with pytest.raises(ExporterError, match="lacks the subject or the reference"):
        ort_cpu_kernel_ratio(path, feed, reference_marker="no-such-node", threads=1, warmup=1, iters=3)


def test_blocked_times_each_model_alone_in_alternating_blocks(big: Runner, tiny: Runner) -> None:
    from exporters import blocked

    calls: list[str] = []

    class Recording:
        def __init__(self, runner: Runner, name: str) -> None:
            self.runner, self.name = runner, name

        def infer_timed(self, inputs):
            calls.append(self.name)
            return self.runner.infer_timed(inputs)

    a, b = blocked(Recording(big, "a"), image(), Recording(tiny, "b"), image(), blocks=4, per_block=5, warmup=2,
                   block_warmup=1)
    assert a.n == b.n == 20
    # blocks A B | B A | A B | B A: 2 untimed runs open each model's first two blocks, 1 the later ones
    runs = [(name, len(list(group))) for name, group in itertools.groupby(calls)]
    assert runs == [("a", 7), ("b", 7 + 7), ("a", 7 + 6), ("b", 6 + 6), ("a", 6)]
    ratio, low, _high = bootstrap_ratio_ci(a.samples_ms, b.samples_ms)
    assert ratio > 1 and low > 1, "the tiny model is faster than resnet18 in blocks too"


def test_blocked_pauses_before_every_block_so_idle_workers_stop_spinning(big: Runner, tiny: Runner) -> None:
    import time

    from exporters import blocked
    from exporters.runners.ort_runner import OrtCpuRunner

    assert OrtCpuRunner.idle_spin_s >= 0.05, "ONNX Runtime's workers spin tens of ms after a run"
    stamps: list[tuple[str, float]] = []

    class Stamping:
        def __init__(self, runner: Runner, name: str) -> None:
            self.runner, self.name = runner, name

        def infer_timed(self, inputs):
            stamps.append((self.name, time.perf_counter()))
            return self.runner.infer_timed(inputs)

    blocked(Stamping(big, "a"), image(), Stamping(tiny, "b"), image(), blocks=2, per_block=2, warmup=0,
            block_warmup=0, pause_s=0.05)
    switches = [later - earlier for (name, earlier), (other, later) in itertools.pairwise(stamps) if name != other]
    assert len(switches) == 2 and min(switches) >= 0.05
    with pytest.raises(ExporterError):
        blocked(big, image(), tiny, image(), blocks=2, per_block=2, warmup=0, pause_s=-1.0)
