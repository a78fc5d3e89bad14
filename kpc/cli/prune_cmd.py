"""`kpc prune`: knapsack channel pruning of a model under a FLOPs, ratio or latency budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kpc.cli._common import (
    Importance,
    ImportancePrecision,
    InputSizeOpt,
    ModelFileOpt,
    NumClassesOpt,
    Precision,
    PretrainedOpt,
    Runtime,
    Solver,
    WeightsOpt,
    err_console,
    flag,
    handle_errors,
    log,
    output_path,
    value,
)
from kpc.pruning import PruneSettings

DEFAULTS = PruneSettings()


def register(app: typer.Typer) -> None:
    app.command("prune")(prune_command)


@handle_errors
def prune_command(
    model: Annotated[str, typer.Argument(help="torchvision:NAME, timm:NAME, path/file.py:factory or an artifact dir.")],
    out: Annotated[Path, typer.Option("--out", "-o", parser=output_path, help="Artifact directory to write.")],
    budget_gflops: Annotated[float | None, typer.Option("--budget-gflops", help="Budget in GFLOPs (1 FLOP = 1 MAC); "
                                                        "with --lut, the table's fastest plan of those within 1% "
                                                        "of the most importance.")]
    = None,
    budget_ratio: Annotated[float | None, typer.Option("--budget-ratio", help="Budget as a fraction of the "
                                                       "unpruned cost (of its latency with --lut), e.g. 0.5.")] = None,
    budget_ms: Annotated[float | None, typer.Option("--budget-ms", help="Latency budget in ms (needs --lut).")] = None,
    lut: Annotated[Path | None, typer.Option("--lut", help="Latency table from `kpc profile`.")] = None,
    force_lut: Annotated[bool, flag("--force-lut", help="Use a latency table measured on another target.")]
    = False,
    runtime: Annotated[Runtime | None, typer.Option("--runtime", help="The runtime that will serve the model: its "
                                                    "channel block sets the width step (default with --lut: the "
                                                    "table's).")] = None,
    batch: Annotated[int | None, typer.Option("--batch", min=1, help="Target batch for --budget-ms.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="Target threads for --budget-ms.")] = None,
    precision: Annotated[Precision | None, typer.Option("--precision", help="Target precision for --budget-ms.")]
    = None,
    data: Annotated[str, typer.Option("--data", help="Calibration data: synthetic, fashion-mnist[:PATH], "
                                      "cifar10:PATH, imagefolder:PATH.")] = "synthetic",
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    input_size: InputSizeOpt = None,
    pretrained: PretrainedOpt = False,
    model_file: ModelFileOpt = None,
    calib_batches: Annotated[int, typer.Option("--calib-batches", min=1, help="Batches for the importance pass.")]
    = DEFAULTS.calib_batches,
    calib_batch_size: Annotated[int, typer.Option("--calib-batch-size", min=1, help="Images per calibration "
                                                  "batch.")] = DEFAULTS.calib_batch_size,
    importance: Annotated[Importance, typer.Option("--importance", help="Channel score (auto: taylor-signed, "
                                                   "or consumer-l2 with --sensitivity).")]
    = Importance(DEFAULTS.importance),
    solver: Annotated[Solver, typer.Option("--solver", help="exact (DP) or greedy (value/cost ratio).")]
    = Solver(DEFAULTS.solver),
    round_to: Annotated[int | None, typer.Option("--round-to", min=1, help="Kept widths are multiples of this "
                                                 "(default: the table's or --runtime's step, else 8).")]
    = DEFAULTS.round_to,
    min_channels: Annotated[int, typer.Option("--min-channels", min=1, help="No group keeps fewer channels.")]
    = DEFAULTS.min_channels,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="Layer name or glob to leave whole "
                                                     "(repeatable).")] = None,
    bn_recalibrate: Annotated[int | None, typer.Option("--bn-recalibrate", help="Batches of --data that re-estimate "
                                                       "the pruned model's BatchNorm statistics (default: 20 with real "
                                                       "data, 0 with synthetic).")] = DEFAULTS.bn_recalibrate,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**63 - 1,
                                      help="Seed of the calibration sample, and of a model's initial weights where no "
                                           "--weights are given.")]
    = DEFAULTS.seed,
    importance_precision: Annotated[ImportancePrecision, typer.Option(
        "--importance-precision", help="Number format of the importance and sensitivity passes: auto (bf16 "
        "where the CPU or GPU computes it natively, about twice as fast; else fp32), fp32 or bf16.")]
    = ImportancePrecision(DEFAULTS.importance_precision),
    sensitivity: Annotated[str, typer.Option(
        "--sensitivity", help="Widths per group whose effect on the output is measured on the calibration "
        "images to value the knapsack (0: summed importance). Keeps more accuracy straight after the prune, "
        "at two passes over the images per width measured; needs --data. auto: 5 where that is estimated to "
        "take at most a minute here, else 0.")]
    = str(DEFAULTS.sensitivity),
    overwrite: Annotated[bool, flag("--overwrite", help="Replace an existing --out directory.")] = False,
) -> None:
    """Score channels, solve the knapsack under the budget, remove channels physically, save the artifact.

    Exit 1 (after writing the artifact) when the pruned model misses its budget window.
    """
    from kpc.artifact import open_model
    from kpc.atomic import check_dir_target
    from kpc.data import parse_data_spec
    from kpc.specs import parse_input_size
    from kpc.workflow import landing_failure, make_budget, prune_to_artifact

    check_dir_target(out, overwrite=overwrite)
    budget = make_budget(gflops=budget_gflops, ratio=budget_ratio, ms=budget_ms, lut=lut, force_lut=force_lut,
                         target={"runtime": value(runtime), "batch": batch, "threads": threads,
                                 "precision": value(precision)})
    settings = PruneSettings(importance=value(importance), calib_batches=calib_batches,
                             calib_batch_size=calib_batch_size, solver=value(solver), round_to=round_to,
                             min_channels=min_channels, ignore=tuple(ignore or ()), seed=seed,
                             bn_recalibrate=bn_recalibrate, importance_precision=value(importance_precision),
                             sensitivity=int(sensitivity) if sensitivity.strip().isdigit() else sensitivity.strip())
    settings.check()
    spec = parse_data_spec(data)
    import torch

    torch.manual_seed(seed)  # a model without --weights starts from weights that depend on --seed only, as in train
    loaded = open_model(model, weights=weights, num_classes=num_classes, input_size=parse_input_size(input_size),
                        pretrained=pretrained, model_file=model_file)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        gradients = settings.may_need_gradients()
        task = progress.add_task("calibrating importance", total=calib_batches if gradients else 0)
        result = prune_to_artifact(loaded, budget, settings, spec, out, overwrite=overwrite,
                                   progress=lambda: progress.advance(task))
    r = result.round
    whole = sum(1 for g in r.groups if not g.prunable)
    kept = sum(1 for g in r.groups if g.prunable and not g.pruned)
    log(f"pruned {loaded.source}: {r.full_cost:.4g} -> {r.counted_cost:.4g} {r.cost_unit} (budget {r.limit:.4g}, "
        f"predicted {r.predicted_cost:.4g}); {len(r.groups) - whole - kept} groups pruned, {kept} kept every channel, "
        f"{whole} left whole; wrote {out}")
    failure = landing_failure(result, out)
    if failure is not None:
        raise failure
