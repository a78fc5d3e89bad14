"""Kernel time of an ONNX graph on ONNX Runtime's CPU provider, from its own profiler.

Why not wall time: a layer timed alone in its own session pays costs that the same layer
inside a whole network does not. On x86 the NCHWc transformer wraps a lone conv in
ReorderInput/ReorderOutput nodes (measured on a 56x56 1x1 conv: a third of the session's
time), and every run pays the session's per-call overhead. ONNX Runtime's profiler
reports each node's kernel time, so summing the compute nodes of a run and leaving the
layout reorders out gives what the layer costs inside a graph.

The pool threads spin between runs here (`spinning=True`), unlike the runners': inside a
network the next node starts while the workers are still awake, but a lone layer run
after run would otherwise wake them from sleep every time. Measured on a 56x56 3x3 conv
(64 channels, 2 threads): 1.25-1.31 ms with sleeping workers, 0.665 ms spinning, and
0.64-0.71 ms for the same conv inside ResNet-18. Spinning only hurts when another
session shares the cores, and a layer is profiled alone.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporters.errors import ExporterError
from exporters.runners.ort_runner import import_onnxruntime, session_options

LAYOUT_OPS = ("ReorderInput", "ReorderOutput", "Transpose")


def ort_cpu_kernel_ms(onnx_path: str | Path, inputs: Mapping[str, np.ndarray], *, threads: int, warmup: int,
                      iters: int, exclude_ops: tuple[str, ...] = LAYOUT_OPS, spinning: bool = True) -> float:
    """Median over `iters` runs of the summed kernel time (ms) of every node not in `exclude_ops`."""
    events = _profiled_runs(onnx_path, inputs, threads=threads, warmup=warmup, iters=iters, spinning=spinning)
    return statistics.median(kernel_ms_per_run(events, exclude_ops)[warmup:])


@dataclass(frozen=True)
class KernelRatio:
    ratio: float  # median over runs of (subject kernel ms / reference kernel ms), each pair from the same run
    subject_ms: float  # median subject kernel ms
    reference_ms: float  # median reference kernel ms


def ort_cpu_kernel_ratio(onnx_path: str | Path, inputs: Mapping[str, np.ndarray], *, reference_marker: str,
                         threads: int, warmup: int, iters: int, exclude_ops: tuple[str, ...] = LAYOUT_OPS,
                         spinning: bool = True) -> KernelRatio:
    """Kernel time of the graph's subject nodes relative to its reference nodes, run by run.

    The graph holds the subject and an independent reference branch whose node names contain
    `reference_marker`.

    Why: on a shared machine one session runs at one speed for its whole life and the next
    may run at another (measured here on a lone 56x56 3x3 conv, six sweeps of 16 widths: a
    point's kernel time varied by 17% on average across sweeps, up to 2x, while its ratio to
    a reference conv in the same session varied by 3%). The ratio cancels what the two share.
    """
    events = _profiled_runs(onnx_path, inputs, threads=threads, warmup=warmup, iters=iters, spinning=spinning)
    subject = np.array(kernel_ms_per_run(events, exclude_ops, lambda name: reference_marker not in name)[warmup:])
    reference = np.array(kernel_ms_per_run(events, exclude_ops, lambda name: reference_marker in name)[warmup:])
    if not (reference > 0).all() or not (subject > 0).all():
        raise ExporterError(f"ONNX Runtime's profile of {onnx_path} lacks the subject or the reference nodes (names "
                            f"containing {reference_marker!r}) in some runs")
    return KernelRatio(float(np.median(subject / reference)), float(np.median(subject)), float(np.median(reference)))


def _profiled_runs(onnx_path: str | Path, inputs: Mapping[str, np.ndarray], *, threads: int, warmup: int, iters: int,
                   spinning: bool) -> list[dict]:
    """The profiler events of `warmup + iters` runs of the graph in one fresh session."""
    if warmup < 0 or iters < 1:
        raise ExporterError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    ort = import_onnxruntime("ort-cpu")
    with tempfile.TemporaryDirectory(prefix="exporters-profile-") as tmp:
        options = session_options(ort, threads, spinning=spinning)
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        feed = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        for _ in range(warmup + iters):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    if runs < warmup + iters:
        raise ExporterError(f"ONNX Runtime's profile holds {runs} runs, expected {warmup + iters}")
    return events


def kernel_ms_per_run(events: list[dict], exclude_ops: tuple[str, ...],
                      select: Callable[[str], bool] | None = None) -> list[float]:
    """Sum the node kernel durations (microseconds in the profile) that fall inside each model_run event.

    `select`, given a node's name, keeps only the nodes it accepts.
    """
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    totals = [0.0] * len(runs)
    starts = [start for start, _ in runs]
    for event in events:
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        if event.get("args", {}).get("op_name") in exclude_ops:
            continue
        if select is not None and not select(name.removesuffix("_kernel_time")):
            continue
        index = int(np.searchsorted(starts, event["ts"], side="right")) - 1
        if index >= 0 and event["ts"] <= runs[index][1]:
            totals[index] += event["dur"] / 1000.0
    return totals
