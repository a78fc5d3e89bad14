"""Run a benchmark's child process and charge it its whole CPU time.

A prune's cost is the process's: imports, threads and all. `resource.RUSAGE_CHILDREN`
before and after one `subprocess.run` gives user + sys of that child and every thread it
ran, which a timer in the parent cannot see. Shared by the benchmark scripts:

    from _process import run_child   # scripts in benchmarks/ have it on sys.path
    child = run_child([sys.executable, "-m", "kpc", "prune", ...], cwd=ROOT, threads=2)
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Child:
    cpu_s: float  # user + sys of the child and its threads
    wall_s: float
    stdout: str
    stderr: str


def run_child(command: list[str], *, cwd: Path, threads: int, pythonpath: Path | None = None) -> Child:
    """Run `command` with OMP_NUM_THREADS pinned (and PYTHONPATH, for another checkout); raise if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:5])} ... failed ({done.returncode}): {done.stderr[-800:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Child(cpu, wall, done.stdout, done.stderr)
