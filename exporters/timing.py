"""Latency measurement over the runner contract, and a bootstrap CI for speedups.

Warm-up runs are never timed (first calls pay for allocation, autotuning, lazy init).
Each sample is one ``runner.infer_timed`` call, which the runner times with
``time.perf_counter_ns`` around a device-synchronised inference. Medians and high
quantiles are reported because latency distributions are skewed by OS noise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exporters.errors import ExporterError
from exporters.runners.base import Runner


@dataclass(frozen=True)
class TimingStats:
    """Summary of one series of timed inferences, in milliseconds, raw samples kept."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    n: int
    samples_ms: tuple[float, ...] = field(repr=False)

    @classmethod
    def from_seconds(cls, seconds: Sequence[float]) -> TimingStats:
        if len(seconds) == 0:
            raise ExporterError("no timing samples; use iters >= 1")
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(ms.mean()), int(ms.size), tuple(ms.tolist()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "mean_ms": self.mean_ms,
            "n": self.n,
        }


def _check_counts(warmup: int, iters: int) -> None:
    if warmup < 0 or iters < 1:
        raise ExporterError(f"need warmup >= 0 and iters >= 1, got warmup={warmup} iters={iters}")


def measure(runner: Runner, inputs: Mapping[str, np.ndarray], *, warmup: int, iters: int) -> TimingStats:
    """Time ``iters`` inferences after ``warmup`` untimed ones."""
    _check_counts(warmup, iters)
    for _ in range(warmup):
        runner.infer_timed(inputs)
    return TimingStats.from_seconds([runner.infer_timed(inputs) for _ in range(iters)])


def interleaved(
    runner_a: Runner,
    inputs_a: Mapping[str, np.ndarray],
    runner_b: Runner,
    inputs_b: Mapping[str, np.ndarray],
    *,
    warmup: int,
    iters: int,
) -> tuple[TimingStats, TimingStats]:
    """Time A and B in alternating rounds so drift (thermal, other load) hits both alike.

    Round ``i`` yields one sample of each, and sample ``i`` of A pairs with sample ``i`` of
    B (what :func:`bootstrap_ratio_ci` resamples). Which runner goes first alternates every
    round to cancel cache and frequency effects of going second.
    """
    _check_counts(warmup, iters)
    for _ in range(warmup):
        runner_a.infer_timed(inputs_a)
        runner_b.infer_timed(inputs_b)
    a: list[float] = []
    b: list[float] = []
    for i in range(iters):
        if i % 2 == 0:
            a.append(runner_a.infer_timed(inputs_a))
            b.append(runner_b.infer_timed(inputs_b))
        else:
            b.append(runner_b.infer_timed(inputs_b))
            a.append(runner_a.infer_timed(inputs_a))
    return TimingStats.from_seconds(a), TimingStats.from_seconds(b)


def blocked(
    runner_a: Runner,
    inputs_a: Mapping[str, np.ndarray],
    runner_b: Runner,
    inputs_b: Mapping[str, np.ndarray],
    *,
    blocks: int,
    per_block: int,
    warmup: int,
    block_warmup: int = 3,
    pause_s: float = 0.0,
) -> tuple[TimingStats, TimingStats]:
    """Time A and B in alternating blocks (A B, B A, A B, ...), each block one model alone, as a server runs it.

    Why blocks and not run-by-run interleaving: a runtime's idle workers spin for a while
    after a run (ONNX Runtime's default, what a serving process gets), which slows whatever
    runs next. In a block, the model runs back to back as it would when served; untimed
    runs open every block (`warmup` for each model's first, `block_warmup` after) and absorb
    what the previous block left behind, and ``pause_s`` (the runners' ``idle_spin_s``) of sleep before every
    block lets the other session's workers stop spinning: a block of sub-millisecond runs is over long before
    they would. Alternating the order of each pair cancels drift, as interleaving does. Sample
    ``i`` of A pairs with sample ``i`` of B (the same position in the same pair of blocks)
    for :func:`bootstrap_ratio_ci`.
    """
    if blocks < 1 or per_block < 1 or warmup < 0 or block_warmup < 0 or not pause_s >= 0:
        raise ExporterError(f"need blocks >= 1, per_block >= 1, warmups >= 0 and pause_s >= 0, got {blocks}, "
                            f"{per_block}, {warmup}, {block_warmup}, {pause_s}")
    a: list[float] = []
    b: list[float] = []
    for index in range(blocks):
        order = [(runner_a, inputs_a, a), (runner_b, inputs_b, b)]
        for runner, inputs, sink in order if index % 2 == 0 else order[::-1]:
            if pause_s > 0:
                time.sleep(pause_s)
            for _ in range(warmup if index < 2 else block_warmup):
                runner.infer_timed(inputs)
            sink.extend(runner.infer_timed(inputs) for _ in range(per_block))
    return TimingStats.from_seconds(a), TimingStats.from_seconds(b)


def bootstrap_ratio_ci(
    samples_a: Sequence[float],
    samples_b: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``median(a) / median(b)`` (speedup of B over A) with a percentile bootstrap CI.

    Rounds are resampled as pairs, keeping the correlation :func:`interleaved` creates
    between A and B in the same round; that is what makes the interval tight under shared
    noise. Returns ``(ratio, low, high)``.
    """
    a = np.asarray(samples_a, dtype=np.float64)
    b = np.asarray(samples_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ExporterError(
            f"paired bootstrap needs two equal-length series of >= 2 samples, got {a.size} and {b.size}; "
            "use interleaved() to collect them"
        )
    if not 0 < confidence < 1:
        raise ExporterError(f"confidence must be in (0, 1), got {confidence}; e.g. 0.95")
    if resamples < 1:
        raise ExporterError(f"resamples must be >= 1, got {resamples}")
    if np.any(b <= 0) or np.any(a <= 0):
        raise ExporterError("timing samples must be positive; check the runner's clock")
    ratio = float(np.median(a) / np.median(b))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return ratio, float(low), float(high)
