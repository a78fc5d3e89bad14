"""`kpc profile`: measure a model's latency table on the runtime that will serve it.

Each unique layer signature is timed alone over a grid of (input, output) widths,
one small session per point. The whole model is then timed at a few uniformly
pruned widths and the remainder (what isolated layers miss: adds, pools,
activations, layout changes, per-run overhead, in-graph fusions) is fitted so the
predicted full-model latency matches the measured one. Measured points are saved
as they come, so an interrupted profile resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kpc import __version__
from kpc.apply import apply_kept
from kpc.atomic import write_text_atomic
from kpc.channels import ChannelGroup, tie_of
from kpc.costs import channel_sides
from kpc.errors import KpcError
from kpc.latency.layers import (
    REFERENCE_MARKER,
    REFERENCE_SIGNATURE,
    Geometry,
    Layer,
    collect_layers,
    grid_points,
    layer_input,
    onnx_layer,
    reference_input,
    torch_layer,
)
from kpc.latency.model import LatencyModel, RelativeTimer
from kpc.latency.table import ONE_WIDTH_KINDS, Entry, LatencyTable, Remainder, load_table
from kpc.lazy import materialize
from kpc.modelcopy import copy_model
from kpc.parametrizations import bake, parametrized_weights
from kpc.planner import smallest_group_widths, tie_widths
from kpc.pruning import DEFAULT_ROUND_TO
from kpc.tracing import refuse_scripted

log = logging.getLogger(__name__)

PARTIAL_SCHEMA = "kpc-latency-partial/2"
CALIBRATION_FRACTIONS = (1.0, 0.75, 0.5, 0.3)
RANDOM_CALIBRATIONS = 10
RANDOM_CALIBRATION_SEED = 1_000_003


@dataclass
class ProfileSettings:
    runtime: str = "ort-cpu"
    batch: int = 1
    threads: int = 2  # the machines kpc is measured on have 2 cores; pin what the server pins
    precision: str = "fp32"
    round_to: int | None = None  # None: 8, aligned to the runtime's channel block
    min_channels: int = 8
    ignore: tuple[str, ...] = ()
    warmup: int = 3
    iters: int = 15
    model_warmup: int = 10
    model_iters: int = 40
    seed: int = 0

    def target(self, device: str) -> dict[str, Any]:
        return {"device": device, "runtime": self.runtime, "precision": self.precision, "batch": self.batch,
                "threads": self.threads}


def target_device(runtime: str) -> str:
    """The device a runtime executes on (its runner's word): the GPU's name for CUDA runtimes, else the CPU model."""
    from exporters import runner_class

    return runner_class(runtime).device_name()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_table_path(root: Path, device: str, settings: ProfileSettings, model_label: str) -> Path:
    name = slug(model_label.rsplit(":", 1)[-1].rsplit("/", 1)[-1])
    folder = f"{settings.runtime}-{settings.precision}-b{settings.batch}-t{settings.threads}"
    return root / slug(device) / folder / f"{name}.json"


@dataclass
class ModelLayers:
    """What a table is measured for and applied to: layers, group widths and their lower bounds."""

    groups: list[ChannelGroup]
    layers: list[Layer]
    full_widths: np.ndarray
    min_widths: np.ndarray
    example: Any
    graph: Any


def model_layers(model: Any, example: Any, round_to: int, min_channels: int, ignore: tuple[str, ...] = ()
                 ) -> ModelLayers:
    from kpc.pruning import analyse_groups

    graph, groups = analyse_groups(model, example, round_to=round_to, min_channels=min_channels, ignore=ignore)
    return layers_for(model, example, graph, groups, round_to, min_channels)


def layers_for(model, example, graph, groups: list[ChannelGroup], round_to: int, min_channels: int) -> ModelLayers:
    layers = collect_layers(model, example, channel_sides(model, graph, groups))
    full = np.array([g.width for g in groups], dtype=np.float64)
    return ModelLayers(groups, layers, full, smallest_group_widths(groups, round_to, min_channels), example, graph)


def width_choices(groups: list[ChannelGroup], round_to: int, min_channels: int) -> list[dict[int, np.ndarray]]:
    """One entry per independent choice (a lone group or a tie): each member's widths, aligned option for option."""
    return [tie_widths(tie_of(groups, g), round_to, min_channels) for g in groups if g.prunable and g.tied_to is None]


def channel_block(runtime: str, precision: str = "fp32") -> int:
    """Channels the runtime's fast kernels process as one block (its runner's trait; 1 where none is known)."""
    from exporters import runner_class

    return runner_class(runtime).channel_block(precision)


def aligned_to_block(settings: ProfileSettings) -> ProfileSettings:
    """The settings with --round-to a multiple of the runtime's channel block (see `channel_block`)."""
    block = channel_block(settings.runtime, settings.precision)
    if settings.round_to is None:
        return dataclasses.replace(settings, round_to=math.lcm(DEFAULT_ROUND_TO, block))
    step = compatible_step(settings.round_to, block, f"{settings.runtime}'s channel block here")
    return dataclasses.replace(settings, round_to=step)


def compatible_step(round_to: int, step: int, what: str) -> int:
    """The width step honouring both --round-to and a runtime's (or table's) step: one must divide the other.

    A multiple of the runtime's step is kept as asked; a divisor of it (8 where the step is
    16) is served by the step itself, which satisfies it; anything else conflicts.
    """
    if round_to % step == 0:
        return round_to
    if step % round_to == 0:
        log.info("widths in steps of %d (%s) instead of --round-to %d: every one is also a multiple of %d", step,
                 what, round_to, round_to)
        return step
    raise KpcError(f"--round-to {round_to} conflicts with {what}, which runs at widths in steps of {step}: use "
                   f"--round-to {step} or a multiple of it, or omit it")


def measurement_grid(target: ModelLayers, round_to: int) -> dict[str, tuple[Geometry, list[int], list[int]]]:
    """Per unique signature: its geometry and the input/output widths to measure."""
    plan: dict[str, tuple[Geometry, set[int], set[int]]] = {}
    for layer in target.layers:
        # a grouped conv only takes widths of whole conv groups (and of the width step)
        step = math.lcm(round_to, layer.geometry.group_widths[1]) if layer.geometry.kind == "gconv" else round_to
        c_in = grid_points(layer.inp.value(target.min_widths, target.full_widths), layer.inp.full, round_to)
        c_out = grid_points(layer.out.value(target.min_widths, target.full_widths), layer.out.full, step)
        _, ins, outs = plan.setdefault(layer.signature, (layer.geometry, set(), set()))
        ins.update(c_in)
        outs.update(c_out)
    return {k: (g, sorted(i), sorted(o)) for k, (g, i, o) in plan.items()}


def grid_keys(geometry: Geometry, c_in: list[int], c_out: list[int]) -> list[tuple[int, int]]:
    if geometry.kind == "dwconv":
        return [(c, c) for c in c_out]
    if geometry.kind == "gconv":  # whole conv groups: the input width follows the output width
        return [(_gconv_input(geometry, c), c) for c in c_out]
    return [(i, o) for i in c_in for o in c_out]


def _gconv_input(geometry: Geometry, c_out: int) -> int:
    """Input width of a grouped conv that kept `c_out` output channels in whole conv groups."""
    per_in, per_out = geometry.group_widths
    return c_out // per_out * per_in


def kernel_timed(runtime: str) -> bool:
    """Whether layer entries on this runtime are the profiler's kernel times instead of wall times.

    ONNX Runtime's CPU provider reports per-node kernel times, which leave out the layout
    reorders and per-call overhead a lone layer pays but the same layer inside a network
    does not. There each layer is timed relative to a reference conv in the same session
    (see `exporters.ort_cpu_kernel_ratio`), which takes out the session-to-session drift of
    a shared machine (figures in benchmarks/RESULTS.md and profiles/README.md).

    Tried and not kept, measured on the five benchmark models here: timing each layer
    with sleeping workers (as kpc's runners run whole models) and with its input produced by
    another conv (a small conv reading a freshly converted input ran 1.6x slower: 1x1 16->16
    at 112x112, 0.053 against 0.033 ms; 0.035 ms inside MobileNetV3). It fitted the
    calibration timings better (worst 9.3% instead of 13.6%) but predicted the benchmark's
    random widths worse in two runs (worst 8.0% and 8.8% instead of 7.2%).
    Other runtimes time the whole call and have the call overhead subtracted.
    """
    from exporters import runner_class

    return runner_class(runtime).kernel_timing


@dataclass(frozen=True)
class PointTiming:
    value: float  # ms, or for kernel-timed runtimes the ratio to the reference conv
    reference_ms: float | None = None  # the reference conv's kernel ms in the same session


def time_layer(settings: ProfileSettings, geometry: Geometry, c_in: int, c_out: int, workdir: Path) -> PointTiming:
    """One layer at one width pair, alone on the target runtime: median ms, or its ratio to the reference."""
    from exporters import get_runner, measure, ort_cpu_kernel_ratio

    inputs = {"input": layer_input(geometry, c_in, settings.batch)}
    relative = kernel_timed(settings.runtime)
    if settings.runtime.startswith("ort") or settings.runtime == "trt":
        fp16 = settings.precision == "fp16"  # the graph computes in the precision the model will be served in
        model: Any = onnx_layer(geometry, c_in, c_out, settings.batch, workdir / "layer.onnx", fp16=fp16,
                                reference=relative)
        if fp16:
            inputs["input"] = inputs["input"].astype(np.float16)
    else:
        model = torch_layer(geometry, c_in, c_out)
    if relative:
        inputs[f"{REFERENCE_MARKER}_input"] = reference_input(settings.precision == "fp16")
        timed = ort_cpu_kernel_ratio(model, inputs, reference_marker=REFERENCE_MARKER, threads=settings.threads,
                                     warmup=settings.warmup, iters=settings.iters)
        return PointTiming(timed.ratio, timed.reference_ms)
    with get_runner(settings.runtime, threads=settings.threads, precision=settings.precision) as runner:
        runner.prepare(model, inputs)
        return PointTiming(float(measure(runner, inputs, warmup=settings.warmup, iters=settings.iters).median_ms))


def call_overhead_ms(settings: ProfileSettings, workdir: Path) -> float:
    """Median ms of a run that does almost nothing: what every isolated layer timing pays once.

    Inside a whole graph a layer does not pay the runtime's per-call cost, so it is
    subtracted from every layer entry and recorded in the header.
    """
    from exporters import get_runner, measure

    geometry = Geometry("conv", in_hw=(1, 1), out_hw=(1, 1))
    inputs = {"input": layer_input(geometry, 1, 1)}
    if settings.runtime.startswith("ort") or settings.runtime == "trt":
        model: Any = onnx_layer(geometry, 1, 1, 1, workdir / "tiny.onnx")
    else:
        model = torch_layer(geometry, 1, 1)
    with get_runner(settings.runtime, threads=settings.threads, precision=settings.precision) as runner:
        runner.prepare(model, inputs)
        return float(measure(runner, inputs, warmup=20, iters=200).median_ms)


def _read_partial(path: Path, target: dict[str, Any]) -> tuple[dict[str, dict[str, float]], list[float]]:
    """Points measured so far, and the reference conv's kernel ms of each relative point; any defect is one line."""
    hint = "delete it to start over, or drop --resume"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KpcError(f"cannot resume from {path} ({exc}): {hint}") from exc
    if not isinstance(data, dict) or data.get("schema") != PARTIAL_SCHEMA:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise KpcError(f"{path} was written by another kpc version ({schema}): {hint}")
    if data.get("target") != target:
        raise KpcError(f"{path} was measured for another target ({data.get('target')}): {hint}")
    raw_points, raw_reference = data.get("points", {}), data.get("reference_ms", [])
    if not isinstance(raw_points, dict) or not isinstance(raw_reference, list):
        raise KpcError(f"{path} is malformed (points should be an object, reference_ms a list): {hint}")
    points: dict[str, dict[str, float]] = {}
    for signature, measured in raw_points.items():
        if not isinstance(measured, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                for v in measured.values()):
            raise KpcError(f"{path} is malformed at points[{signature!r}] (expected width pairs with positive "
                           f"times): {hint}")
        points[str(signature)] = {str(k): float(v) for k, v in measured.items()}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in raw_reference):
        raise KpcError(f"{path} is malformed at reference_ms (expected numbers): {hint}")
    return points, [float(v) for v in raw_reference]


