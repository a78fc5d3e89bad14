"""Latency lookup tables (`kpc profile`) and the latency cost model behind `kpc prune --budget-ms`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from kpc.errors import KpcError
from kpc.latency.table import LatencyTable, load_table

log = logging.getLogger(__name__)

CLOSED_LOOP_ITERS = 100  # interleaved rounds per closed-loop timing: the budget window is only a few percent wide
TARGET_KEYS = ("runtime", "batch", "threads", "precision")


def check_table(table: LatencyTable, input_size: Sequence[int], *, force: bool, target: dict[str, Any],
                where: str = "the latency table") -> list[str]:
    """Refuse a table measured for another target or input (unless forced); returns the forced mismatches."""
    from kpc.latency.profiler import target_device

    header = table.header
    wanted = {k: target.get(k) for k in TARGET_KEYS}
    wanted["device"] = target_device(target.get("runtime") or header["runtime"])
    problems = table.mismatches(wanted)
    if list(input_size) != list(header["input_size"]):
        problems.append(f"input_size: table has {header['input_size']}, model is {list(input_size)}")
    if problems and not force:
        raise KpcError(f"{where} was measured for another target ({problems[0]}); measure one for this target "
                       "with kpc profile, or pass --force-lut to use it anyway")
    return problems


def check_same_model(table: LatencyTable, layers: int, *, force: bool) -> None:
    """Refuse a table profiled on a model with another number of layers (unless forced).

    Every signature of ResNet-34 is one of ResNet-18's, so a ResNet-18 table passed the
    signature check for it; but the table's remainder and full-model figures are the other
    model's, and the prune predicted 2.24 ms for plans that timed 0.99 ms.
    """
    recorded = table.header.get("layers")
    if recorded is None or int(recorded) == layers:
        return
    problem = (f"the latency table was profiled on a model of {recorded} layers ({table.header.get('model')}), and "
               f"this model has {layers}")
    if force:
        log.warning("--force-lut: %s; its predictions are that model's", problem)
        return
    raise KpcError(f"{problem}: its remainder and full-model latency are another model's; profile this model with "
                   "kpc profile, or pass --force-lut to use it anyway")


def table_width_step(table: LatencyTable, round_to: int | None, where: str = "the latency table") -> int:
    """The width step a prune with this table uses: the table's own, or the user's if it is a multiple of it."""
    from kpc.latency.profiler import compatible_step

    step = int(table.header.get("round_to", 1))
    if round_to is None:
        return step
    return compatible_step(round_to, step, f"{where}, measured in steps of {step}")


def timing_target(table: LatencyTable, target: dict[str, Any] | None) -> dict[str, Any]:
    """Where the table's milliseconds are timed: the fields `target` gives, the table's for the rest."""
    given = target or {}
    return {k: given[k] if given.get(k) is not None else table.header[k] for k in TARGET_KEYS}


def latency_cost_factory(table: LatencyTable, baseline: Any, input_size: Sequence[int], *, round_to: int,
                         min_channels: int, target: dict[str, Any] | None = None, force: bool = False
                         ) -> Callable[..., Any]:
    """The cost-model factory a latency prune calls: predictions from the table, timings on its target.

    Target fields not given default to the table's; the device is always this machine's,
    because the closed loop times the pruned model here against the unpruned `baseline`.
    """
    from kpc.latency.model import LatencyModel, RelativeTimer
    from kpc.latency.profiler import layers_for

    header = table.header
    measure_target = timing_target(table, target)
    timers: list[RelativeTimer] = []

    def measure(pruned: Any) -> list[float]:
        """The pruned model timed interleaved with the unpruned one, in the table's milliseconds, per session."""
        if not timers:
            timers.append(RelativeTimer(baseline, tuple(input_size), **measure_target, iters=CLOSED_LOOP_ITERS,
                                        reference_ms=float(header["full_model_ms"])))
        return timers[0].session_ms(pruned)

    def make(model: Any, example: Any, graph: Any, groups: Any) -> LatencyModel:
        layers = layers_for(model, example, graph, groups, round_to, min_channels)
        check_same_model(table, len(layers.layers), force=force)
        cost = LatencyModel(table, layers.layers, layers.full_widths, layers.min_widths)
        cost.measure_model = measure
        cost.width_step = round_to
        return cost

    return make




__all__ = ["LatencyTable", "check_table", "latency_cost_factory", "load_table", "table_width_step",
           "timing_target"]
