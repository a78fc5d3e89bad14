"""`kpc bench`: baseline vs candidate on one runtime, interleaved, with a speedup interval and an optional gate.

The result table goes to stdout (it is the command's output, like `kpc inspect`);
progress and errors go to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kpc.benchmark import BenchSettings
from kpc.cli._common import (
    InputSizeOpt,
    ModelFileOpt,
    NumClassesOpt,
    Precision,
    Runtime,
    err_console,
    flag,
    handle_errors,
    out_console,
    output_path,
    value,
)

B = BenchSettings()


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)


@handle_errors
def bench_command(
    baseline: Annotated[str, typer.Argument(help="Baseline: a model spec or an artifact dir.")],
    candidate: Annotated[str, typer.Argument(help="Candidate (e.g. the pruned artifact): a spec or an artifact.")],
    runtime: Annotated[Runtime, typer.Option("--runtime", "-r", help="Runtime both models are timed on.")]
    = Runtime(B.runtime),
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch size fed to both models.")] = B.batch,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="Intra-op threads for both, pinned and "
                                                "recorded.")] = B.threads,
    precision: Annotated[Precision, typer.Option("--precision", help="As the runtime supports.")]
    = Precision(B.precision),
    channels_last: Annotated[bool, flag("--channels-last", help="torch runtimes: NHWC memory format "
                                                "(refused where the runtime ignores it).")] = B.channels_last,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs per model.")] = B.warmup,
    iters: Annotated[int, typer.Option("--iters", help="Timed runs per model, interleaved.")] = B.iters,
    min_speedup: Annotated[float | None, typer.Option("--min-speedup", help="Gate: exit 1 unless the 95% CI's "
                                                      "lower bound is at least this.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", parser=output_path,
                                                  help="Write the kpc-bench/1 report here.")] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", parser=output_path,
                                                      help="Write a markdown summary here.")] = None,
    num_classes: NumClassesOpt = None,
    input_size: InputSizeOpt = None,
    model_file: ModelFileOpt = None,
) -> None:
    """Time baseline and candidate interleaved on one runtime; report latencies and the speedup with a 95% CI.

    --num-classes and --input-size apply to spec sides only; an artifact records its own.
    With --min-speedup, the report files are written first and then the gate decides the exit code.
    """
    from kpc.atomic import resolve_file_target, write_text_atomic
    from kpc.benchmark import check_gate, check_runtime, open_side, render_markdown, run_bench
    from kpc.specs import check_num_classes, parse_input_size

    settings = BenchSettings(runtime=value(runtime), batch=batch, threads=threads, precision=value(precision),
                             channels_last=channels_last, warmup=warmup, iters=iters)
    check_runtime(settings)
    if min_speedup is not None:
        from kpc.budget import finite_positive

        finite_positive(min_speedup, "--min-speedup")
    for target in (json_out, markdown_out):  # a directory, a device or a dangling link fails now, not after timing
        if target is not None:
            resolve_file_target(target)
    check_num_classes(num_classes)
    size = parse_input_size(input_size)
    base = open_side(baseline, num_classes=num_classes, input_size=size, model_file=model_file)
    cand = open_side(candidate, num_classes=num_classes, input_size=size, model_file=model_file)
    with err_console.status("benchmarking", spinner="dots"):
        report = run_bench(base, cand, settings, min_speedup=min_speedup)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(report, indent=1) + "\n")
    if markdown_out is not None:
        write_text_atomic(markdown_out, render_markdown(report))
    out_console.print(_table(report))
    check_gate(report)


def _table(report: dict[str, Any]) -> Table:
    s = report["speedup"]
    table = Table(title=f"{report['runtime']} | batch {report['batch']} | {report['precision']} | "
                        f"{report['threads']} threads | {report['device']}",
                  caption=f"speedup {s['ratio']:.2f}x ({s['confidence']:.0%} CI {s['ci_low']:.2f}-{s['ci_high']:.2f})"
                          + _gate_text(report["gate"]))
    for column in ("side", "model", "GMACs", "median ms", "p90 ms", "p99 ms"):
        table.add_column(column, justify="left" if column in ("side", "model") else "right")
    for role in ("baseline", "candidate"):
        side, latency = report[role], report[role]["latency"]
        table.add_row(role, side["source"], f"{side['gmacs']:.3g}", f"{latency['median_ms']:.3f}",
                      f"{latency['p90_ms']:.3f}", f"{latency['p99_ms']:.3f}")
    return table


def _gate_text(gate: dict[str, Any]) -> str:
    if gate["min_speedup"] is None:
        return ""
    return f"; gate >= {gate['min_speedup']:g}: {'passed' if gate['passed'] else 'FAILED'}"
