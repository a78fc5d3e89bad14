"""`kpc profile`: measure a latency table on the serving runtime, or plot one (--show)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kpc.cli._common import InputSizeOpt, NumClassesOpt, WeightsOpt, err_console, handle_errors, log


def register(app: typer.Typer) -> None:
    app.command("profile")(profile_command)


@handle_errors
def profile_command(
    model: Annotated[str | None, typer.Argument(help="Model spec or artifact to profile.")] = None,
    runtime: Annotated[str, typer.Option("--runtime", help="ort-cpu, ort-cuda, torch-cpu, torch-cuda or trt.")]
    = "ort-cpu",
    batch: Annotated[int, typer.Option("--batch", min=1)] = 1,
    threads: Annotated[int, typer.Option("--threads", min=1, help="Threads pinned while measuring.")] = 1,
    precision: Annotated[str, typer.Option("--precision", help="fp32, fp16 or bf16 (runtime permitting).")] = "fp32",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Table file (default: profiles/<device>/"
                                             "<runtime>-<precision>-b<batch>-t<threads>/<model>.json).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the points an interrupted run measured.")] = False,
    show: Annotated[Path | None, typer.Option("--show", help="Plot an existing table to PNG instead.")] = None,
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    input_size: InputSizeOpt = None,
    round_to: Annotated[int, typer.Option("--round-to", min=1)] = 8,
    min_channels: Annotated[int, typer.Option("--min-channels", min=1)] = 8,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Layers the prune will leave whole.")] = None,
    iters: Annotated[int, typer.Option("--iters", min=3, help="Timed runs per layer point.")] = 15,
    profiles_root: Annotated[Path, typer.Option("--profiles-root", help="Root for the default --out.")]
    = Path("profiles"),
) -> None:
    """Time every layer signature over a width grid, fit the remainder, and write the table."""
    from kpc.errors import KpcError

    if show is not None:
        from kpc.latency.plot import plot_table

        png = plot_table(show, out)
        log(f"wrote {png}")
        return
    if model is None:
        raise KpcError("give a model to profile (or --show TABLE to plot one)")
    from exporters import get_runner
    from kpc.artifact import open_model
    from kpc.latency.profiler import ProfileSettings, default_table_path, profile, target_device
    from kpc.specs import parse_input_size

    get_runner(runtime, threads=threads, precision=precision).close()  # unknown / missing runtime: fail first
    loaded = open_model(model, weights=weights, num_classes=num_classes, input_size=parse_input_size(input_size))
    settings = ProfileSettings(runtime=runtime, batch=batch, threads=threads, precision=precision,
                               round_to=round_to, min_channels=min_channels, ignore=tuple(ignore or ()), iters=iters)
    target = out or default_table_path(profiles_root, target_device(runtime), settings, loaded.spec.label())
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(f"profiling on {runtime}", total=None)
        try:
            table = profile(loaded, settings, target, resume=resume,
                            progress=lambda done, total: bar.update(task, completed=done, total=total), log=log)
        except KeyboardInterrupt:
            raise KpcError(f"interrupted: measured points are kept; run again with --resume to finish {target}") \
                from None
    h = table.header
    log(f"wrote {target}: {h['signatures']} signatures, {h['points']} points, full model {h['full_model_ms']:.3f} ms "
        f"on {h['device']} ({h['runtime']}, {h['precision']}, batch {h['batch']}, {h['threads']} threads) "
        f"in {h['profile_seconds']:.0f} s")
