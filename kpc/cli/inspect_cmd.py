"""`kpc inspect DIR`: what a pruned artifact kept, group by group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kpc.cli._common import handle_errors, out_console


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)


def summarize(path: Path) -> dict[str, Any]:
    """Per-group widths, MACs and params of an artifact, from the rebuilt model (not from the plan's word)."""
    import torch

    from kpc.artifact import load_artifact
    from kpc.costs import count_macs
    from kpc.specs import build_model

    loaded = load_artifact(path)
    example = loaded.example_input()
    macs, params = count_macs(loaded.model, example)
    base_macs, base_params = count_macs(build_model(loaded.spec), example)
    plan = loaded.plan or {}
    groups: list[dict[str, Any]] = []
    for number, plan_round in enumerate(plan.get("rounds", []), 1):
        round_groups = plan_round.get("groups", [])
        for group in round_groups:
            groups.append({"round": number, "root": group["root"], "layers": len(group.get("layers", [])),
                           "width": group["width"], "kept_width": group["kept_width"],
                           "status": _status(group, round_groups)})
    module_macs = _per_module_macs(loaded.model, example)
    for group in groups:
        group["root_macs"] = module_macs.get(group["root"])
        group["root_params"] = sum(p.numel() for p in loaded.model.get_submodule(group["root"]).parameters())
    rounds = [{k: r.get(k) for k in ("budget", "cost_unit", "full_cost", "predicted_cost", "counted_cost",
                                      "importance", "solver")} for r in plan.get("rounds", [])]
    del torch
    return {
        "artifact": str(path), "kind": plan.get("kind"), "model": loaded.spec.label(),
        "input_size": list(loaded.spec.input_size), "rounds": rounds, "groups": groups,
        "totals": {"macs": macs, "params": params, "base_macs": base_macs, "base_params": base_params},
    }


def _status(group: dict[str, Any], round_groups: list[dict[str, Any]]) -> str:
    if not group["prunable"]:
        return f"whole: {group.get('reason')}"
    blocks = group.get("conv_groups")
    if not blocks:
        return "pruned"
    kept = group["kept_width"] * blocks // group["width"]
    leader = group.get("tied_to")
    tie = f", tied to {round_groups[leader]['root']}" if isinstance(leader, int) and leader < len(round_groups) else ""
    return f"pruned: {kept} of {blocks} conv groups{tie}"


def _per_module_macs(model, example) -> dict[str, float]:
    import torch_pruning as tp

    _, _, flops, _ = tp.utils.count_ops_and_params(model, example, layer_wise=True)
    names = {module: name for name, module in model.named_modules()}
    return {names[m]: float(v) for m, v in flops.items() if v is not None and m in names}


@handle_errors
def inspect_command(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory written by kpc prune/train/distill.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show every group's width before -> after, the MACs and params of its root layer, and totals."""
    summary = summarize(artifact)
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    table = Table(title=f"{summary['model']} ({summary['kind']}) at {'x'.join(map(str, summary['input_size']))}")
    for column in ("round", "group (root layer)", "layers", "width", "root MMACs", "root params", "status"):
        table.add_column(column, justify="right" if column not in ("group (root layer)", "status") else "left")
    for g in summary["groups"]:
        width = f"{g['width']} -> {g['kept_width']}" if g["kept_width"] != g["width"] else str(g["width"])
        macs = f"{g['root_macs'] / 1e6:.2f}" if g["root_macs"] is not None else "-"
        table.add_row(str(g["round"]), g["root"], str(g["layers"]), width, macs, f"{g['root_params']:,}",
                      g["status"])
    t = summary["totals"]
    table.add_section()
    table.add_row("", "total", "", "", f"{t['base_macs'] / 1e6:.2f} -> {t['macs'] / 1e6:.2f}",
                  f"{t['base_params']:,.0f} -> {t['params']:,.0f}",
                  f"{t['macs'] / t['base_macs']:.1%} of the MACs")
    out_console.print(table)
