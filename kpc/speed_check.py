"""Whether a plan a latency table predicts faster is faster on the runtime: the table proposes, the runtime decides.

A FLOPs budget with a table (`kpc.planner.fastest_within`) trades up to 1% of the
importance for predicted speed. Predictions that close are not always right: on a
sub-millisecond model (ResNet-18 at 28x28 on ort-cpu) the table predicted 14% less latency
for plans that timed no faster and kept a point less accuracy. So both plans are timed
against each other in alternating blocks on the table's target, and the trade stands only
where the lower end of the speedup's 95% interval is above 1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SPEED_CHECK_SECONDS = 8.0  # per model: runs are sized from the table's prediction to take about this long
MIN_RUNS, MAX_RUNS = 100, 2000


def time_trade(reference: Any, traded: Any, input_size: Sequence[int], target: dict[str, Any],
               predicted_ms: float, predicted_gain: float) -> dict[str, Any]:
    """Time `traded` against `reference` on `target` (`kpc.latency.timing_target`); the record says whether it
    was measurably faster."""
    from kpc.benchmark import BenchSettings, ModelSide, run_bench

    iters = int(np.clip(SPEED_CHECK_SECONDS * 1e3 / max(predicted_ms, 1e-3), MIN_RUNS, MAX_RUNS))
    size = tuple(int(d) for d in input_size)
    report = run_bench(ModelSide(reference, size, "most important plan"),
                       ModelSide(traded, size, "fastest predicted plan"),
                       BenchSettings(**target, iters=iters))
    speedup = report["speedup"]
    faster = bool(speedup["ci_low"] > 1.0)
    verdict = "kept the faster plan" if faster else "not measurably faster: kept the most important plan"
    log.info("the plan the table predicts %.1f%% faster timed %.3fx the most important one on %s (95%% CI "
             "%.3f-%.3f, %d runs each): %s", 100 * predicted_gain, speedup["ratio"], target["runtime"],
             speedup["ci_low"], speedup["ci_high"], iters, verdict)
    return {"measured_speedup": speedup["ratio"], "ci": [speedup["ci_low"], speedup["ci_high"]], "iters": iters,
            "faster": faster, "verdict": verdict}
