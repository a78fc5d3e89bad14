"""Zoo sweep: every torchvision classifier and one model of every timm family, as a new user would run them.

For each model, in its own subprocess with a time limit, at a small input the model
accepts (64x64, else 224x224, else the model's own size):

    kpc prune SPEC --budget-ratio 0.5 --data synthetic ...   then   kpc.load + forward   then   kpc export --onnx

With `--data fashion-mnist` the prune reads real images and takes kpc's default path for them
(`--sensitivity auto`: the knapsack's values measured on the output where that is estimated to
fit a minute, else summed importance); the table then says what auto decided for each model.

Verdicts:

- pruned: exit 0, the counted MACs within 1% under the budget, no group left whole except
  the network output and groups at or below --min-channels; loads, runs, exports with parity
- partial: as pruned, but some groups left whole for another reason (the reasons are listed), or the
  prune ended more than 1% under the budget
- refused: exit 2 with one line on stderr (a model kpc cannot prune at this budget says so)
- broken: anything else (a traceback, exit 1 or 3, over budget, an artifact that does not load or
  computes something else, an export that fails its parity check)
- hang: the time limit ran out

The summary also counts the issue's target measure: models within 1% under the budget that reload,
run and export with parity, whether or not some of their groups were left whole.

timm families are the names' leading letters (resnet50 and resnet18d are both "resnet"); the
smallest model of each family by parameter count is taken (counted on the meta device, so no
weights are allocated). Seconds are the prune subprocess's CPU time (user + sys), which a
busy machine inflates less than wall time; "graph + prune" sums the CPU seconds the plan
records for the prune's own steps (graph, groups, probe, importance, cost model, solve,
BatchNorm), without the imports, the model's construction and the artifact's save and checks.

    .venv/bin/python benchmarks/zoo.py                  # the whole sweep; appends to benchmarks/RESULTS.md
    .venv/bin/python benchmarks/zoo.py --sample 30             # every k-th model: 30 of them
    .venv/bin/python benchmarks/zoo.py --sample 30 --sample-offset 0.5   # 30 others, between those
    .venv/bin/python benchmarks/zoo.py --only torchvision:mnasnet1_0,timm:ghostnet_100 --no-record
    .venv/bin/python benchmarks/zoo.py --sample 20 --data fashion-mnist --calib-batches 2 --calib-batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _record import append_results

ROOT = Path(__file__).resolve().parents[1]
KPC = [sys.executable, "-m", "kpc"]
FALLBACK_SIZE = 224  # the second input size tried, before the model's own
WHOLE_BY_DESIGN = ("network output", "at or below --min-channels")
CHECK = r'''
import sys, torch, kpc
from kpc.artifact import load_artifact
path, c, h, w = sys.argv[1], *map(int, sys.argv[2:5])
loaded = load_artifact(path)
x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(3))
with torch.no_grad():
    out = loaded.model(x)
assert isinstance(out, torch.Tensor) and torch.isfinite(out).all(), "non-finite or non-tensor output"
print("shape", tuple(out.shape))
'''


@dataclass
class Outcome:
    spec: str
    verdict: str
    size: int
    cpu_s: float = 0.0
    wall_s: float = 0.0
    steps_cpu_s: float | None = None  # the prune's own steps (graph, groups, probe, importance, costs, solve,
    # BatchNorm) as its plan records them: the command without imports, model build, saving and its checks
    steps_wall_s: float | None = None
    slowest_step: str = ""
    sensitivity: str = ""  # what `--sensitivity auto` decided (real data only)
    detail: str = ""
    whole: list[str] = field(default_factory=list)
    # The "pruned": within 1% under the budget, reloads, runs and exports with parity, whether or not
    # some groups were left whole (the strict verdict "pruned" also wants none left whole)
    within_1pct: bool = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated specs instead of the whole zoo")
    parser.add_argument("--sample", type=int, help="N models spread evenly over the zoo's sorted list (every k-th), "
                        "for a sweep that fits in a session")
    parser.add_argument("--shard", type=_shard, help="K/N: the models whose place in the zoo's sorted list is K modulo "
                        "N, so N runs (one per session) sweep the whole zoo between them")
    parser.add_argument("--sample-offset", type=float, default=0.0,
                        help="where in each k-step the sample starts, 0 to 1: another offset picks other models")
    parser.add_argument("--limit-s", type=int, default=300, help="time limit per subprocess")
    parser.add_argument("--size", type=int, default=64, help="input height and width tried first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default="synthetic", help="the prune's --data: synthetic (no measurement), or real "
                        "images such as fashion-mnist, which take the default measured-sensitivity path")
    parser.add_argument("--calib-batches", type=int, default=1)
    parser.add_argument("--calib-batch-size", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--json", type=Path, help="also write every outcome here")
    return parser.parse_args(argv)


def torchvision_models() -> list[str]:
    import torchvision

    return [f"torchvision:{n}" for n in sorted(torchvision.models.list_models(module=torchvision.models))]


def timm_families() -> list[str]:
    """The smallest model (by parameters, counted on the meta device) of every timm family."""
    import timm
    import torch

    by_family: dict[str, list[str]] = {}
    for name in timm.list_models():
        family = re.match(r"[a-z]+", name)
        by_family.setdefault(family.group(0) if family else name, []).append(name)
    chosen = []
    for _family, names in sorted(by_family.items()):
        best, best_params = None, None
        for name in names:
            try:
                with torch.device("meta"):
                    model = timm.create_model(name, pretrained=False)
                params = sum(p.numel() for p in model.parameters())
            except Exception:  # a model that cannot be built on the meta device: try it only if nothing else
                params = None
            if params is not None and (best_params is None or params < best_params):
                best, best_params = name, params
        chosen.append(f"timm:{best or sorted(names)[0]}")
    return chosen


def run(command: list[str], limit_s: int, env: dict[str, str]) -> tuple[int | None, str, str, float, float]:
    """(exit code or None on timeout, stdout, stderr, CPU seconds of the child, wall seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit_s, env=env, cwd=ROOT)
        code, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        code = None
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return code, out, err, cpu, time.perf_counter() - started


