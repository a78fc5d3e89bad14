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
# On-core share of the threads' runnable time below this: they wait on the run queue for a core. Idle,
# two threads on two cores got 0.97 or more; beside one busy process, two threads get about 2/3.
CORE_SHARE = 0.85


def runqueue_seconds() -> tuple[float, float] | None:
    """(seconds on a core, seconds runnable but waiting for one) summed over this process's threads.

    From Linux's per-thread schedstat; None where it is missing. CPU time alone cannot see
    oversubscription: OpenMP threads spin while they wait for a descheduled team mate, and
    spinning counts as CPU time (beside a busy process, two threads trained at half the speed
    of one while their CPU time looked full).
    """
    on_core = waiting = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat") as handle:
                fields = handle.read().split()
            on_core, waiting = on_core + int(fields[0]), waiting + int(fields[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return (on_core / 1e9, waiting / 1e9) if on_core or waiting else None


def machine_busy_seconds() -> tuple[float, float, float] | None:
    """(CPU-seconds the whole machine spent busy, CPU-seconds of this process, wall seconds), for differences.

    From /proc/stat (user, nice, system, irq, softirq: the host's steal is not the guest's
    load); None where it is missing. The difference between the first two is what every
    other process used meanwhile.
    """
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
        busy = sum(int(fields[i]) for i in (1, 2, 3, 6, 7)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    own = os.times()
    return busy, own.user + own.system, time.perf_counter()


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    """Threads when none are given: every core this process may use (one fewer above 2; a share under torchrun).

    Idle, two threads train faster than one on two cores; beside a busy process they
    collapse, which `CoreWatch` sees within seconds and answers by dropping to one thread
    (figures in benchmarks/RESULTS.md, "training threads").
    """
    cores = available_cores()
    # Under torchrun every process on this node gets its share, or N ranks x all cores oversubscribe them.
    try:
        ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks_here = 1
    if ranks_here > 1:
        return max(1, cores // ranks_here)
    return max(1, cores - 1) if cores > 2 else max(1, cores)


def apply_threads(threads: int | None) -> int:
    chosen = threads if threads is not None else default_threads()
    torch.set_num_threads(chosen)
    return chosen


class CoreWatch:
    """Watches, over stretches of training, how much of their runnable time the threads got a core.

    Well below all of it means the threads wait for cores: another process competes for
    them, and an OpenMP team then waits for its slowest thread at every op. Where Linux's
    schedstat is missing, CPU time against wall time x threads stands in for it.
    Warns once with what to do; when the thread count was kpc's choice (not --threads), it
    also drops to one thread, which on a 2-core machine with one competing process trained
    8x faster than two (see benchmarks/RESULTS.md, "training threads").

    A stretch is a few seconds of wall time, not a number of steps: oversubscribed training
    can run 10x slower, and fifty slow steps would be minutes at the collapsed speed.
    """

    def __init__(self, threads: int, *, adaptive: bool = False, seconds: float = 3.0, min_steps: int = 2,
                 clocks: tuple[Callable[[], float], Callable[[], float]] = (time.perf_counter, time.process_time),
                 runqueue: Callable[[], tuple[float, float] | None] = runqueue_seconds) -> None:
        self.threads, self.adaptive = threads, adaptive
        self.seconds, self.min_steps = seconds, min_steps
        self.wall_clock, self.cpu_clock = clocks
        self.runqueue = runqueue
        self.steps = 0
        self.warned = False
        self._start = (self.wall_clock(), self.cpu_clock())
        self._queue = self.runqueue()

    def _share(self, wall: float) -> tuple[float, float]:
        """(the measure of this stretch, the threshold below which the cores are oversubscribed)."""
        queue = self.runqueue()
        previous, self._queue = self._queue, queue
        if queue is not None and previous is not None:
            on_core, waiting = queue[0] - previous[0], queue[1] - previous[1]
            if on_core + waiting > 0:
                return on_core / (on_core + waiting), CORE_SHARE
        cpu = self.cpu_clock() - self._start[1]
        return cpu / max(1e-9, wall * self.threads), OVERSUBSCRIBED

    def step(self) -> float | None:
        """Call once per training step; returns the utilisation when a stretch ends (and acts if it is low)."""
        if self.warned:
            return None
        self.steps += 1
        wall = self.wall_clock() - self._start[0]
        if self.steps < self.min_steps or wall < self.seconds:
            return None
        utilisation, threshold = self._share(wall)
        self._start = (self.wall_clock(), self.cpu_clock())
        self.steps = 0
        if utilisation >= threshold:
            return utilisation
        self.warned = True
        if self.adaptive and self.threads > 1:
            torch.set_num_threads(1)
            log.warning("the cores look oversubscribed: training got %.0f%% of the core time its %d threads could use "
                        "(another process competes for them); continuing on 1 thread (pin a count with --threads)",
                        100 * utilisation, self.threads)
            self.threads = 1
        else:
            hint = "pass --threads 1" if self.threads > 1 else "stop the other process or expect slow training"
            log.warning("the cores look oversubscribed: training got %.0f%% of the core time its %d thread%s could "
                        "use (another process competes for them); %s", 100 * utilisation, self.threads,
                        "s" if self.threads > 1 else "", hint)
        return utilisation
