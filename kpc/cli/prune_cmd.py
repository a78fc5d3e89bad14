"""`kpc prune`: knapsack channel pruning of a model under a FLOPs, ratio or latency budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kpc.cli._common import InputSizeOpt, NumClassesOpt, WeightsOpt, err_console, handle_errors, log


def register(app: typer.Typer) -> None:
    app.command("prune")(prune_command)


@handle_errors
def prune_command(
    model: Annotated[str, typer.Argument(help="torchvision:NAME, timm:NAME, path/file.py:factory or an artifact dir.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact directory to write.")],
    budget_gflops: Annotated[float | None, typer.Option("--budget-gflops", help="Budget in GFLOPs (1 FLOP = 1 MAC).")]
    = None,
    budget_ratio: Annotated[float | None, typer.Option("--budget-ratio", help="Budget as a fraction of the "
                                                       "unpruned cost, e.g. 0.5.")] = None,
    budget_ms: Annotated[float | None, typer.Option("--budget-ms", help="Latency budget in ms (needs --lut).")] = None,
    lut: Annotated[Path | None, typer.Option("--lut", help="Latency table from `kpc profile`.")] = None,
    force_lut: Annotated[bool, typer.Option("--force-lut", help="Use a latency table measured on another target.")]
    = False,
    runtime: Annotated[str | None, typer.Option("--runtime", help="Target runtime for --budget-ms (default: the "
                                                "table's).")] = None,
    batch: Annotated[int | None, typer.Option("--batch", min=1, help="Target batch for --budget-ms.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="Target threads for --budget-ms.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="Target precision for --budget-ms.")] = None,
    data: Annotated[str, typer.Option("--data", help="Calibration data: synthetic, fashion-mnist[:PATH], "
                                      "cifar10:PATH, imagefolder:PATH.")] = "synthetic",
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    input_size: InputSizeOpt = None,
    calib_batches: Annotated[int, typer.Option("--calib-batches", min=1, help="Batches for the importance pass.")] = 8,
    calib_batch_size: Annotated[int, typer.Option("--calib-batch-size", min=1)] = 32,
    importance: Annotated[str, typer.Option("--importance", help="taylor or magnitude.")] = "taylor",
    solver: Annotated[str, typer.Option("--solver", help="exact (DP) or greedy (value/cost ratio).")] = "exact",
    round_to: Annotated[int, typer.Option("--round-to", min=1, help="Kept widths are multiples of this.")] = 8,
    min_channels: Annotated[int, typer.Option("--min-channels", min=1, help="No group keeps fewer channels.")] = 8,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Layer name or glob to leave whole "
                                                     "(repeatable).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out directory.")] = False,
) -> None:
    """Score channels, solve the knapsack under the budget, remove channels physically, save the artifact."""
    from kpc.artifact import base_plan, open_model, save_artifact
    from kpc.data import parse_data_spec
    from kpc.errors import KpcError
    from kpc.prune import Budget, PruneSettings, prune
    from kpc.specs import parse_input_size

    budget = Budget(gflops=budget_gflops, ratio=budget_ratio, ms=budget_ms)
    if out.exists() and not overwrite and out.is_dir() and any(out.iterdir()):
        raise KpcError(f"output directory {out} already exists and is not empty: remove it or pass --overwrite")
    if importance not in ("taylor", "magnitude"):
        raise KpcError(f"unknown importance {importance!r}: use taylor or magnitude")
    if solver not in ("exact", "greedy"):
        raise KpcError(f"unknown solver {solver!r}: use exact or greedy")
    settings = PruneSettings(data=parse_data_spec(data), calib_batches=calib_batches,
                             calib_batch_size=calib_batch_size, importance=importance, solver=solver,
                             round_to=round_to, min_channels=min_channels, ignore=tuple(ignore or ()), seed=seed)
    loaded = open_model(model, weights=weights, num_classes=num_classes, input_size=parse_input_size(input_size))
    cost_model = None
    if lut is not None or budget.ms is not None:
        from kpc.latency import latency_cost_factory

        cost_model = latency_cost_factory(lut, loaded, force=force_lut, log=log, round_to=round_to,
                                          min_channels=min_channels, runtime=runtime, batch=batch, threads=threads,
                                          precision=precision)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task("calibrating importance", total=calib_batches if importance == "taylor" else 0)
        result = prune(loaded, budget, settings, cost_model=cost_model,
                       progress=lambda: progress.advance(task), log=log)
    plan = base_plan(loaded, "pruned")
    plan["rounds"] = [*plan["rounds"], result.round]
    save_artifact(out, result.model, plan, overwrite=overwrite)
    r = result.round
    whole = sum(1 for g in r["groups"] if not g["prunable"])
    log(f"pruned {loaded.source}: {r['full_cost']:.4g} -> {r['counted_cost']:.4g} {r['cost_unit']} "
        f"(budget {r['limit']:.4g}, predicted {r['predicted_cost']:.4g}); {len(r['groups']) - whole} groups "
        f"pruned, {whole} kept whole; wrote {out}")
