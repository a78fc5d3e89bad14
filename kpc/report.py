"""The run report: what was asked, what was predicted, what was measured, and whether it passed.

`report.json` carries the figures (budget, predicted and measured latency, the
measured speedup with its interval, accuracy of teacher and child, per-group widths);
`report.md` shows them with three plots: widths per group before/after, latency
predicted vs measured, and accuracy vs latency of every run beside this one (a
Pareto view). `kpc report DIR` renders both again from the run's records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kpc.atomic import atomic_file, write_text_atomic
from kpc.errors import KpcError

SCHEMA = "kpc-report/1"


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def build_report(pipeline, actions: dict[str, str]) -> dict[str, Any]:
    """Collect the figures from the stage outputs of a finished run."""
    from kpc.artifact import read_plan

    r = pipeline.recipe
    child_plan = read_plan(pipeline.child_path())
    prune_round = child_plan.rounds[-1].to_json()
    verify = pipeline.stage_dir("verify")
    bench = _load(verify / "bench.json") or {}
    accuracy = _load(verify / "accuracy.json") or {}
    lut_path = pipeline.lut_path()
    calibration = []
    if lut_path is not None and lut_path.is_file():
        calibration = json.loads(lut_path.read_text()).get("remainder", {}).get("calibration", [])
    speedup = bench.get("speedup", {})
    latency = {
        "unit": prune_round.get("cost_unit"),
        "budget": prune_round.get("limit"),
        "unpruned_cost": prune_round.get("full_cost"),
        "predicted": prune_round.get("predicted_cost"),
        "measured_at_prune": prune_round.get("counted_cost"),
        "rounds": prune_round.get("attempts", []),
        "table_calibration": calibration,
        "bench_baseline_ms": bench.get("baseline", {}).get("latency", {}).get("median_ms"),
        "bench_candidate_ms": bench.get("candidate", {}).get("latency", {}).get("median_ms"),
    }
    top1 = {name: figures.get("top1") for name, figures in accuracy.items()}
    failures = []
    v = r["verify"]
    if v["min_speedup"] is not None and speedup and speedup.get("ci_low", 0) < v["min_speedup"]:
        failures.append(f"speedup {speedup['ratio']:.2f}x (95% CI {speedup['ci_low']:.2f}-{speedup['ci_high']:.2f}) "
                        f"is below the required {v['min_speedup']:.2f}x")
    drop = None
    if "teacher" in top1 and "final" in top1:
        drop = top1["teacher"] - top1["final"]
        if v["max_accuracy_drop"] is not None and drop > v["max_accuracy_drop"]:
            failures.append(f"accuracy dropped {drop:.2f} points (teacher {top1['teacher']:.2f}%, child "
                            f"{top1['final']:.2f}%), more than the allowed {v['max_accuracy_drop']:.2f}")
    gated = v["min_speedup"] is not None or v["max_accuracy_drop"] is not None
    return {
        "schema": SCHEMA,
        "run": str(pipeline.out),
        "recipe": str(r.path) if r.path else None,
        "model": r["model"],
        "data": r["data"],
        "target": r["target"],
        "budget": {"asked": {k: val for k, val in r["budget"].items() if val is not None},
                   "resolved": prune_round.get("budget", {}).get("asked")},
        "latency": latency,
        "speedup": {**speedup, "runtime": bench.get("runtime"), "device": bench.get("device"),
                    "threads": bench.get("threads"), "batch": bench.get("batch")} if speedup else None,
        "accuracy": {**top1, "drop": drop},
        "groups": [{"root": g["root"], "width": g["width"], "kept_width": g["kept_width"], "prunable": g["prunable"]}
                   for g in prune_round["groups"]],
        "gate": {"min_speedup": v["min_speedup"], "max_accuracy_drop": v["max_accuracy_drop"],
                 "passed": (not failures) if gated else None, "failures": failures},
        "stages": actions,
    }


def write_report(run: Path, report: dict[str, Any]) -> None:
    plots = render_plots(run, report)
    report = {**report, "plots": plots}
    write_text_atomic(run / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    write_text_atomic(run / "report.md", render_markdown(report))


def rerender(run: Path) -> Path:
    report = _load(Path(run) / "report.json")
    if report is None or report.get("schema") != SCHEMA:
        raise KpcError(f"{run} has no {SCHEMA} report.json: run kpc run RECIPE --out {run} first")
    write_report(Path(run), report)
    return Path(run) / "report.md"


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(report: dict[str, Any]) -> str:
    lat, acc, gate = report["latency"], report["accuracy"], report["gate"]
    verdict = {True: "PASSED", False: "FAILED", None: "no gate set"}[gate["passed"]]
    lines = [f"# kpc run: {report['model']} on {report['target']['runtime']}", "",
             f"Verification: **{verdict}**" + ("".join(f"\n- {f}" for f in gate["failures"])), "",
             "| figure | value |", "|---|---|",
             f"| budget asked | {', '.join(f'{k} {v:g}' for k, v in report['budget']['asked'].items())} "
             f"({report['budget']['resolved']}) |",
             f"| unpruned cost | {_fmt(lat['unpruned_cost'])} {lat['unit']} |",
             f"| predicted cost | {_fmt(lat['predicted'])} {lat['unit']} |",
             f"| measured at prune | {_fmt(lat['measured_at_prune'])} {lat['unit']} |"]
    speedup = report.get("speedup")
    if speedup:
        lines += [f"| bench: baseline / child median | {_fmt(lat['bench_baseline_ms'])} / "
                  f"{_fmt(lat['bench_candidate_ms'])} ms |",
                  f"| measured speedup | {speedup['ratio']:.2f}x (95% CI {speedup['ci_low']:.2f}-"
                  f"{speedup['ci_high']:.2f}) on {speedup['runtime']}, {speedup['device']}, batch "
                  f"{speedup['batch']}, {speedup['threads']} threads |"]
    lines += [f"| top-1: teacher / pruned / final | {_fmt(acc.get('teacher'), '.2f')} / "
              f"{_fmt(acc.get('pruned'), '.2f')} / {_fmt(acc.get('final'), '.2f')} % |",
              f"| accuracy drop | {_fmt(acc.get('drop'), '.2f')} points |", "",
              "Stages: " + ", ".join(f"{k} ({v})" for k, v in report["stages"].items()), ""]
    for plot in report.get("plots", []):
        lines += [f"![{plot}]({plot})", ""]
    lines += ["## Widths per group", "", "| group | width | kept |", "|---|---|---|"]
    lines += [f"| {g['root']} | {g['width']} | {g['kept_width'] if g['prunable'] else 'whole'} |"
              for g in report["groups"]]
    return "\n".join(lines) + "\n"


def _sibling_runs(run: Path) -> list[dict[str, Any]]:
    runs = []
    for candidate in sorted(run.resolve().parent.glob("*/report.json")):
        data = _load(candidate)
        if isinstance(data, dict) and data.get("schema") == SCHEMA and Path(data["run"]).resolve() != run.resolve():
            runs.append(data)
    return runs


def render_plots(run: Path, report: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(figure, name: str) -> None:
        figure.tight_layout()
        with atomic_file(run / name, "wb") as handle:
            figure.savefig(handle, format="png", dpi=80)
        plt.close(figure)
        written.append(name)

    groups = report["groups"]
    figure, axis = plt.subplots(figsize=(max(6, 0.18 * len(groups)), 3.5))
    xs = range(len(groups))
    axis.bar(xs, [g["width"] for g in groups], color="#cccccc", label="before")
    axis.bar(xs, [g["kept_width"] for g in groups], color="#1f77b4", label="after")
    axis.set_xticks(list(xs), [g["root"] for g in groups], rotation=90, fontsize=5)
    axis.set_ylabel("channels")
    axis.set_title("Width per group, before and after pruning")
    axis.legend()
    save(figure, "widths.png")

    lat = report["latency"]
    points = [(a["predicted"], a["counted"], f"round {i + 1}") for i, a in enumerate(lat["rounds"]) if "counted" in a]
    points += [(c["predicted_ms"], c["measured_ms"], c["variant"]) for c in lat.get("table_calibration", [])]
    figure, axis = plt.subplots(figsize=(4.5, 4))
    if points:
        predicted, measured, _labels = zip(*points, strict=True)
        axis.scatter(predicted, measured)
        for x, y, label in points:
            axis.annotate(label, (x, y), fontsize=6)
        low, high = min(predicted + measured) * 0.9, max(predicted + measured) * 1.1
        axis.plot([low, high], [low, high], "k--", lw=0.8, label="predicted = measured")
        axis.legend(fontsize=7)
    if lat.get("budget") is not None:
        axis.axhline(lat["budget"], color="red", lw=0.8)
    axis.set_xlabel(f"predicted ({lat['unit']})")
    axis.set_ylabel(f"measured ({lat['unit']})")
    axis.set_title("Cost model: predicted vs measured")
    save(figure, "latency.png")

    figure, axis = plt.subplots(figsize=(4.5, 4))
    runs = [report, *_sibling_runs(run)]
    for index, data in enumerate(runs):
        acc, dl = data.get("accuracy", {}), data.get("latency", {})
        pairs = [(dl.get("bench_baseline_ms"), acc.get("teacher"), "teacher"),
                 (dl.get("bench_candidate_ms"), acc.get("final"), Path(data["run"]).name)]
        pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
        if pairs:
            axis.scatter([p[0] for p in pairs], [p[1] for p in pairs], marker="o" if index == 0 else "x")
            for x, y, label in pairs:
                axis.annotate(label, (x, y), fontsize=6)
    axis.set_xlabel("measured latency (ms)")
    axis.set_ylabel("top-1 (%)")
    axis.set_title("Accuracy vs latency (this run and its siblings)")
    save(figure, "pareto.png")
    return written
