"""`kpc profile`: measure a latency table on the serving runtime, or plot one (--show)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kpc.cli._common import (
    InputSizeOpt,
    ModelFileOpt,
    NumClassesOpt,
    Precision,
    PretrainedOpt,
    Runtime,
    WeightsOpt,
    err_console,
    flag,
    handle_errors,
    log,
    output_path,
    value,
)
from kpc.latency.profiler import ProfileSettings

P = ProfileSettings()


def register(app: typer.Typer) -> None:
    app.command("profile")(profile_command)


@handle_errors
def profile_command(
    model: Annotated[str | None, typer.Argument(help="Model spec or artifact to profile.")] = None,
    runtime: Annotated[Runtime, typer.Option("--runtime", help="The runtime that will serve the model.")]
    = Runtime(P.runtime),
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch the model will be served at.")] = P.batch,
    threads: Annotated[int, typer.Option("--threads", min=1, help="Threads pinned while measuring.")] = P.threads,
    precision: Annotated[Precision, typer.Option("--precision", help="Precision, as the runtime supports.")]
    = Precision(P.precision),
    out: Annotated[Path | None, typer.Option("--out", "-o", parser=output_path,
                                             help="Table file (default: profiles/<device>/"
                                             "<runtime>-<precision>-b<batch>-t<threads>/<model>.json); with "
                                             "--show, the PNG (default: next to the table).")] = None,
    resume: Annotated[bool, flag("--resume", help="Keep the points an interrupted run measured.")] = False,
    overwrite: Annotated[bool, flag("--overwrite", help="Replace an existing table (or PNG with --show).")] = False,
    show: Annotated[Path | None, typer.Option("--show", help="Plot an existing table to PNG instead.")] = None,
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    input_size: InputSizeOpt = None,
    pretrained: PretrainedOpt = False,
    model_file: ModelFileOpt = None,
    round_to: Annotated[int | None, typer.Option("--round-to", min=1, help="Width step of the grid (default: 8, "
                                                 "aligned to the runtime's channel block).")] = P.round_to,
    min_channels: Annotated[int, typer.Option("--min-channels", min=1, help="Smallest width the prune may choose.")]
    = P.min_channels,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Layers the prune will leave whole.")] = None,
    iters: Annotated[int, typer.Option("--iters", min=3, help="Timed runs per layer point.")] = P.iters,
    profiles_root: Annotated[Path, typer.Option("--profiles-root", help="Root for the default --out.")]
    = Path("profiles"),
) -> None:
    """Time every layer signature over a width grid, fit the remainder, and write the table."""
    from kpc.errors import KpcError

    if show is not None:
        from kpc.latency.plot import plot_table

        if model is not None:
            raise KpcError("--show plots an existing table: give the table alone (kpc profile --show TABLE)")
        if out is not None and out.suffix.lower() != ".png":
            raise KpcError(f"--show writes a PNG: give --out a .png path (got {out})")
        if out is not None and out.exists() and not overwrite:
            raise KpcError(f"{out} exists: pass --overwrite to replace it")
        png = plot_table(show, out)
        log(f"wrote {png}")
        return
    if model is None:
        raise KpcError("give a model to profile (or --show TABLE to plot one)")
    from exporters import get_runner
    from kpc.artifact import open_model
    from kpc.atomic import check_writable, resolve_file_target
    from kpc.latency.profiler import check_profile_settings, default_table_path, profile, target_device
    from kpc.specs import parse_input_size

    runtime_name, precision_name = value(runtime), value(precision)
    get_runner(runtime_name, threads=threads, precision=precision_name).close()  # missing runtime: fail first
    settings = ProfileSettings(runtime=runtime_name, batch=batch, threads=threads, precision=precision_name,
                               round_to=round_to, min_channels=min_channels, ignore=tuple(ignore or ()), iters=iters)
    check_profile_settings(settings)
    loaded = open_model(model, weights=weights, num_classes=num_classes, input_size=parse_input_size(input_size),
                        pretrained=pretrained, model_file=model_file)
    target = out or default_table_path(profiles_root, target_device(runtime_name), settings, loaded.label)
    resolve_file_target(target)
    check_existing_table(Path(target), resume=resume, overwrite=overwrite)
    check_writable(target)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(f"profiling on {runtime_name}", total=None)
        try:
            table = profile(loaded.model, loaded.example_input(), settings, target, label=loaded.label,
                            resume=resume, progress=lambda done, total: bar.update(task, completed=done, total=total))
        except KeyboardInterrupt:
            raise KpcError(f"interrupted: measured points are kept; run again with --resume to finish {target}") \
                from None
    h = table.header
    log(f"wrote {target}: {h['signatures']} signatures, {h['points']} points, full model {h['full_model_ms']:.3f} ms "
        f"on {h['device']} ({h['runtime']}, {h['precision']}, batch {h['batch']}, {h['threads']} threads) "
        f"in {h['profile_seconds']:.0f} s")


def check_existing_table(target: Path, *, resume: bool, overwrite: bool) -> None:
    """A finished table is never replaced without --overwrite, nor re-measured by --resume (which finishes only an
    interrupted profile: its `.partial` points)."""
    from kpc.errors import KpcError

    if not target.is_file() or overwrite:
        return
    partial = target.with_name(target.name + ".partial")
    if resume and partial.is_file():
        return
    if resume:
        raise KpcError(f"{target} is a finished table, with no interrupted profile to resume: nothing to do; pass "
                       "--overwrite to measure it again")
    raise KpcError(f"{target} exists: pass --overwrite to measure it again (or --resume to finish an interrupted "
                   "profile of it)")