def profile(model: Any, example: Any, settings: ProfileSettings, out: Path | None = None, *, label: str = "",
            resume: bool = False, progress: Callable[[int, int], None] | None = None) -> LatencyTable:
    """Measure every layer signature of the model plus the remainder; return the table (and write it to `out`).

    With `out`, measured points are kept in `OUT.partial` as they come, so an
    interrupted profile resumes (`resume=True`) where it stopped.
    """
    settings = aligned_to_block(settings)
    check_profile_settings(settings)
    refuse_scripted(model)
    materialize(model, example.shape[1:])  # lazy layers take their shapes first (`kpc.lazy`)
    if parametrized_weights(model):  # the pruned copies it times are cut as a prune cuts: baked first
        model = copy_model(model)
        bake(model)
    relative = kernel_timed(settings.runtime)  # entries are ratios to the in-session reference conv
    device = target_device(settings.runtime)
    target = settings.target(device)
    input_size = [int(d) for d in example.shape[1:]]
    partial_path = out.with_name(out.name + ".partial") if out is not None else None
    points: dict[str, dict[str, float]] = {}
    reference_ms: list[float] = []  # the reference conv's kernel ms, one per relative point
    if partial_path is not None and resume and partial_path.is_file():
        points, reference_ms = _read_partial(partial_path, target)
        log.info("resuming: %d points already measured", sum(len(p) for p in points.values()))
    elif partial_path is not None and partial_path.exists() and not resume:
        partial_path.unlink()
    assert settings.round_to is not None
    layers = model_layers(model, example, settings.round_to, settings.min_channels, settings.ignore)
    grid = measurement_grid(layers, settings.round_to)
    total = sum(len(grid_keys(g, i, o)) for g, i, o in grid.values())
    whole_model_timings = len(CALIBRATION_FRACTIONS) + RANDOM_CALIBRATIONS  # fit_remainder's, counted in the progress
    done = sum(1 for k, (g, i, o) in grid.items() for p in grid_keys(g, i, o) if f"{p[0]},{p[1]}" in points.get(k, {}))

    def save_partial() -> None:
        if partial_path is not None:
            write_text_atomic(partial_path, json.dumps({"schema": PARTIAL_SCHEMA, "target": target,
                                                        "points": points, "reference_ms": reference_ms}))

    started = _dt.datetime.now(_dt.UTC)
    with tempfile.TemporaryDirectory(prefix="kpc-profile-") as tmp:
        overhead = 0.0 if relative else call_overhead_ms(settings, Path(tmp))
        try:
            for signature, (geometry, c_in, c_out) in grid.items():
                measured = points.setdefault(signature, {})
                for i, o in grid_keys(geometry, c_in, c_out):
                    key = f"{i},{o}"
                    if key in measured:
                        continue
                    timing = time_layer(settings, geometry, i, o, Path(tmp))
                    measured[key] = timing.value
                    if timing.reference_ms is not None:
                        reference_ms.append(timing.reference_ms)
                    done += 1
                    if progress is not None:
                        progress(done, total + whole_model_timings)
                    if done % 16 == 0:
                        save_partial()
        except BaseException:
            save_partial()
            raise
        save_partial()
    # relative points in ms: times the reference's median over the whole profile, one yardstick for every entry
    unit_ms = float(np.median(reference_ms)) if relative and reference_ms else 1.0
    entries = {sig: _entry(geometry, c_in, c_out, points[sig], overhead, unit_ms)
               for sig, (geometry, c_in, c_out) in grid.items()}
    header = {
        "device": device, "runtime": settings.runtime, "runtime_version": _runtime_version(settings.runtime),
        "precision": settings.precision, "batch": settings.batch, "threads": settings.threads,
        "date": started.isoformat(timespec="seconds"), "kpc_version": __version__,
        "model": label or f"{type(model).__module__}.{type(model).__qualname__}",
        "input_size": input_size, "full_model_ms": 0.0, "round_to": settings.round_to,
        "min_channels": settings.min_channels, "warmup": settings.warmup, "iters": settings.iters,
        "layers": len(layers.layers), "signatures": len(grid), "points": total, "call_overhead_ms": overhead,
        "entry_timing": "kernel-relative" if relative else "call",
        "whole_model_timing": "alone in a serving session (the runtime's default options, pinned threads); "
                              "pruned variants as ratios to it, in alternating blocks",
        "channel_block": channel_block(settings.runtime, settings.precision),
    }
    table = LatencyTable(header, entries, Remainder())
    fit_remainder(table, model, tuple(input_size), layers, settings,
                  progress=None if progress is None else lambda k: progress(total + k, total + whole_model_timings))
    if relative and reference_ms:
        header["reference"] = {"signature": REFERENCE_SIGNATURE, "median_ms": unit_ms,
                               "spread_ms": [float(np.min(reference_ms)), float(np.max(reference_ms))]}
    header["profile_seconds"] = round((_dt.datetime.now(_dt.UTC) - started).total_seconds(), 1)
    if out is not None:
        table.save(out)
        load_table(out)  # what we wrote must read back under the schema
        if partial_path is not None:
            partial_path.unlink(missing_ok=True)
    return table


