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

import torch

log = logging.getLogger(__name__)

OVERSUBSCRIBED = 0.6  # CPU time / (wall time x threads) below this: the threads wait for cores


def default_threads() -> int:
    """Threads when none are given: every core but one on machines with more than 2, else 1 (see RESULTS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1) if cores > 2 else 1


def apply_threads(threads: int | None) -> int:
    chosen = threads if threads is not None else default_threads()
    torch.set_num_threads(chosen)
    return chosen


class CoreWatch:
    """Compares this process's CPU time with wall time x threads over stretches of training steps.

    Well below 1 means the threads spend their time waiting for a core: another process
    competes for them, and an OpenMP team then waits for its slowest thread at every op.
    Warns once with what to do; when the thread count was kpc's choice (not --threads), it
    also drops to one thread, which on a 2-core machine with one competing process trained
    8x faster than two (see benchmarks/RESULTS.md, "training threads").
    """

    def __init__(self, threads: int, *, adaptive: bool = False, every: int = 50) -> None:
        self.threads, self.adaptive, self.every = threads, adaptive, every
        self.steps = 0
        self.warned = False
        self._start = (time.perf_counter(), time.process_time())

    def step(self) -> float | None:
        """Call once per training step; returns the utilisation when a stretch ends (and acts if it is low)."""
        self.steps += 1
        if self.warned or self.steps % self.every:
            return None
        wall = time.perf_counter() - self._start[0]
        cpu = time.process_time() - self._start[1]
        self._start = (time.perf_counter(), time.process_time())
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
