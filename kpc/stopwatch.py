"""Where a prune's time went: wall and CPU seconds of each of its steps.

A prune of a large model takes minutes; the plan records the steps' times so a user
(and the zoo benchmark) can tell the graph trace from the importance pass from the
closed loop's builds without a profiler. CPU seconds count every thread of this
process (`time.process_time`), which a busy machine inflates less than wall time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class Stopwatch:
    """Accumulates seconds per named step; a step timed twice adds up."""

    def __init__(self) -> None:
        self.steps: dict[str, dict[str, float]] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            record = self.steps.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
            record["wall_s"] += time.perf_counter() - wall
            record["cpu_s"] += time.process_time() - cpu
            log.debug("%s: %.1f s (%.1f CPU-s)", name, record["wall_s"], record["cpu_s"])

    def as_json(self) -> dict[str, dict[str, float]]:
        return {name: {key: round(value, 2) for key, value in record.items()} for name, record in self.steps.items()}

    def summary(self) -> str:
        return steps_summary(self.steps)


def steps_summary(steps: dict[str, dict[str, float]]) -> str:
    """One line: every step's wall seconds, the slowest first (a Stopwatch's, or a plan round's `seconds`)."""
    ordered = sorted(steps.items(), key=lambda item: -item[1]["wall_s"])
    return ", ".join(f"{name} {record['wall_s']:.1f} s" for name, record in ordered)


__all__ = ["Stopwatch", "steps_summary"]
