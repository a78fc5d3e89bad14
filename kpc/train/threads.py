"""Intra-op threads for training, and a warning when the cores are oversubscribed.

On a small shared machine the thread count matters more than anything else: with one
other CPU-bound process on 2 cores, torch's default of 2 threads trained at 32 img/s and
1 thread at 379 img/s (an OpenMP team waits for its slowest thread, and a thread that
shares its core with another process is slow). The default and the figures behind it
are in benchmarks/RESULTS.md ("training threads").
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

OVERSUBSCRIBED = 0.6  # CPU time / (wall time x threads) below this: the threads wait for cores


def default_threads() -> int:
    """Threads when none are given: every core this process may use, but one on machines with more than 2.

    Idle, two threads train faster than one on two cores; beside a busy process they
    collapse, which `CoreWatch` sees within seconds and answers by dropping to one thread
    (figures in benchmarks/RESULTS.md, "training threads").
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1) if cores > 2 else max(1, cores)


def apply_threads(threads: int | None) -> int:
    chosen = threads if threads is not None else default_threads()
    torch.set_num_threads(chosen)
    return chosen


class CoreWatch:
    """Compares this process's CPU time with wall time x threads over stretches of training.

    Well below 1 means the threads spend their time waiting for a core: another process
    competes for them, and an OpenMP team then waits for its slowest thread at every op.
    Warns once with what to do; when the thread count was kpc's choice (not --threads), it
    also drops to one thread, which on a 2-core machine with one competing process trained
    8x faster than two (see benchmarks/RESULTS.md, "training threads").

    A stretch is a few seconds of wall time, not a number of steps: oversubscribed training
    can run 10x slower, and fifty slow steps would be minutes at the collapsed speed.
    """

    def __init__(self, threads: int, *, adaptive: bool = False, seconds: float = 3.0, min_steps: int = 2,
                 clocks: tuple[Callable[[], float], Callable[[], float]] = (time.perf_counter, time.process_time),
                 ) -> None:
        self.threads, self.adaptive = threads, adaptive
        self.seconds, self.min_steps = seconds, min_steps
        self.wall_clock, self.cpu_clock = clocks
        self.steps = 0
        self.warned = False
        self._start = (self.wall_clock(), self.cpu_clock())

    def step(self) -> float | None:
        """Call once per training step; returns the utilisation when a stretch ends (and acts if it is low)."""
        if self.warned:
            return None
        self.steps += 1
        wall = self.wall_clock() - self._start[0]
        if self.steps < self.min_steps or wall < self.seconds:
            return None
        cpu = self.cpu_clock() - self._start[1]
        self._start = (self.wall_clock(), self.cpu_clock())
        self.steps = 0
        utilisation = cpu / max(1e-9, wall * self.threads)
        if utilisation >= OVERSUBSCRIBED:
            return utilisation
        self.warned = True
        if self.adaptive and self.threads > 1:
            torch.set_num_threads(1)
            log.warning("the cores look oversubscribed: training got %.0f%% of the CPU time its %d threads could use "
                        "(another process competes for them); continuing on 1 thread (pin a count with --threads)",
                        100 * utilisation, self.threads)
            self.threads = 1
        else:
            hint = "pass --threads 1" if self.threads > 1 else "stop the other process or expect slow training"
            log.warning("the cores look oversubscribed: training got %.0f%% of the CPU time its %d thread%s could "
                        "use (another process competes for them); %s", 100 * utilisation, self.threads,
                        "s" if self.threads > 1 else "", hint)
        return utilisation
