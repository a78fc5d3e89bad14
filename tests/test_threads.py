"""Training threads: the default, and the oversubscription watch that drops to one thread."""

from __future__ import annotations

import logging
import os

import torch

from kpc.train.threads import CORE_SHARE, CoreWatch, default_threads, runqueue_seconds


class Clocks:
    """Deterministic wall and CPU clocks: each step advances wall by `wall` and CPU by `cpu` seconds."""

    def __init__(self, wall: float, cpu: float) -> None:
        self.wall_step, self.cpu_step = wall, cpu
        self.wall_now = self.cpu_now = 0.0

    def advance(self) -> None:
        self.wall_now += self.wall_step
        self.cpu_now += self.cpu_step

    def pair(self) -> tuple:
        return (lambda: self.wall_now), (lambda: self.cpu_now)


def test_default_uses_the_cores_this_process_may_use(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_threads() == (cores - 1 if cores > 2 else cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: each rank gets its share of the node
    assert default_threads() == max(1, cores // 2)


def test_busy_cores_drop_to_one_thread_within_seconds(caplog):
    before = torch.get_num_threads()
    clocks = Clocks(wall=1.0, cpu=0.5)  # 2 threads got half a core: 25% utilisation
    watch = CoreWatch(2, adaptive=True, seconds=3.0, clocks=clocks.pair(), runqueue=lambda: None)
    try:
        results = []
        with caplog.at_level(logging.WARNING, logger="kpc.train.threads"):
            for _ in range(5):
                clocks.advance()
                results.append(watch.step())
        assert results[:2] == [None, None], "a stretch is 3 s of wall time"
        assert results[2] is not None and abs(results[2] - 0.25) < 1e-9
        assert watch.threads == 1 and torch.get_num_threads() == 1
        assert "continuing on 1 thread" in caplog.text
        assert results[3:] == [None, None], "it acts once"
    finally:
        torch.set_num_threads(before)


def test_idle_cores_keep_their_threads_and_pinned_threads_only_warn(caplog):
    before = torch.get_num_threads()
    idle = Clocks(wall=1.0, cpu=1.9)
    watch = CoreWatch(2, adaptive=True, clocks=idle.pair(), runqueue=lambda: None)
    for _ in range(10):
        idle.advance()
        watch.step()
    assert watch.threads == 2 and not watch.warned
    busy = Clocks(wall=1.0, cpu=0.4)
    pinned = CoreWatch(2, adaptive=False, clocks=busy.pair(), runqueue=lambda: None)
    with caplog.at_level(logging.WARNING, logger="kpc.train.threads"):
        for _ in range(4):
            busy.advance()
            pinned.step()
    assert pinned.threads == 2 and torch.get_num_threads() == before
    assert "pass --threads 1" in caplog.text


class RunQueue:
    """Deterministic schedstat: each call adds `on_core` and `waiting` seconds."""

    def __init__(self, on_core: float, waiting: float) -> None:
        self.on_core, self.waiting, self.now = on_core, waiting, (0.0, 0.0)

    def __call__(self) -> tuple[float, float]:
        self.now = (self.now[0] + self.on_core, self.now[1] + self.waiting)
        return self.now


def test_spinning_threads_that_wait_for_a_core_are_seen_through_the_run_queue(caplog):
    """CPU time looks full (OpenMP threads spin), but a third of the runnable time was spent queued."""
    before = torch.get_num_threads()
    clocks = Clocks(wall=1.0, cpu=1.95)
    watch = CoreWatch(2, adaptive=True, seconds=3.0, clocks=clocks.pair(), runqueue=RunQueue(2.0, 1.0))
    try:
        with caplog.at_level(logging.WARNING, logger="kpc.train.threads"):
            results = []
            for _ in range(3):
                clocks.advance()
                results.append(watch.step())
        assert results[2] is not None and results[2] < CORE_SHARE and watch.threads == 1
        assert "continuing on 1 thread" in caplog.text
    finally:
        torch.set_num_threads(before)
    idle = Clocks(wall=1.0, cpu=1.95)
    calm = CoreWatch(2, adaptive=True, clocks=idle.pair(), runqueue=RunQueue(2.0, 0.02))
    for _ in range(10):
        idle.advance()
        calm.step()
    assert calm.threads == 2 and not calm.warned


def test_the_run_queue_reading_grows_while_this_process_computes():
    first = runqueue_seconds()
    if first is None:
        import pytest

        pytest.skip("this kernel has no per-thread schedstat (/proc/self/task/*/schedstat)")
    total = 0
    for i in range(2_000_000):
        total += i
    second = runqueue_seconds()
    assert second is not None and second[0] > first[0] and second[1] >= first[1]
