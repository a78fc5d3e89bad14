"""What a latency budget's closed loop costs and where it lands: rounds, timings, CPU seconds.

A `--budget-ms` (or a latency `--budget-ratio` with `--lut`) prune solves, builds and times
plans until one lands in the window; on a shared 2-core machine each timing of ResNet-50 on
torch-cpu is tens of seconds, so the loop's rounds are the prune's cost. This script profiles
a table once (cached in --work), then runs the same latency prune as fresh processes,
`--repeats` times, and reads each child's plan: rounds timed, solves that repeated a timed
plan, the landing against the budget, CPU seconds (user + sys, imports included) and wall.

With --compare DIR (another kpc checkout, e.g. a worktree of an earlier commit), the two
checkouts' prunes alternate (this, other, this, ...) on the same table, so their figures share
the machine's mood and can be quoted as a ratio.

    .venv/bin/python benchmarks/closed_loop.py [--model torchvision:resnet50] [--runtime torch-cpu]
        [--budget-ratio 0.6] [--repeats 2] [--compare /tmp/kpc-old] [--work /tmp/kpc-bench]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _process import run_child
from _record import append_results

ROOT = Path(__file__).resolve().parents[1]


def ensure_table(args: argparse.Namespace) -> Path:
    """The table every arm prunes with: profiled once on this machine, reused while it exists."""
    name = args.model.replace(":", "-").replace("/", "-")
    path = Path(args.work) / f"{name}-{args.runtime}-{args.threads}t.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"profiling {args.model} on {args.runtime} into {path} ...", flush=True)
        child = run_child([sys.executable, "-m", "kpc", "profile", args.model, "--runtime", args.runtime,
                           "--threads", str(args.threads), "--out", str(path)], cwd=ROOT, threads=args.threads)
        print(f"  profiled in {child.wall_s:.0f} s wall, {child.cpu_s:.0f} CPU-s", flush=True)
    return path


def prune_once(checkout: Path, table: Path, args: argparse.Namespace, out: Path) -> dict[str, object]:
    command = [sys.executable, "-m", "kpc", "-v", "prune", args.model, "--lut", str(table), "--budget-ratio",
               str(args.budget_ratio), "--data", "synthetic", "--calib-batches", "2", "--out", str(out)]
    child = run_child(command, cwd=checkout, threads=args.threads, pythonpath=checkout)
    plan = json.loads((out / "plan.json").read_text())
    last = plan["rounds"][-1]
    attempts = last["attempts"]
    timed = [a for a in attempts if a.get("counted") is not None and a.get("repeat_of") is None]
    samples = last.get("counted_samples") or []
    noise = statistics.stdev(samples) / statistics.fmean(samples) if len(samples) > 1 else float("nan")
    for a in attempts:  # round by round, for the log: what each solve predicted and what its plan timed
        counted = a.get("counted", float("nan"))
        print(f"    target {a['target']:.3f} predicted {a['predicted']:.3f} counted {counted:.3f}"
              + (f" ({'timed again' if a.get('timed_again') else 'repeat'} of {a['repeat_of']})"
                 if a.get("repeat_of") else "") + (" error" if a.get("error") else ""),
              flush=True)
    return {"cpu": child.cpu_s, "wall": child.wall_s, "timed": len(timed), "solves": len(attempts),
            "repeats": sum(a.get("repeat_of") is not None and not a.get("timed_again") for a in attempts),
            "again": sum(bool(a.get("timed_again")) for a in attempts), "limit": last["limit"],
            "counted": last["counted_cost"], "landed": last.get("landed"), "samples": len(samples),
            "noise": noise}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--runtime", default="torch-cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-ratio", type=float, default=0.6, help="latency budget as a share of the unpruned")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compare", type=Path, default=None, help="another kpc checkout, alternated with this one")
    parser.add_argument("--work", default="/tmp/kpc-bench", help="where the table is cached")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    table = ensure_table(args)
    arms = [("this checkout", ROOT)] + ([("--compare", args.compare.resolve())] if args.compare else [])
    headers = ["arm", "repeat", "plans timed", "solves", "repeats (not timed)", "timed again", "kept plan's samples",
               "their scatter", "budget ms", "landed ms", "vs budget", "landed", "CPU-s", "wall s"]
    rows, cpu_by_arm = [], {name: [] for name, _ in arms}
    with tempfile.TemporaryDirectory(prefix="kpc-closed-loop-") as tmp:
        for repeat in range(args.repeats):
            for name, checkout in arms:
                r = prune_once(checkout, table, args, Path(tmp) / f"{repeat}-{len(rows)}")
                cpu_by_arm[name].append(r["cpu"])
                rows.append([name, repeat + 1, r["timed"], r["solves"], r["repeats"], r["again"], r["samples"],
                             f"{100 * r['noise']:.1f}%", f"{r['limit']:.2f}", f"{r['counted']:.2f}",
                             f"{100 * (r['counted'] / r['limit'] - 1):+.1f}%", r["landed"], f"{r['cpu']:.0f}",
                             f"{r['wall']:.0f}"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    notes = [f"table: `kpc profile {args.model} --runtime {args.runtime} --threads {args.threads}` on this machine",
             "prune: `kpc -v prune MODEL --lut TABLE --budget-ratio R --data synthetic --calib-batches 2`, a fresh "
             "process per row; arms alternate"]
    if args.compare:
        mine, other = (statistics.median(cpu_by_arm[name]) for name, _ in arms)
        notes.append(f"median CPU-s, this checkout / --compare ({args.compare}): {mine:.0f} / {other:.0f} = "
                     f"{mine / other:.2f}")
    print("\n".join(notes))
    if not args.no_record:
        append_results(f"Closed loop of a latency budget: {args.model} on {args.runtime} at "
                       f"{args.budget_ratio:g} of its latency", headers, rows, threads=args.threads, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
