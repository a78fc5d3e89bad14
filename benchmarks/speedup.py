"""Measured speedup of FLOPs-50% pruned networks at width steps of 8, 16 and 32, on the CPU runtimes.

For each model at 3x224x224, batch 1: prune to half the MACs with `kpc.prune` at each
width step (Taylor importance calibrated on synthetic images: latency depends on the kept
widths, not on the weights' values), then time baseline and pruned children in the session
a server runs, in alternating blocks (`kpc.benchmark.run_bench`), on ort-cpu and
torch-cpu. Reports each step's speedup with its 95% paired-bootstrap interval and the
importance it kept; the steps' children are also timed against each other, so the choice
of the default step rests on a direct comparison.

    .venv/bin/python benchmarks/speedup.py            # appends to benchmarks/RESULTS.md
    .venv/bin/python benchmarks/speedup.py --quick    # a smoke test: one model, a few runs, nothing recorded

Run it on a quiet machine: anything else running shows up in the intervals.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
from _record import append_results
from rich.console import Console
from rich.table import Table

MODELS = ("resnet50", "mobilenet_v3_large")
RUNTIMES = ("ort-cpu", "torch-cpu")
STEPS = (8, 16, 32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one model, a few runs; do not record (a smoke test)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision names")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated runtimes")
    parser.add_argument("--steps", default=",".join(str(s) for s in STEPS), help="width steps (--round-to) compared")
    parser.add_argument("--input-size", default="3x224x224")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.5, help="FLOPs budget as a fraction of the baseline")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--calib-batches", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.warmup, args.iters, args.calib_batches, args.no_record = MODELS[1], 2, 10, 1, True
    return args


def main(argv: list[str] | None = None) -> int:
    import kpc
    from kpc.artifact import open_model
    from kpc.benchmark import BenchSettings, ModelSide, run_bench
    from kpc.specs import parse_input_size

    args = parse_args(argv)
    console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
    input_size = parse_input_size(args.input_size)
    torch.set_num_threads(args.threads)
    rows, pair_rows = [], []
    started = time.perf_counter()
    steps = [int(s) for s in args.steps.split(",")]
    for name in args.models.split(","):
        torch.manual_seed(0)
        baseline = open_model(f"torchvision:{name}", input_size=input_size)
        calibration = [torch.randn(8, *input_size, generator=torch.Generator().manual_seed(i))
                       for i in range(args.calib_batches)]
        children = {}
        for step in steps:
            result = kpc.prune(baseline.model, baseline.example_input(), kpc.Budget(ratio=args.ratio),
                               calibration=calibration, round_to=step, bn_recalibrate=0)
            r = result.round
            children[step] = (ModelSide(result.model.eval(), input_size, f"{name} step {step}"),
                              r.kept_importance / r.total_importance, r.counted_cost / r.full_cost)
            console.print(f"{name} step {step}: {r.counted_cost / r.full_cost:.3f} of the MACs, kept importance "
                          f"{r.kept_importance / r.total_importance:.2%}")
        base_side = ModelSide(baseline.model.eval(), input_size, name)
        for runtime in args.runtimes.split(","):
            settings = BenchSettings(runtime=runtime, batch=1, threads=args.threads, warmup=args.warmup,
                                     iters=args.iters)
            for step in steps:
                side, kept, fraction = children[step]
                report = run_bench(base_side, side, settings)
                s, a, b = report["speedup"], report["baseline"], report["candidate"]
                rows.append([name, runtime, str(step), f"{fraction:.3f}", f"{kept:.2%}",
                             f"{a['latency']['median_ms']:.2f}", f"{b['latency']['median_ms']:.2f}",
                             f"{s['ratio']:.2f}x", f"{s['ci_low']:.2f}-{s['ci_high']:.2f}"])
                console.print(" | ".join(rows[-1]))
            for low, high in itertools.pairwise(steps):  # the steps' children against each other
                report = run_bench(children[low][0], children[high][0], settings)
                s = report["speedup"]
                pair_rows.append([name, runtime, f"step {high} vs step {low}", f"{s['ratio']:.3f}x",
                                  f"{s['ci_low']:.3f}-{s['ci_high']:.3f}"])
                console.print(" | ".join(pair_rows[-1]))
    headers = ["model", "runtime", "width step", "MACs / baseline", "kept importance", "baseline ms", "pruned ms",
               "speedup", "95% CI"]
    pair_headers = ["model", "runtime", "comparison", "speed ratio (>1: the larger step is faster)", "95% CI"]
    for title, head, body in (("speedup by width step", headers, rows), ("steps compared", pair_headers, pair_rows)):
        table = Table(title=f"{title}: batch 1, {args.threads} threads, {args.input_size}")
        for header in head:
            table.add_column(header)
        for row in body:
            table.add_row(*row)
        Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(table)
    console.print(f"done in {time.perf_counter() - started:.0f} s")
    if args.no_record:
        return 0
    notes = [f"kpc.prune --budget-ratio {args.ratio:g} at each --round-to, synthetic calibration ({args.calib_batches} "
             "batches of 8), random-init torchvision weights (latency does not depend on weight values)",
             f"{args.warmup} warm-up + {args.iters} timed runs per model, in alternating blocks of each model alone "
             "(serving sessions); speedup = median ratio, 95% CI by paired bootstrap"]
    append_results(f"Speedup by width step, FLOPs-{args.ratio:.0%} ({args.input_size}, batch 1) (issue 15)", headers,
                   rows, threads=args.threads, notes=notes)
    append_results("Width steps against each other (issue 15)", pair_headers, pair_rows, threads=args.threads,
                   notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
