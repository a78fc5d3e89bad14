"""`kpc run RECIPE`, `kpc demo` and `kpc report DIR`: the whole path from model to verified deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kpc.cli._common import flag, handle_errors, log, out_console, output_path


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
    app.command("demo")(demo_command)
    app.command("report")(report_command)


def _execute(recipe_path: Path, out: Path, start_from: str | None, dry_run: bool) -> None:
    from kpc.errors import VerificationFailed
    from kpc.pipeline import Pipeline
    from kpc.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    from kpc.cli.progress import RichStageUI

    pipeline = Pipeline(recipe, out, ui=RichStageUI())
    statuses = pipeline.status(start_from)
    if dry_run:
        table = Table(title=f"kpc run {recipe_path} -> {out}")
        for column in ("stage", "action", "why"):
            table.add_column(column)
        for status in statuses:
            table.add_row(status.name, status.action, status.reason)
        out_console.print(table)
        return
    try:
        report = pipeline.run(start_from)
    except VerificationFailed:
        _summary(out)
        raise
    _summary(out)
    del report


def _summary(out: Path) -> None:
    import json

    path = out / "report.json"
    if not path.is_file():
        return
    report = json.loads(path.read_text())
    lat, acc, speedup, gate = report["latency"], report["accuracy"], report.get("speedup"), report["gate"]
    table = Table(title=f"kpc: {report['model']} on {report['target']['runtime']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("budget", str(report["budget"]["resolved"]))
    table.add_row("predicted / measured at prune", f"{lat['predicted']:.3f} / {lat['measured_at_prune']:.3f} "
                  f"{lat['unit']}")
    if speedup:
        table.add_row("measured speedup (95% CI)", f"{speedup['ratio']:.2f}x ({speedup['ci_low']:.2f}-"
                      f"{speedup['ci_high']:.2f})")
    for name in ("teacher", "pruned", "final"):
        if acc.get(name) is not None:
            table.add_row(f"top-1 {name}", f"{acc[name]:.2f}%")
    verdict = {True: "PASSED", False: "FAILED", None: "no gate"}[gate["passed"]]
    wall = report.get("wall_seconds") or {}
    if wall.get("this_run") is not None:
        minutes, seconds = divmod(round(wall["this_run"]), 60)
        table.add_row("wall time of this run", f"{minutes} min {seconds:02d} s")
    table.add_row("verification", verdict)
    out_console.print(table)
    out_console.print(f"report: {out / 'report.md'}")


@handle_errors
def run_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see README: recipe format).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", parser=output_path,
                                             help="Run directory (default: the recipe's name).")]
    = None,
    start_from: Annotated[str | None, typer.Option("--from", help="Redo this stage and every stage after it: "
                                                   "train, profile, prune, distill, export, verify.")] = None,
    dry_run: Annotated[bool, flag("--dry-run", help="Print what would run and why, and stop.")] = False,
) -> None:
    """Run a recipe: train? -> profile -> prune -> distill -> export -> verify, skipping stages that are done."""
    _execute(recipe, out or Path(recipe.stem), start_from, dry_run)


@handle_errors
def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", parser=output_path, help="Run directory.")] = Path("kpc-demo"),
    data: Annotated[str | None, typer.Option("--data", help="Fashion-MNIST directory (default: the Debian "
                                             "package's).")] = None,
    dry_run: Annotated[bool, flag("--dry-run", help="Print what would run and why, and stop.")] = False,
) -> None:
    """The embedded default: train, profile, prune to half the latency, distill, export and verify on Fashion-MNIST."""
    import yaml

    from kpc.data import parse_data_spec
    from kpc.recipe import demo_recipe_path

    spec = f"fashion-mnist:{data}" if data else "fashion-mnist"
    parse_data_spec(spec)  # a missing dataset fails here, with the install command
    recipe_path = demo_recipe_path()
    if data:
        values = yaml.safe_load(recipe_path.read_text())
        values["data"] = spec
        from kpc.atomic import write_text_atomic

        out.mkdir(parents=True, exist_ok=True)
        recipe_path = write_text_atomic(out / "demo.yaml", yaml.safe_dump(values, sort_keys=False))
    log(f"kpc demo: recipe {recipe_path}, writing {out}/")
    _execute(recipe_path, out, None, dry_run)


@handle_errors
def report_command(
    run: Annotated[Path, typer.Argument(help="A run directory written by kpc run or kpc demo.")],
) -> None:
    """Render report.md and its plots again from the run's report.json."""
    from kpc.report import rerender

    log(f"wrote {rerender(run)}")
    _summary(run)