def one_line_error(err: str) -> bool:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("kpc: error:")]
    return "Traceback" not in err and len(errors) == 1


def sweep_one(spec: str, args: argparse.Namespace, env: dict[str, str], work: Path) -> Outcome:
    sizes = list(dict.fromkeys([args.size, FALLBACK_SIZE, native_size(spec)]))
    for attempt, size in enumerate(sizes):
        out = work / f"{re.sub(r'[^a-z0-9]+', '-', spec.lower())}-{size}"
        prune = [*KPC, "prune", spec, "--budget-ratio", "0.5", "--data", args.data,
                 "--calib-batches", str(args.calib_batches), "--calib-batch-size", str(args.calib_batch_size),
                 "--num-classes", "10", "--input-size", f"3x{size}x{size}", "--out", str(out)]
        code, _stdout, err, cpu, wall = run(prune, args.limit_s, env)
        outcome = Outcome(spec, "", size, cpu, wall)
        if code is None:
            outcome.verdict, outcome.detail = "hang", f"prune ran past {args.limit_s} s"
            return outcome
        if code == 2 and attempt + 1 < len(sizes):
            # any refusal at the small size is tried again at 224, then at the model's own (a fixed patch grid,
            # a large stride: vit_h_14 refused 64x64 as "indivisible by patch size"); deepseek_vit_412m's own
            # 546x546 made a 412M-parameter prune a hang where 224 is accepted
            continue
        if code == 2 and one_line_error(err):
            outcome.verdict, outcome.detail = "refused", err.strip().splitlines()[-1].removeprefix("kpc: error: ")
            return outcome
        if code != 0:
            outcome.verdict = "broken"
            outcome.detail = f"prune exit {code}: {last_line(err)}"
            return outcome
        return check_artifact(outcome, out, args, env)
    raise AssertionError("unreachable")


