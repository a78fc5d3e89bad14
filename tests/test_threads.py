"""Training threads: the default, and the oversubscription watch that drops to one thread."""

from __future__ import annotations

import logging
import os

import torch

from kpc.train.threads import CoreWatch, default_threads


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


def test_default_uses_the_cores_this_process_may_use():
    cores = len(os.sched_getaffinity(0))
    assert default_threads() == (cores - 1 if cores > 2 else cores)


def test_busy_cores_drop_to_one_thread_within_seconds(caplog):
    before = torch.get_num_threads()
    clocks = Clocks(wall=1.0, cpu=0.5)  # 2 threads got half a core: 25% utilisation
    watch = CoreWatch(2, adaptive=True, seconds=3.0, clocks=clocks.pair())
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
    watch = CoreWatch(2, adaptive=True, clocks=idle.pair())
    for _ in range(10):
        idle.advance()
        watch.step()
    assert watch.threads == 2 and not watch.warned
    busy = Clocks(wall=1.0, cpu=0.4)
    pinned = CoreWatch(2, adaptive=False, clocks=busy.pair())
    with caplog.at_level(logging.WARNING, logger="kpc.train.threads"):
        for _ in range(4):
            busy.advance()
            pinned.step()
    assert pinned.threads == 2 and torch.get_num_threads() == before
    assert "pass --threads 1" in caplog.text