def check_profile_settings(settings: ProfileSettings) -> None:
    """Numbers a profile cannot run with: one line naming the option."""
    for name in ("batch", "threads", "min_channels", "iters", "model_iters"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KpcError(f"--{name.replace('_', '-')} must be a positive integer (got {value!r})")
    for name in ("warmup", "model_warmup"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise KpcError(f"--{name.replace('_', '-')} must be a non-negative integer (got {value!r})")
    if not settings.runtime.endswith(("cuda", "trt")):
        from kpc.benchmark import warn_if_oversubscribed

        warn_if_oversubscribed(settings.threads, "measured into the table")


def _entry(geometry: Geometry, c_in: list[int], c_out: list[int], measured: dict[str, float],
           overhead: float, unit_ms: float = 1.0) -> Entry:
    """Grid of layer latencies in ms (measured values times `unit_ms`) with the per-call overhead taken out
    (never below a microsecond)."""

    def net(key: str) -> float:
        return max(measured[key] * unit_ms - overhead, 1e-3)

    if geometry.kind in ONE_WIDTH_KINDS:  # one point per output width, its input width alongside
        keys = grid_keys(geometry, c_in, c_out)
        return Entry(geometry.kind, np.array([i for i, _ in keys], float), np.array(c_out, float),
                     np.array([net(f"{i},{o}") for i, o in keys]))
    ms = np.array([[net(f"{i},{o}") for o in c_out] for i in c_in])
    kind = "linear" if geometry.kind == "linear" else "conv"
    return Entry(kind, np.array(c_in, float), np.array(c_out, float), ms)


def _runtime_version(runtime: str) -> str:
    if runtime.startswith("ort"):
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    if runtime == "trt":
        import tensorrt

        return f"tensorrt {tensorrt.__version__}"
    import torch

    return f"torch {torch.__version__}"


def _set_choice(widths: np.ndarray, options: dict[int, np.ndarray], fraction: float) -> None:
    """Every member of one choice at the option nearest `fraction` of the first member's full width."""
    first = next(iter(options.values()))
    pick = int(np.argmin(np.abs(first - fraction * first[-1])))
    for index, member_options in options.items():
        widths[index] = member_options[pick]


def uniform_widths(layers: ModelLayers, fraction: float, round_to: int, min_channels: int) -> np.ndarray:
    widths = layers.full_widths.copy()
    for options in width_choices(layers.groups, round_to, min_channels):
        _set_choice(widths, options, fraction)
    return widths


def pruned_copy(model: Any, layers: ModelLayers, widths: np.ndarray) -> Any:
    """A copy of the model at the given widths.

    Latency does not care which channels stay, but every layer that writes part of a group must
    keep some: a group whose channels are the concatenation of two convs (timm's GhostNet) lost
    all of the second conv's when its first channels were kept, and the copy had a conv with no
    outputs. So plain groups keep channels spread evenly over their width; groups cut by blocks
    (heads, a grouped conv's channel groups) keep their first whole blocks, as before. The
    positions depend only on the width and the count, so tied groups keep the same ones.
    """
    kept = {g.root: (g.width, g.in_channel_order(_spread(g, int(widths[g.index])))) for g in layers.groups
            if g.prunable and int(widths[g.index]) < g.width}
    return apply_kept(copy_model(model), layers.example, kept, heads={g.root for g in layers.groups if g.heads})


def _spread(group: Any, count: int) -> range | list[int]:
    """`count` positions of the group: evenly spaced for plain channels; the first ones (whole blocks) for a group
    cut by blocks, of heads or of a grouped conv's channel groups."""
    if group.blocks > 1 or group.heads:
        return range(count)
    return [i * group.width // count for i in range(count)]  # distinct: the step is width / count >= 1


def random_widths(layers: ModelLayers, rng: np.random.Generator, round_to: int, min_channels: int) -> np.ndarray:
    """Every prunable group at a random width; about half the groups share one fraction, as a prune's do."""
    widths = layers.full_widths.copy()
    shared = rng.uniform(0.25, 1.0)
    for options in width_choices(layers.groups, round_to, min_channels):
        _set_choice(widths, options, shared if rng.random() < 0.5 else rng.uniform(0.2, 1.0))
    return widths


ROUGH_FIT = 0.25  # a fit missing its own whole-model timings by more than this is reported as rough


def fit_remainder(table: LatencyTable, model: Any, input_size: tuple[int, ...], layers: ModelLayers,
                  settings: ProfileSettings, progress: Callable[[int], None] | None = None) -> None:
    """Time the whole model at uniform and random widths; fit scale, fixed and volume terms.

    `progress(k)` after the k-th whole-model timing: they take most of a small model's profile.

    Uniform widths alone make the entry sum and the tensor volumes nearly collinear, so
    random assignments (seeded, distinct from any benchmark's) are timed too.
    """
    predictor = LatencyModel(table, layers.layers, layers.full_widths, layers.min_widths)
    rng = np.random.default_rng(RANDOM_CALIBRATION_SEED)
    variants = [(f"uniform {f:g}", uniform_widths(layers, f, settings.round_to, settings.min_channels))
                for f in CALIBRATION_FRACTIONS]
    variants += [(f"random {i + 1}", random_widths(layers, rng, settings.round_to, settings.min_channels))
                 for i in range(RANDOM_CALIBRATIONS)]
    features, measured, records = [], [], []
    timer = RelativeTimer(model, input_size, runtime=settings.runtime, batch=settings.batch,
                          threads=settings.threads, precision=settings.precision, warmup=settings.model_warmup,
                          iters=settings.model_iters)
    try:
        for name, widths in variants:
            ratio = timer.ratio(pruned_copy(model, layers, widths))
            features.append((predictor.entries_ms(widths), predictor.activation_fraction(widths)))
            measured.append(ratio * timer.reference_ms)
            records.append({"variant": name, "measured_ms": measured[-1], "ratio_to_unpruned": ratio})
            if progress is not None:
                progress(len(records))
    finally:
        timer.close()
    columns = np.array(features)
    target = np.array(measured)
    smallest = (predictor.entries_ms(layers.min_widths), predictor.activation_fraction(layers.min_widths))
    scale, fixed, per_output = _fit(columns[:, 0], columns[:, 1], target, smallest)
    table.remainder = Remainder(scale, fixed, per_output)
    for record, (e, a_out) in zip(records, features, strict=True):
        record["predicted_ms"] = scale * e + fixed + per_output * a_out
        record["sum_of_layers_ms"] = float(e)
    table.remainder.calibration = records
    table.header["full_model_ms"] = timer.reference_ms
    errors = [abs(r["predicted_ms"] / r["measured_ms"] - 1) for r in records]
    log.info("remainder fitted on %d whole-model timings (each interleaved with the unpruned model): scale %.3f, "
             "fixed %.3f ms, output volume %+.3f ms; worst calibration error %.1f%%", len(records), scale, fixed,
             per_output, 100 * max(errors))
    if max(errors) > ROUGH_FIT:
        log.warning("the table misses its own whole-model timings by up to %.0f%% (more than %.0f%%): its "
                    "predictions are rough, and a --budget-ms prune leans on its closed loop's timings; profile with "
                    "more --iters, on an idle machine, or at a larger --input-size", 100 * max(errors),
                    100 * ROUGH_FIT)


def _fit(entries: np.ndarray, outputs: np.ndarray, target: np.ndarray,
         smallest: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """Least squares for target = s*entries + c + r*outputs (r signed), keeping s > 0 and the smallest plan > 0.

    Terms are dropped (the volume term first) until the entry scale comes out positive: a
    prediction must grow with the layers' own latency. (A separate input-volume term was
    tried and dropped: it is nearly collinear with the output volume and overfits.) Where
    `smallest` (the entry sum and output volume of every group at its smallest width) is
    given, a fit must also predict that plan a positive time: on a 0.1-ms ResNet-18 at 32x32
    timed 3 times per point, the three-term fit read fixed -0.33 ms and output volume -1.07
    ms, and predicted -0.11 ms for the smallest plan, which a prune then chose among.
    """
    candidates = {"e": entries, "c": np.ones_like(entries), "o": outputs}
    for columns in (("e", "c", "o"), ("e", "c"), ("e",)):
        design = np.stack([candidates[k] for k in columns], axis=1)
        coef, *_ = np.linalg.lstsq(design, target, rcond=None)
        fitted = dict(zip(columns, coef, strict=True))
        s, c, r = float(fitted["e"]), float(fitted.get("c", 0.0)), float(fitted.get("o", 0.0))
        if s > 0 and (smallest is None or s * smallest[0] + c + r * smallest[1] > 0):
            return s, c, r
    return 1.0, max(0.0, float(np.mean(target - entries))), 0.0
