"""The run report: what was asked, what was predicted, what was measured, and whether it passed.

`report.json` carries the figures (budget, predicted and measured latency, the measured
speedup with its interval, accuracy of teacher, pruned and final child, per-group widths,
wall time per stage); `report.md` shows them with three plots sized to read in a Markdown
viewer: widths per group before and after, the cost model's predictions against the
timings (calibration variants, closed-loop rounds and the kept plan apart, the budget in
the legend), and accuracy against latency of every run in the parent directory (teacher,
pruned and distilled points, on axes that start where the data does). `kpc report DIR`
renders both again from the run's records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kpc.atomic import atomic_file, write_text_atomic
from kpc.errors import KpcError

SCHEMA = "kpc-report/1"
DPI = 120


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _stage_times(pipeline: Any) -> dict[str, float]:
    """Seconds each stage of the run took when it last ran (from its stage.json)."""
    from kpc.pipeline import RECORD, STAGES

    times = {}
    for stage in STAGES:
        record = _load(pipeline.stage_dir(stage) / RECORD)
        if isinstance(record, dict) and isinstance(record.get("seconds"), (int, float)):
            times[stage] = float(record["seconds"])
    return times


def build_report(pipeline: Any, actions: dict[str, str], run_seconds: float | None = None) -> dict[str, Any]:
    """Collect the figures from the stage outputs of a finished run."""
    from kpc.artifact import read_plan
    from kpc.benchmark import contention_note

    r = pipeline.recipe
    prune_round = read_plan(pipeline.child_path()).rounds[-1]
    verify = pipeline.stage_dir("verify")
    bench = _load(verify / "bench.json") or {}
    accuracy = _load(verify / "accuracy.json") or {}
    lut_path = pipeline.lut_path()
    calibration = []
    if lut_path is not None and lut_path.is_file():
        calibration = (_load(lut_path) or {}).get("remainder", {}).get("calibration", [])
    speedup = bench.get("speedup", {})
    samples = list(prune_round.counted_samples)
    latency = {
        "unit": prune_round.cost_unit,
        "budget": prune_round.limit,
        "unpruned_cost": prune_round.full_cost,
        "predicted": prune_round.predicted_cost,
        "measured_at_prune": prune_round.counted_cost,  # median over every session of every timing of the kept plan
        "measured_at_prune_samples": samples,
        "landed": prune_round.landed,
        "rounds": [a.to_json() for a in prune_round.attempts],
        "table_calibration": calibration,
        "bench_baseline_ms": bench.get("baseline", {}).get("latency", {}).get("median_ms"),
        "bench_candidate_ms": bench.get("candidate", {}).get("latency", {}).get("median_ms"),
    }
    if latency["bench_baseline_ms"] and latency["bench_candidate_ms"]:
        latency["bench_ratio"] = latency["bench_candidate_ms"] / latency["bench_baseline_ms"]
    if prune_round.cost_unit == "ms" and prune_round.full_cost:
        latency["prune_ratio"] = prune_round.counted_cost / prune_round.full_cost
    top1 = {name: figures.get("top1") for name, figures in accuracy.items()}
    failures = []
    v = r["verify"]
    if v["min_speedup"] is not None and speedup and speedup.get("ci_low", 0) < v["min_speedup"]:
        note = contention_note(bench)
        failures.append(f"speedup {speedup['ratio']:.2f}x (95% CI {speedup['ci_low']:.2f}-{speedup['ci_high']:.2f}) "
                        f"is below the required {v['min_speedup']:.2f}x" + (f" ({note})" if note else ""))
    drop = None
    if "teacher" in top1 and "final" in top1:
        drop = top1["teacher"] - top1["final"]
        if v["max_accuracy_drop"] is not None and drop > v["max_accuracy_drop"]:
            failures.append(f"accuracy dropped {drop:.2f} points (teacher {top1['teacher']:.2f}%, child "
                            f"{top1['final']:.2f}%), more than the allowed {v['max_accuracy_drop']:.2f}")
    if prune_round.landed is False:
        failures.append(f"the prune missed its budget: {prune_round.counted_cost:.4g} {prune_round.cost_unit} "
                        f"against {prune_round.limit:.4g} ({100 * prune_round.miss:+.1f}%)")
    gated = v["min_speedup"] is not None or v["max_accuracy_drop"] is not None or prune_round.landed is False
    stage_seconds = _stage_times(pipeline)
    return {
        "schema": SCHEMA,
        "run": str(pipeline.out),
        "recipe": str(r.path) if r.path else None,
        "model": r["model"],
        "data": r["data"],
        "target": r["target"],
        "budget": {"asked": {k: val for k, val in r["budget"].items() if val is not None},
                   "resolved": prune_round.budget.get("asked")},
        "latency": latency,
        "speedup": {**speedup, "runtime": bench.get("runtime"), "device": bench.get("device"),
                    "threads": bench.get("threads"), "batch": bench.get("batch")} if speedup else None,
        "accuracy": {**top1, "drop": drop},
        "groups": [{"root": g.root, "width": g.width, "kept_width": g.kept_width, "prunable": g.prunable}
                   for g in prune_round.groups],
        "gate": {"min_speedup": v["min_speedup"], "max_accuracy_drop": v["max_accuracy_drop"],
                 "passed": (not failures) if gated else None, "failures": failures},
        "stages": actions,
        "stage_seconds": stage_seconds,
        "wall_seconds": {"this_run": round(run_seconds, 1) if run_seconds is not None else None,
                         "all_stages": round(sum(stage_seconds.values()), 1)},
    }


def write_report(run: Path, report: dict[str, Any]) -> None:
    plots = render_plots(run, report)
    report = {**report, "plots": plots}
    write_text_atomic(run / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    write_text_atomic(run / "report.md", render_markdown(report))


def rerender(run: Path) -> Path:
    report = _load(Path(run) / "report.json")
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise KpcError(f"{run} has no {SCHEMA} report.json: run kpc run RECIPE --out {run} first")
    write_report(Path(run), report)
    return Path(run) / "report.md"


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"


def render_markdown(report: dict[str, Any]) -> str:
    lat, acc, gate = report["latency"], report["accuracy"], report["gate"]
    verdict = {True: "PASSED", False: "FAILED", None: "no gate set"}[gate["passed"]]
    samples = lat.get("measured_at_prune_samples") or []
    spread = (f" (median of {len(samples)} figures, one per runtime session of each timing, "
              f"{min(samples):.3f}-{max(samples):.3f})" if len(samples) > 1 else "")
    lines = [f"# kpc run: {report['model']} on {report['target']['runtime']}", "",
             f"Verification: **{verdict}**" + ("".join(f"\n- {f}" for f in gate["failures"])), "",
             "| figure | value |", "|---|---|",
             f"| budget asked | {', '.join(f'{k} {v:g}' for k, v in report['budget']['asked'].items())} "
             f"({report['budget']['resolved']}) |",
             f"| unpruned cost | {_fmt(lat['unpruned_cost'])} {lat['unit']} |",
             f"| predicted cost | {_fmt(lat['predicted'])} {lat['unit']} |",
             f"| measured at prune | {_fmt(lat['measured_at_prune'])} {lat['unit']}{spread} |"]
    if lat.get("prune_ratio") is not None:
        lines.append(f"| child / parent at prune | {lat['prune_ratio']:.1%} |")
    speedup = report.get("speedup")
    if speedup:
        lines += [f"| bench: baseline / child median | {_fmt(lat['bench_baseline_ms'])} / "
                  f"{_fmt(lat['bench_candidate_ms'])} ms ({_fmt(lat.get('bench_ratio'), '.1%')} of the baseline) |",
                  f"| measured speedup | {speedup['ratio']:.2f}x (95% CI {speedup['ci_low']:.2f}-"
                  f"{speedup['ci_high']:.2f}) on {speedup['runtime']}, {speedup['device']}, batch "
                  f"{speedup['batch']}, {speedup['threads']} threads |"]
    lines += [f"| top-1: teacher / pruned / final | {_fmt(acc.get('teacher'), '.2f')} / "
              f"{_fmt(acc.get('pruned'), '.2f')} / {_fmt(acc.get('final'), '.2f')} % |",
              f"| accuracy drop | {_fmt(acc.get('drop'), '.2f')} points |"]
    wall = report.get("wall_seconds") or {}
    if wall:
        lines.append(f"| wall time: this run / all stages | {_duration(wall.get('this_run'))} / "
                     f"{_duration(wall.get('all_stages'))} |")
    lines.append("")
    stage_seconds = report.get("stage_seconds") or {}
    lines += ["| stage | this run | wall time (when it last ran) |", "|---|---|---|"]
    lines += [f"| {stage} | {action} | {_duration(stage_seconds.get(stage))} |"
              for stage, action in report["stages"].items() if action != "absent"]
    lines.append("")
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

    def save(figure: Any, name: str) -> None:
        figure.tight_layout()
        try:
            with atomic_file(run / name, "wb") as handle:
                figure.savefig(handle, format="png", dpi=DPI)
        finally:
            plt.close(figure)
        written.append(name)

    save(_widths_figure(plt, report), "widths.png")
    save(_latency_figure(plt, report), "latency.png")
    save(_pareto_figure(plt, run, report), "pareto.png")
    return written


def _widths_figure(plt: Any, report: dict[str, Any]) -> Any:
    """One horizontal bar per group: readable names whatever the number of groups."""
    groups = report["groups"]
    height = max(3.0, 0.22 * len(groups) + 1.2)
    figure, axis = plt.subplots(figsize=(8, height))
    ys = list(range(len(groups)))[::-1]
    axis.barh(ys, [g["width"] for g in groups], color="#d0d0d0", label="before")
    axis.barh(ys, [g["kept_width"] for g in groups], color="#1f77b4", label="after")
    for y, g in zip(ys, groups, strict=True):
        if not g["prunable"]:
            axis.text(g["width"], y, "  whole", va="center", fontsize=8, color="#555555")
    axis.set_yticks(ys, [g["root"] for g in groups], fontsize=8)
    axis.set_xlabel("channels")
    axis.set_title("Width per group, before and after pruning", loc="left")
    # above the bars, not on them: the widest groups reach the right edge wherever they sit
    axis.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=9, frameon=False)
    return figure


def _latency_figure(plt: Any, report: dict[str, Any]) -> Any:
    """Predicted against measured: table calibration, closed-loop rounds and the kept plan, each its own marker."""
    lat = report["latency"]
    unit = lat["unit"]
    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    calibration = [(c["predicted_ms"], c["measured_ms"]) for c in lat.get("table_calibration", [])]
    rounds = [(a["predicted"], a["counted"]) for a in lat["rounds"] if a.get("counted") is not None
              and a.get("repeat_of") is None]
    everything = [v for pair in calibration + rounds for v in pair]
    if calibration:
        axis.scatter(*zip(*calibration, strict=True), marker="o", s=30, color="#9e9e9e",
                     label=f"table calibration ({len(calibration)} widths)")
    if rounds:
        axis.scatter(*zip(*rounds, strict=True), marker="s", s=40, color="#1f77b4",
                     label=f"closed-loop rounds ({len(rounds)})")
        for number, (x, y) in enumerate(rounds, 1):
            axis.annotate(str(number), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if lat.get("predicted") is not None and lat.get("measured_at_prune") is not None:
        kept = (lat["predicted"], lat["measured_at_prune"])
        axis.scatter([kept[0]], [kept[1]], marker="*", s=220, color="#d62728", zorder=5, label="kept plan (median)")
        everything += list(kept)
    if lat.get("budget") is not None:
        axis.axhline(lat["budget"], color="#d62728", lw=1, ls=":", label=f"budget {lat['budget']:.3g} {unit}")
        everything.append(lat["budget"])
    if everything:
        low, high = min(everything) * 0.95, max(everything) * 1.05
        axis.plot([low, high], [low, high], "k--", lw=0.8, label="predicted = measured")
        axis.set_xlim(low, high)
        axis.set_ylim(low, high)
    axis.set_xlabel(f"predicted ({unit})")
    axis.set_ylabel(f"measured ({unit})")
    axis.set_title("Cost model: predicted against measured")
    axis.legend(fontsize=8, loc="upper left")
    return figure


def _pareto_figure(plt: Any, run: Path, report: dict[str, Any]) -> Any:
    """Accuracy against latency for this run and every run beside it: teacher, pruned (before distillation), final."""
    figure, axis = plt.subplots(figsize=(7, 5))
    styles = {"teacher": ("o", "#2ca02c"), "pruned": ("v", "#ff7f0e"), "final": ("*", "#1f77b4")}
    plotted: set[str] = set()
    xs, ys = [], []
    for data in [report, *_sibling_runs(run)]:
        acc, lat = data.get("accuracy", {}), data.get("latency", {})
        name = Path(data["run"]).name
        baseline, child = lat.get("bench_baseline_ms"), lat.get("bench_candidate_ms")
        points = {"teacher": (baseline, acc.get("teacher")), "pruned": (child, acc.get("pruned")),
                  "final": (child, acc.get("final"))}
        for kind, (x, y) in points.items():
            if x is None or y is None:
                continue
            marker, color = styles[kind]
            label = {"teacher": "teacher", "pruned": "pruned, before distillation", "final": "distilled child"}[kind]
            axis.scatter([x], [y], marker=marker, s=120 if kind == "final" else 60, color=color,
                         label=None if kind in plotted else label, edgecolors="black" if data is report else "none")
            plotted.add(kind)
            axis.annotate(name if kind != "teacher" else f"{name} (teacher)", (x, y), textcoords="offset points",
                          xytext=(6, 4), fontsize=7)
            xs.append(x)
            ys.append(y)
    if ys:
        spread = max(ys) - min(ys)
        margin = max(1.0, 0.1 * spread)
        axis.set_ylim(max(0.0, min(ys) - margin), min(100.0, max(ys) + margin))
        axis.set_xlim(0, max(xs) * 1.15)
    axis.set_xlabel("measured latency (ms, interleaved bench)")
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_title("Accuracy against latency (black edge: this run)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    return figure
