"""Measure the speedup of a candidate over a baseline on one runtime, with an interval, not a hope.

Both models are prepared on the same runtime in one process, each in the session a server
would run (ONNX Runtime's defaults), and timed in alternating blocks (A, B, B, A, ...), each
block one model alone, so drift in clock speed or background load hits both alike and
neither runs right after the other's spinning workers; the speedup is
the ratio of medians with a paired bootstrap confidence interval. A gate (`min_speedup`)
passes only when the interval's lower bound clears the threshold, so a noisy run that
merely *might* be fast enough fails instead of passing by luck.

The report is a plain dict with a stable schema (`BENCH_SCHEMA`, documented in
`report_schema_doc`) so CI can diff and plot it; the markdown view is derived from it.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kpc import __version__
from kpc.artifact import LoadedModel, is_artifact, open_model
from kpc.errors import KpcError, VerificationFailed
from kpc.train.threads import available_cores, machine_busy_seconds

BENCH_SCHEMA = "kpc-bench/1"
INPUT_NAME = "input"
DEFAULT_WARMUP = 10
DEFAULT_ITERS = 100  # two small CNNs on 2 CPU cores: a few seconds

log = logging.getLogger(__name__)

# The JSON report, key by key; kept next to the code that writes it and checked by the tests.
REPORT_SCHEMA: dict[str, str] = {
    "schema": "str, always 'kpc-bench/1'; bumped on any incompatible change",
    "created": "str, ISO-8601 UTC time the measurement finished",
    "kpc_version": "str",
    "runtime": "str, one of exporters.RUNTIMES",
    "precision": "str, fp32 | fp16 | bf16 | int8 (what the runtime was asked for)",
    "batch": "int",
    "threads": "int, intra-op threads both runners were pinned to",
    "channels_last": "bool",
    "input_shape": "list[int], [batch, C, H, W] fed to both models",
    "warmup": "int, untimed runs per model",
    "iters": "int, timed runs per model (in alternating blocks, each model alone in its block)",
    "device": "str, CPU model or GPU name as the runner describes it",
    "versions": "dict[str, str], python, torch and the runtime's packages",
    "baseline": "side: {source: str, label: str, artifact: bool, params: int, gmacs: float, "
                "latency: {median_ms, p90_ms, p99_ms, mean_ms: float, n: int}}",
    "candidate": "side, as baseline",
    "speedup": "{ratio: float (median baseline / median candidate), ci_low: float, ci_high: float, "
               "confidence: float, resamples: int, method: str}",
    "gate": "{min_speedup: float | null, passed: bool | null (null when no gate was asked)}",
    "cores": "{available: int (cores this process may use), other_processes: float | null (cores' worth of CPU "
             "time other processes used while timing; /proc/stat, null elsewhere), contended: bool (they took "
             "cores the timing threads needed), oversubscribed: bool (more CPU threads pinned than cores)}",
}


@dataclass(frozen=True)
class BenchSettings:
    """How to time: the runtime and its knobs, and how many rounds."""

    runtime: str = "ort-cpu"
    batch: int = 1
    threads: int | None = 2  # pinned and recorded; None: torch's default (the physical cores)
    precision: str = "fp32"
    channels_last: bool = False
    warmup: int = DEFAULT_WARMUP
    iters: int = DEFAULT_ITERS
    blocks: int = 10  # alternating blocks the timed runs are split into (see exporters.blocked)
    confidence: float = 0.95
    resamples: int = 2000
    seed: int = 0

    def check(self) -> None:
        from exporters import runner_class

        for name, low in (("batch", 1), ("warmup", 0), ("iters", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                why = " (the interval needs pairs)" if name == "iters" else ""
                raise KpcError(f"need an integer --{name} >= {low}{why}, got {value!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise KpcError(f"--threads must be a positive integer, got {self.threads!r}")
        if self.channels_last and not runner_class(self.runtime).supports_channels_last:
            raise KpcError(f"--channels-last applies to torch runtimes; {self.runtime} chooses its own memory layout, "
                           "so the flag would be recorded but ignored: drop it")


@dataclass
class ModelSide:
    """A plain module as one side of a benchmark (what `kpc.bench` wraps a user's model in)."""

    model: Any
    input_size: tuple[int, ...]
    source: str
    path: Path | None = None

    @property
    def label(self) -> str:
        return self.source

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        from kpc.apply import example_input

        return example_input(self.input_size, batch, seed)


def bench(baseline: Any, candidate: Any, example_inputs: torch.Tensor, *, runtime: str = "ort-cpu",
          threads: int | None = None, precision: str = "fp32", warmup: int = DEFAULT_WARMUP,
          iters: int = DEFAULT_ITERS, min_speedup: float | None = None) -> dict[str, Any]:
    """`kpc.bench`: time two modules interleaved on one runtime; the report holds the speedup and its interval.

    The batch is `example_inputs`' batch; the gate (`min_speedup`) is recorded in the
    report, never raised (see `check_gate`).
    """
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.ndim < 2:
        raise KpcError("example_inputs should be one input batch, e.g. torch.randn(1, 3, 224, 224)")
    size = tuple(int(d) for d in example_inputs.shape[1:])
    settings = BenchSettings(runtime=runtime, batch=int(example_inputs.shape[0]), threads=threads,
                             precision=precision, warmup=warmup, iters=iters)
    check_runtime(settings)
    sides = [ModelSide(m, size, _describe(m, name)) for m, name in ((baseline, "baseline"), (candidate, "candidate"))]
    return run_bench(sides[0], sides[1], settings, min_speedup=min_speedup)


def _describe(model: Any, role: str) -> str:
    return f"{role} ({type(model).__module__}.{type(model).__qualname__})"


def check_runtime(settings: BenchSettings) -> None:
    """Fail in a second on an unknown, missing or GPU-less runtime, or a precision it lacks, before loading models."""
    import exporters

    settings.check()
    _runner(exporters, settings).close()


def open_side(text: str, *, num_classes: int | None = None, input_size: tuple[int, int, int] | None = None,
              model_file: str | None = None) -> LoadedModel:
    """Open one side; --num-classes/--input-size shape a spec but are ignored for an artifact, which records its own."""
    if is_artifact(text):
        return open_model(text, model_file=model_file)
    return open_model(text, num_classes=num_classes, input_size=input_size)


def check_same_input(baseline: Any, candidate: Any) -> tuple[int, ...]:
    """Both models must eat the same tensor, or the comparison times two different tasks."""
    a, b = tuple(baseline.input_size), tuple(candidate.input_size)
    if a != b:
        specs = [side for side, loaded in (("baseline", baseline), ("candidate", candidate))
                 if getattr(getattr(loaded, "plan", None), "kind", None) == "model"]
        advice = (f"pass --input-size {_shape(b if specs == ['baseline'] else a)} for the {specs[0]} (a model spec)"
                  if len(specs) == 1 else "compare models built for one input size")
        raise KpcError(f"the models take different inputs: baseline {_shape(a)}, candidate {_shape(b)}; {advice}")
    return a


def _shape(size: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in size)


def run_bench(baseline: Any, candidate: Any, settings: BenchSettings, *,
              min_speedup: float | None = None) -> dict[str, Any]:
    """Prepare both models on the runtime, time them interleaved, return the report (never raises on the gate).

    Call `check_gate` afterwards: the report must be written before a failed gate exits.
    """
    import exporters

    settings.check()
    size = check_same_input(baseline, candidate)
    inputs = {INPUT_NAME: np.random.default_rng(settings.seed).standard_normal((settings.batch, *size),
                                                                                dtype=np.float32)}
    with tempfile.TemporaryDirectory(prefix="kpc-bench-") as workdir, \
            _runner(exporters, settings) as runner_a, _runner(exporters, settings) as runner_b:
        log.info(f"preparing {baseline.source} and {candidate.source} on {settings.runtime} "
            f"({settings.precision}, batch {settings.batch})")
        _prepare(runner_a, baseline, inputs, settings, Path(workdir) / "baseline.onnx")
        _prepare(runner_b, candidate, inputs, settings, Path(workdir) / "candidate.onnx")
        blocks = max(2, min(settings.blocks, settings.iters // 5))
        per_block = -(-settings.iters // blocks)
        log.info(f"timing in alternating blocks: {blocks} blocks of {per_block} runs each ({settings.warmup} warm-up "
                 "runs first), each model alone in its block as a server runs it")
        load_before = machine_busy_seconds()
        stats_a, stats_b = exporters.blocked(runner_a, inputs, runner_b, inputs, blocks=blocks, per_block=per_block,
                                             warmup=settings.warmup, pause_s=type(runner_a).idle_spin_s)
        others = _other_processes_cores(load_before, machine_busy_seconds())
        described = runner_a.describe()
    threads = int(described.get("threads", settings.threads or 0))
    busy = contended(others, max(1, threads))
    if busy:
        log.warning(CONTENDED_HINT.format(others=others))
    oversubscribed = not settings.runtime.endswith(("cuda", "trt")) and warn_if_oversubscribed(threads, "timed")
    ratio, low, high = exporters.bootstrap_ratio_ci(stats_a.samples_ms, stats_b.samples_ms,
                                                    confidence=settings.confidence, resamples=settings.resamples,
                                                    seed=settings.seed)
    return {
        "schema": BENCH_SCHEMA,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "kpc_version": __version__,
        "runtime": settings.runtime,
        "precision": settings.precision,
        "batch": settings.batch,
        "threads": threads,
        "channels_last": settings.channels_last,
        "input_shape": [settings.batch, *size],
        "warmup": settings.warmup,
        "iters": settings.iters,
        "device": str(described.get("device", "unknown")),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **{k: str(v) for k, v in described.get("versions", {}).items()}},
        "baseline": _side(baseline, stats_a),
        "candidate": _side(candidate, stats_b),
        "speedup": {"ratio": ratio, "ci_low": low, "ci_high": high, "confidence": settings.confidence,
                    "resamples": settings.resamples, "method": "median ratio, paired percentile bootstrap"},
        "gate": {"min_speedup": min_speedup,
                 "passed": None if min_speedup is None else bool(low >= min_speedup)},
        "cores": {"available": available_cores(), "other_processes": others, "contended": busy,
                  "oversubscribed": oversubscribed},
    }


def warn_if_oversubscribed(threads: int, what: str) -> bool:
    """Warn where more threads are pinned than this process has cores: they take turns on them, and a timing
    measures that rather than the model (99 threads on 2 cores read a ResNet-18 child at 102 ms against 0.9)."""
    cores = available_cores()
    if threads <= cores:
        return False
    log.warning(OVERSUBSCRIBED_HINT.format(threads=threads, cores=cores, what=what))
    return True


OVERSUBSCRIBED_HINT = ("{threads} threads on the {cores} cores this process may use: the runtime's threads take turns "
                       "on them, so what is {what} is that contention, not the model; pass at most {cores} threads")


def _other_processes_cores(before: tuple[float, float, float] | None,
                           after: tuple[float, float, float] | None) -> float | None:
    """Cores' worth of CPU time every other process used while timing (None where /proc/stat is missing)."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, other / (after[2] - before[2]))


# Other processes' load (in cores) above what the timing threads leave free, plus this slack: contended.
# (Its own idle sessions' spinning threads are this process's, so they do not count against it.)
CONTENDED_SLACK = 0.25


def contended(others: float | None, threads: int) -> bool:
    """Whether other processes took cores the timing threads needed (then no figure is an idle server's)."""
    return others is not None and others > max(0, available_cores() - threads) + CONTENDED_SLACK


CONTENDED_HINT = ("other processes kept {others:.1f} cores busy while timing: they competed for the cores, so these "
                  "figures are not what an idle server measures; rerun on an idle machine")


def contention_note(report: dict[str, Any]) -> str | None:
    """One sentence for a report timed beside a busy process; None when the cores were free (or unknown)."""
    cores = report.get("cores") or {}
    if cores.get("oversubscribed"):
        return OVERSUBSCRIBED_HINT.format(threads=report.get("threads"), cores=cores.get("available"), what="timed")
    if not cores.get("contended"):
        return None
    return CONTENDED_HINT.format(others=cores["other_processes"])


def _runner(exporters: Any, settings: BenchSettings) -> Any:
    return exporters.get_runner(settings.runtime, threads=settings.threads, precision=settings.precision,
                                channels_last=settings.channels_last)


def _prepare(runner: Any, loaded: Any, inputs: dict[str, np.ndarray], settings: BenchSettings,
             onnx_path: Path) -> None:
    """Hand the runner the module; ONNX Runtime at fp16 needs an fp16 graph, exported here."""
    model = loaded.model.eval()
    if settings.runtime.startswith("ort-") and settings.precision == "fp16":
        import exporters

        example = {k: torch.from_numpy(v) for k, v in inputs.items()}
        runner.prepare(exporters.export_onnx(model, example, onnx_path, fp16=True), inputs)
    else:
        runner.prepare(model, inputs)


def _side(loaded: Any, stats: Any) -> dict[str, Any]:
    from kpc.costs import count_macs

    macs, params = count_macs(loaded.model, loaded.example_input())
    return {"source": loaded.source, "label": loaded.label, "artifact": loaded.path is not None,
            "params": int(params), "gmacs": macs / 1e9, "latency": stats.to_dict()}


def check_gate(report: dict[str, Any]) -> None:
    """Raise VerificationFailed (exit 1) when a gate was asked and the interval's lower bound misses it."""
    gate, speedup = report["gate"], report["speedup"]
    if gate["min_speedup"] is None or gate["passed"]:
        return
    note = contention_note(report)
    raise VerificationFailed(
        f"speedup {speedup['ratio']:.3g}x ({speedup['confidence']:.0%} CI {speedup['ci_low']:.3g}-"
        f"{speedup['ci_high']:.3g}) on {report['runtime']} does not clear --min-speedup {gate['min_speedup']:g}: "
        "the interval's lower bound is below it" + (f" ({note})" if note else ""))


def render_markdown(report: dict[str, Any]) -> str:
    """A short summary for a PR comment or a results file: conditions, a table, the verdict."""
    s, gate = report["speedup"], report["gate"]
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    rows = [f"| {role} | `{report[role]['source']}` | {report[role]['gmacs']:.3g} | {report[role]['params'] / 1e6:.3g} "
            f"| {report[role]['latency']['median_ms']:.3f} | {report[role]['latency']['p90_ms']:.3f} "
            f"| {report[role]['latency']['p99_ms']:.3f} |" for role in ("baseline", "candidate")]
    verdict = f"**Speedup {s['ratio']:.2f}x** ({s['confidence']:.0%} CI {s['ci_low']:.2f}-{s['ci_high']:.2f})"
    if gate["min_speedup"] is not None:
        verdict += f"; gate >= {gate['min_speedup']:g}: **{'passed' if gate['passed'] else 'FAILED'}**"
    return "\n".join([
        f"### kpc bench: {report['runtime']}, batch {report['batch']}, {report['precision']}, "
        f"{report['threads']} threads",
        "",
        f"{report['device']}; input {_shape(tuple(report['input_shape']))}; {report['warmup']} warm-up + "
        f"{report['iters']} interleaved runs each; {report['created']}; kpc {report['kpc_version']}; {versions}",
        "",
        "| side | model | GMACs | Mparams | median ms | p90 ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        verdict,
        "",
    ])
