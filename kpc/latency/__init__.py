"""Latency lookup tables (`kpc profile`) and the latency cost model behind `kpc prune --budget-ms`."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kpc.artifact import LoadedModel
from kpc.errors import KpcError
from kpc.latency.table import LatencyTable, load_table

CLOSED_LOOP_ITERS = 100  # interleaved rounds per closed-loop timing: the budget window is only a few percent wide


def latency_cost_factory(lut: Path | None, loaded: LoadedModel, *, force: bool, log: Callable[[str], None],
                         round_to: int, min_channels: int, runtime: str | None = None, batch: int | None = None,
                         threads: int | None = None, precision: str | None = None) -> Callable[..., Any]:
    """Check a table against the prune's target and return the cost-model factory `prune` calls.

    Target fields not given on the command line default to the table's; the device is
    always this machine's, because the closed loop times the pruned model here.
    """
    from kpc.latency.model import LatencyModel, RelativeTimer
    from kpc.latency.profiler import layers_for, target_device

    if lut is None:
        raise KpcError("--budget-ms needs a latency table: pass --lut FILE (measure one with kpc profile MODEL)")
    table = load_table(lut)
    header = table.header
    wanted = {"runtime": runtime, "batch": batch, "threads": threads, "precision": precision}
    target_runtime = runtime or header["runtime"]
    wanted["device"] = target_device(target_runtime)
    problems = table.mismatches(wanted)
    if list(loaded.spec.input_size) != list(header["input_size"]):
        problems.append(f"input_size: table has {header['input_size']}, model is {list(loaded.spec.input_size)}")
    if problems and not force:
        raise KpcError(f"latency table {lut} was measured for another target ({problems[0]}); measure one for "
                       "this target with kpc profile, or pass --force-lut to use it anyway")
    for problem in problems:
        log(f"WARNING: --force-lut: using a table measured for another target: {problem}")
    table_step = int(header.get("round_to", 1))
    if round_to % table_step:
        aligned = math.lcm(round_to, table_step)
        log(f"latency table {lut} was measured at widths in steps of {table_step} (the runtime's channel block): "
            f"pruning in steps of {aligned} instead of {round_to}")
        round_to = aligned
    measure_target = {k: wanted[k] if wanted[k] is not None else header[k]
                      for k in ("runtime", "batch", "threads", "precision")}

    timers: list[RelativeTimer] = []

    def measure(pruned) -> float:
        """The pruned model timed interleaved with the unpruned one, in the table's milliseconds."""
        if not timers:
            timers.append(RelativeTimer(loaded.model, loaded.spec.input_size, **measure_target, iters=CLOSED_LOOP_ITERS,
                                        reference_ms=float(header["full_model_ms"])))
        return timers[0](pruned)

    def make(model, example, graph, groups) -> LatencyModel:
        layers = layers_for(model, example, graph, groups, round_to, min_channels)
        cost = LatencyModel(table, layers.layers, layers.full_widths, layers.min_widths)
        cost.measure_model = measure
        cost.width_step = round_to
        return cost

    return make


__all__ = ["LatencyTable", "latency_cost_factory", "load_table"]