def native_size(spec: str) -> int:
    from kpc.specs import _default_input_size

    source, _, name = spec.partition(":")
    return _default_input_size(source, name)[1]


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def check_artifact(outcome: Outcome, out: Path, args: argparse.Namespace, env: dict[str, str]) -> Outcome:
    plan = json.loads((out / "plan.json").read_text())
    last = plan["rounds"][-1]
    limit, counted = last["limit"], last["counted_cost"]
    if counted > limit * (1 + 1e-9):
        outcome.verdict, outcome.detail = "broken", f"over budget: {counted:.4g} > {limit:.4g} GFLOPs"
        return outcome
    steps = last.get("seconds") or {}
    if steps:
        outcome.steps_cpu_s = sum(step["cpu_s"] for step in steps.values())
        outcome.steps_wall_s = sum(step["wall_s"] for step in steps.values())
        outcome.slowest_step = max(steps, key=lambda name: steps[name]["cpu_s"])
    outcome.sensitivity = (last.get("importance") or {}).get("sensitivity", "")
    outcome.whole = sorted({g["reason"] for g in last["groups"] if not g["prunable"]
                            and not any(k in (g["reason"] or "") for k in WHOLE_BY_DESIGN)})
    landed = counted >= limit * 0.99 or last.get("landed") is True
    size = outcome.size
    code, _stdout, err, _cpu, _wall = run([sys.executable, "-c", CHECK, str(out), "3", str(size), str(size)],
                                         args.limit_s, env)
    if code != 0:
        outcome.verdict, outcome.detail = "broken", f"reload: {last_line(err) if code is not None else 'hang'}"
        return outcome
    code, _stdout, err, _cpu, _wall = run([*KPC, "export", str(out), "--onnx", "--samples", "1", "--out",
                                           str(out) + "-onnx"], args.limit_s, env)
    if code is None:
        outcome.verdict, outcome.detail = "hang", "export ran past the limit"
        return outcome
    if code != 0:
        exporter = code == 2 and one_line_error(err) and "ONNX export failed" in err
        outcome.verdict = "partial" if exporter and landed else "broken"
        outcome.detail = f"export exit {code}: {last_line(err)}"
        return outcome
    outcome.within_1pct = landed
    details = [] if landed else [f"under budget by {100 * (1 - counted / limit):.1f}%"]
    outcome.verdict = "pruned" if landed and not outcome.whole else "partial"
    outcome.detail = "; ".join([*details, *outcome.whole])[:300]
    return outcome


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected K/N, such as 0/2") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: K must be in 0..N-1")
    return index, count


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    specs = args.only.split(",") if args.only else [*torchvision_models(), *timm_families()]
    if args.sample and args.sample < len(specs):
        step = len(specs) / args.sample
        offset = min(max(args.sample_offset, 0.0), 0.999)
        specs = [specs[int((i + offset) * step)] for i in range(args.sample)]
    if args.shard:
        specs = specs[args.shard[0]::args.shard[1]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="kpc-zoo-") as tmp:
        for index, spec in enumerate(specs, 1):
            outcome = sweep_one(spec, args, env, Path(tmp))
            outcomes.append(outcome)
            print(f"[{index}/{len(specs)}] {spec}: {outcome.verdict} ({outcome.cpu_s:.0f} CPU-s) {outcome.detail}",
                  flush=True)
            if args.json:  # after every model, so an interrupted sweep keeps what it measured
                args.json.write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
            for child in Path(tmp).iterdir():  # artifacts of big models add up: keep the disk free
                subprocess.run(["rm", "-rf", str(child)], check=False)
    counts = {v: sum(1 for o in outcomes if o.verdict == v) for v in ("pruned", "partial", "refused", "broken",
                                                                      "hang")}
    rows = [[o.spec, o.verdict, "yes" if o.within_1pct else "no", f"{o.size}", f"{o.cpu_s:.1f}", f"{o.wall_s:.1f}",
             "-" if o.steps_cpu_s is None else f"{o.steps_cpu_s:.1f} / {o.steps_wall_s:.1f} ({o.slowest_step})",
             *([o.sensitivity or "-"] if args.data != "synthetic" else []), o.detail or "-"]
            for o in outcomes]
    within = sum(o.within_1pct for o in outcomes)
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    summary += (f"; within 1% under the budget, reloaded and exported with parity (groups left whole or not): "
                f"{within} of {len(outcomes)} ({100 * within / max(len(outcomes), 1):.0f}%, target 90%)")
    print(summary)
    slow = [o for o in outcomes if o.cpu_s > 60]
    slow_steps = [o for o in outcomes if (o.steps_cpu_s or 0) > 60]
    if args.json:
        args.json.write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    sampled = f" (every k-th of the zoo, --sample, offset {args.sample_offset:g})" if args.sample else ""
    if args.shard:
        sampled += f" (shard {args.shard[0]}/{args.shard[1]}: every {args.shard[1]}-th of the zoo's sorted list)"
    if not args.no_record:
        title = "Zoo sweep: prune 0.5, reload, export (issue 12)" if args.data == "synthetic" else \
            f"Zoo sweep with --data {args.data}: prune 0.5 on kpc's default path for real images, reload, export"
        append_results(title,
                       ["model", "verdict", "within 1% of the budget", "input", "prune CPU s", "prune wall s",
                        "graph + prune CPU s / wall s (slowest step)",
                        *(["sensitivity (auto)"] if args.data != "synthetic" else []), "detail"], rows,
                       threads=args.threads,
                       notes=[f"{len(outcomes)} models{sampled}: "
                              f"{summary}",
                              f"prune command over 60 CPU-s: {len(slow)} ({', '.join(o.spec for o in slow) or 'none'})",
                              f"graph build plus prune (the plan's steps) over 60 CPU-s: {len(slow_steps)} "
                              f"({', '.join(o.spec for o in slow_steps) or 'none'}); over 60 s wall: "
                              f"{', '.join(o.spec for o in outcomes if (o.steps_wall_s or 0) > 60) or 'none'}"])
    return 0 if counts["broken"] == 0 and counts["hang"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
