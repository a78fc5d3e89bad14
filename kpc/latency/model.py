"""Predicted latency of any width assignment: interpolated layer entries plus the fitted remainder.

Used by the planner as the knapsack's cost when the budget is in milliseconds. A
layer's entry depends on its own output width and on the width of the group feeding
it, exactly like FLOPs, so the same fixed-point iteration applies. `measure` times
a real pruned model on the table's target, which closes the loop in `kpc prune`.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kpc.cost_model import LATENCY_LANDING
from kpc.errors import KpcError
from kpc.latency.layers import Layer
from kpc.latency.table import Entry, LatencyTable


@dataclass
class _Term:
    layer: Layer
    entry: Entry


class LatencyModel:
    unit = "ms"
    scale = 1.0
    landing = LATENCY_LANDING

    def __init__(self, table: LatencyTable, layers: list[Layer], full_widths: np.ndarray,
                 min_widths: np.ndarray | None = None) -> None:
        self.table = table
        self.full_widths = full_widths.astype(np.float64)
        missing = [(layer.name, layer.signature) for layer in layers if layer.signature not in table.entries]
        if missing:
            name, signature = missing[0]
            raise KpcError(f"latency table has no entry for layer {name} ({signature}; {len(missing)} missing in "
                           f"all): measure this model with kpc profile")
        self.terms = [_Term(layer, table.entries[layer.signature]) for layer in layers]
        low = self.full_widths if min_widths is None else min_widths.astype(np.float64)
        for term in self.terms:
            c_in = term.layer.inp.value(low, self.full_widths)
            c_out = term.layer.out.value(low, self.full_widths)
            if not term.entry.covers(c_in, c_out):
                raise KpcError(f"latency table covers {term.layer.signature} only down to "
                               f"{int(term.entry.c_in[0])}x{int(term.entry.c_out[0])} channels but the prune may go "
                               f"to {c_in:.0f}x{c_out:.0f}: profile again with the same --round-to/--min-channels")
        self.activation_full = sum(t.layer.out.full * t.layer.out_elements for t in self.terms) or 1.0
        self._by_group: dict[int, list[_Term]] = {}
        for term in self.terms:
            for g in {g for g, _ in term.layer.out.terms} | {g for g, _ in term.layer.inp.terms}:
                self._by_group.setdefault(g, []).append(term)
        self.measure_model = None  # set by the factory: times a real model on the table's target
        self.width_step = 1  # set by the factory: kept widths must be multiples of this (the table's round_to)

    # ------------------------------------------------------------ prediction

    def entries_ms(self, widths: np.ndarray) -> float:
        full = self.full_widths
        return float(sum(t.entry(t.layer.inp.value(widths, full), t.layer.out.value(widths, full)) for t in self.terms))

    def activation_fraction(self, widths: np.ndarray) -> float:
        volume = sum(t.layer.out.value(widths, self.full_widths) * t.layer.out_elements for t in self.terms)
        return float(volume / self.activation_full)

    def total(self, widths: np.ndarray) -> float:
        r = self.table.remainder
        return r.entry_scale * self.entries_ms(widths) + r.fixed_ms + r.activation_ms * self.activation_fraction(widths)

    def option_costs(self, widths: np.ndarray, group: int, options: np.ndarray) -> np.ndarray:
        r = self.table.remainder
        full = self.full_widths
        step = (options - widths[group]) / full[group]
        delta = np.zeros(len(options), dtype=np.float64)
        for term in self._by_group.get(group, ()):
            layer = term.layer
            in_now = layer.inp.value(widths, full)
            out_now = layer.out.value(widths, full)
            c_in = in_now + layer.inp.share(group) * step
            c_out = out_now + layer.out.share(group) * step
            delta += r.entry_scale * (term.entry(c_in, c_out) - term.entry(in_now, out_now))
            delta += r.activation_ms * layer.out.share(group) * step * layer.out_elements / self.activation_full
        return delta

    def measure(self, model: nn.Module) -> list[float]:
        """The model timed on the table's target: one figure per runtime session (see `RelativeTimer`)."""
        if self.measure_model is None:
            raise RuntimeError("this latency model has no runtime attached to measure with")
        return [float(v) for v in self.measure_model(model)]


# Each model of a pair is timed for at least this long per baseline session. A fixed run count
# is a few milliseconds of timing for a sub-millisecond model: a 28x28 ResNet-18 child timed six
# times with 100 runs gave ratios from 0.40 to 0.79 (cv 22%) on a shared 2-core VM, with 1,000
# runs 0.54-0.65 (cv 8%); the closed loop was chasing that noise.
MIN_SECONDS_PER_SESSION = 0.4
SESSIONS = 3  # baseline sessions per timing: the ratio's mean, and the scatter that says how noisy it is

