"""`kpc inspect DIR`: what an artifact is and, for a pruned one, what every group kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kpc.cli._common import ModelFileOpt, flag, handle_errors, out_console
from kpc.stopwatch import steps_summary


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)


def summarize(path: Path, model_file: str | None = None) -> dict[str, Any]:
    """Per-group widths, MACs and params of an artifact, from the rebuilt model (not from the plan's word)."""
    from kpc.artifact import load_artifact
    from kpc.costs import count_macs

    loaded = load_artifact(path, model_file=model_file)
    example = loaded.example_input()
    macs, params = count_macs(loaded.model, example)
    assert loaded.factory is not None
    base_macs, base_params = count_macs(loaded.factory(), example)
    plan = loaded.plan
    groups: list[dict[str, Any]] = []
    for number, plan_round in enumerate(plan.rounds, 1):
        for group in plan_round.groups:
            groups.append({"round": number, "root": group.root, "layers": len(group.layers), "width": group.width,
                           "kept_width": group.kept_width, "status": _status(group, plan_round.groups)})
    module_macs = _per_module_macs(loaded.model, example)
    for group in groups:
        group["root_macs_after"] = module_macs.get(group["root"])
        group["root_params_after"] = sum(p.numel() for p in loaded.model.get_submodule(group["root"]).parameters())
    rounds = [{"budget": r.budget, "cost_unit": r.cost_unit, "full_cost": r.full_cost,
               "predicted_cost": r.predicted_cost, "counted_cost": r.counted_cost, "landed": r.landed,
               "importance": r.importance, "solver": r.solver, "seconds": r.seconds} for r in plan.rounds]
    return {
        "artifact": str(path), "kind": plan.kind, "model": loaded.label, "input_size": list(loaded.input_size),
        "rounds": rounds, "groups": groups, "metrics": plan.metrics,
        "totals": {"macs": macs, "params": params, "base_macs": base_macs, "base_params": base_params},
    }


def _status(group: Any, round_groups: list[Any]) -> str:
    if not group.prunable:
        return f"left whole: {group.reason}"
    if group.heads:
        kept = group.kept_width * group.heads // group.width
        return f"pruned: {kept} of {group.heads} heads" if group.pruned else f"kept all {group.heads} heads"
    if group.norm_groups:
        kept = group.kept_width * group.norm_groups // group.width
        return f"pruned: {kept} of {group.norm_groups} GroupNorm groups" if group.pruned else \
            f"kept all {group.norm_groups} GroupNorm groups"
    if not group.conv_groups:
        return "pruned" if group.pruned else "kept every channel"
    kept = group.kept_width * group.conv_groups // group.width
    leader = group.tied_to
    tie = f", tied to {round_groups[leader].root}" if isinstance(leader, int) and leader < len(round_groups) else ""
    return f"pruned: {kept} of {group.conv_groups} conv groups{tie}" if group.pruned else \
        f"kept all {group.conv_groups} conv groups{tie}"


def _per_module_macs(model: Any, example: Any) -> dict[str, float]:
    from kpc.costs import macs_by_module

    _, flops, _products = macs_by_module(model, example)
    names = {module: name for name, module in model.named_modules()}
    return {names[m]: float(v) for m, v in flops.items() if v is not None and m in names}


@handle_errors
def inspect_command(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory written by kpc prune/train/distill.")],
    as_json: Annotated[bool, flag("--json", help="Print JSON instead of a table.")] = False,
    model_file: ModelFileOpt = None,
) -> None:
    """Show every group's width before -> after, its root layer's MACs and params after pruning, and totals."""
    summary = summarize(artifact, model_file)
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    t = summary["totals"]
    size = "x".join(map(str, summary["input_size"]))
    if not summary["groups"]:
        metrics = summary.get("metrics") or {}
        accuracy = f"; val accuracy {metrics['last_val_acc']:.4f}" if metrics.get("last_val_acc") is not None else ""
        out_console.print(f"{summary['model']} ({summary['kind']}) at {size}: not pruned (no pruning rounds); "
                          f"{t['macs'] / 1e6:.2f} MMACs, {t['params']:,.0f} params{accuracy}")
        return
    table = Table(title=f"{summary['model']} ({summary['kind']}) at {size}")
    for column in ("round", "group (root layer)", "layers", "width before -> after", "root MMACs after",
                   "root params after", "status"):
        table.add_column(column, justify="right" if column not in ("group (root layer)", "status") else "left")
    for g in summary["groups"]:
        width = f"{g['width']} -> {g['kept_width']}" if g["kept_width"] != g["width"] else f"{g['width']} (all)"
        macs = f"{g['root_macs_after'] / 1e6:.2f}" if g["root_macs_after"] is not None else "-"
        table.add_row(str(g["round"]), g["root"], str(g["layers"]), width, macs, f"{g['root_params_after']:,}",
                      g["status"])
    table.add_section()
    table.add_row("", "total (before -> after)", "", "", f"{t['base_macs'] / 1e6:.2f} -> {t['macs'] / 1e6:.2f}",
                  f"{t['base_params']:,.0f} -> {t['params']:,.0f}",
                  f"{t['macs'] / t['base_macs']:.1%} of the MACs")
    out_console.print(table)
    for number, plan_round in enumerate(summary["rounds"], 1):
        steps = plan_round.get("seconds") or {}
        if steps:  # where a long prune's time went (rounds written before kpc recorded it have none)
            out_console.print(f"round {number} took {steps_summary(steps)}")