class RelativeTimer:
    """Time models against the unpruned baseline, in alternating blocks, and report ratio x reference ms.

    Absolute timings taken minutes apart drift by several percent on a shared machine;
    the ratio of two models timed in alternating blocks in one run does not. Scaling it
    by the baseline's reference latency (the table's full_model_ms, timed alone in the
    session a server runs) gives milliseconds as served, comparable across the whole
    profile and prune.

    The ratio is averaged over several baseline sessions (`sessions`), each paired with its
    own session of the candidate: one ONNX Runtime session of the same model can run a few
    percent faster or slower than another for its whole life (measured on a pruned
    EfficientNet-B0 at 2.5 ms: 2.39 to 2.65 ms across sessions, within 1% inside one), and
    a single baseline session shifted every ratio taken against it by that much.
    """

    def __init__(self, baseline: nn.Module, input_size: tuple[int, ...], *, runtime: str, batch: int, threads: int,
                 precision: str, reference_ms: float | None = None, warmup: int = 10, iters: int = 60,
                 sessions: int = SESSIONS) -> None:
        from exporters import get_runner

        self.settings = {"runtime": runtime, "threads": threads, "precision": precision}
        self.inputs = {"input": np.random.default_rng(0).standard_normal((batch, *input_size), dtype=np.float32)}
        self.warmup, self.iters = warmup, iters
        self._workdir = tempfile.TemporaryDirectory(prefix="kpc-timer-")
        source = self._source(baseline, "baseline")
        self.baselines = []
        for _ in range(max(1, sessions)):
            runner = get_runner(runtime, threads=threads, precision=precision)
            runner.prepare(source, self.inputs)
            self.baselines.append(runner)
        self.reference_ms = reference_ms if reference_ms is not None else self.absolute_ms()

    def _source(self, model: nn.Module, name: str) -> Any:
        """What a runner prepares: an ONNX file exported once for file-based runtimes, else the module."""
        model = model.eval()
        if not self.settings["runtime"].startswith("ort"):
            return model
        from exporters import export_onnx

        tensors = {k: torch.from_numpy(v) for k, v in self.inputs.items()}
        with torch.no_grad():
            return export_onnx(model, tensors, Path(self._workdir.name) / f"{name}.onnx",
                               fp16=self.settings["precision"] == "fp16")

    def absolute_ms(self) -> float:
        from exporters import measure

        with torch.no_grad():
            return float(statistics.median(
                measure(b, self.inputs, warmup=self.warmup, iters=3 * self.iters).median_ms for b in self.baselines))

    def ratio(self, model: nn.Module) -> float:
        """Mean over baseline sessions of median(model) / median(baseline), each pair timed in alternating blocks."""
        return float(np.mean(self.session_ratios(model)))

    def session_ms(self, model: nn.Module) -> list[float]:
        """One figure per baseline session, in the reference's milliseconds: their scatter is the timing's noise."""
        return [r * self.reference_ms for r in self.session_ratios(model)]

    def session_ratios(self, model: nn.Module) -> list[float]:
        """median(model) / median(baseline) for each baseline session, each pair timed in alternating blocks."""
        from exporters import blocked, get_runner

        source = self._source(model, "candidate")
        rounds = max(2, -(-self.iters // len(self.baselines)), self._rounds_for(MIN_SECONDS_PER_SESSION))
        blocks = max(2, min(6, rounds // 5))
        ratios = []
        for baseline in self.baselines:
            with get_runner(**self.settings) as runner:
                runner.prepare(source, self.inputs)
                with torch.no_grad():
                    # No pause between blocks here: a block lasts at least MIN_SECONDS_PER_SESSION / 6, so
                    # the other session's tens of ms of spinning touch its first runs only, not its median.
                    base, candidate = blocked(baseline, self.inputs, runner, self.inputs, blocks=blocks,
                                              per_block=-(-rounds // blocks), warmup=self.warmup)
            ratios.append(candidate.median_ms / base.median_ms)
        return ratios

    def _rounds_for(self, seconds: float) -> int:
        """Runs of the baseline that take `seconds`: small models need many more than `iters`."""
        if not self.reference_ms or not math.isfinite(self.reference_ms) or self.reference_ms <= 0:
            return 0
        return math.ceil(seconds * 1000.0 / self.reference_ms)

    def __call__(self, model: nn.Module) -> float:
        return self.ratio(model) * self.reference_ms

    def close(self) -> None:
        for baseline in self.baselines:
            baseline.close()
        self._workdir.cleanup()
