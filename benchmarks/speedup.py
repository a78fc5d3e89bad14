"""Measured speedup of FLOPs-50% pruned networks over their baselines, on the CPU runtimes.

For resnet50 and mobilenet_v3_large at 3x224x224, batch 1: prune to half the MACs with
`kpc.prune` (knapsack, Taylor importance calibrated on *synthetic* images: latency depends
on the kept widths, not on the weights' values, so random-init torchvision models and
synthetic calibration give the same timings a trained model would), then time baseline
and pruned interleaved with `kpc.bench.run_bench` on ort-cpu and torch-cpu, and report
the median-ratio speedup with its 95% paired-bootstrap interval.

    .venv/bin/python benchmarks/speedup.py            # the real run; appends to benchmarks/RESULTS.md
    .venv/bin/python benchmarks/speedup.py --quick    # a smoke test: one model, a few runs, nothing recorded

Run it on a quiet machine: anything else running shows up in the intervals.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _record import append_results
from rich.console import Console
from rich.table import Table

MODELS = ("resnet50", "mobilenet_v3_large")
RUNTIMES = ("ort-cpu", "torch-cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one model, a few runs; do not record (a smoke test)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision names")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated runtimes")
    parser.add_argument("--input-size", default="3x224x224")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.5, help="FLOPs budget as a fraction of the baseline")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.warmup, args.iters, args.calib_batches, args.no_record = MODELS[1], 1, 5, 1, True
    return args


def prune_half(spec: str, input_size: tuple[int, int, int], ratio: float, calib_batches: int, log):
    """Baseline and pruned LoadedModels (FLOPs budget `ratio` of the unpruned model, synthetic calibration)."""
    from kpc.artifact import LoadedModel, open_model
    from kpc.data import parse_data_spec
    from kpc.pruning import Budget, PruneSettings, prune

    settings = PruneSettings(data=parse_data_spec("synthetic"), calib_batches=calib_batches, calib_batch_size=8)
    torch.manual_seed(0)
    baseline = open_model(spec, input_size=input_size)
    result = prune(baseline, Budget(ratio=ratio), settings, log=lambda _m: None)
    r = result.round
    log(f"  {spec}: {r['full_cost']:.4g} -> {r['counted_cost']:.4g} {r['cost_unit']}")
    pruned = LoadedModel(result.model.eval(), baseline.spec, [r], f"{spec} pruned to {ratio:g} MACs")
    return baseline, pruned


def main(argv: list[str] | None = None) -> int:
    from kpc.benchmark import BenchSettings, run_bench
    from kpc.specs import parse_input_size

    args = parse_args(argv)
    console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
    input_size = parse_input_size(args.input_size)
    torch.set_num_threads(args.threads)
    rows = []
    started = time.perf_counter()
    for name in args.models.split(","):
        console.print(f"pruning {name} to {args.ratio:g} of its MACs (synthetic calibration)")
        baseline, pruned = prune_half(f"torchvision:{name}", input_size, args.ratio, args.calib_batches,
                                      console.print)
        for runtime in args.runtimes.split(","):
            settings = BenchSettings(runtime=runtime, batch=args.batch, threads=args.threads, warmup=args.warmup,
                                     iters=args.iters)
            report = run_bench(baseline, pruned, settings, log=lambda m: console.print(f"  {m}"))
            s, a, b = report["speedup"], report["baseline"], report["candidate"]
            rows.append([name, runtime, f"{a['gmacs']:.3g} -> {b['gmacs']:.3g}", f"{a['latency']['median_ms']:.2f}",
                         f"{b['latency']['median_ms']:.2f}", f"{s['ratio']:.2f}x",
                         f"{s['ci_low']:.2f}-{s['ci_high']:.2f}"])
    headers = ["model", "runtime", "GMACs", "baseline median ms", "pruned median ms", "speedup", "95% CI"]
    table = Table(title=f"batch {args.batch}, {args.threads} threads, {args.input_size}, "
                        f"{args.warmup}+{args.iters} interleaved runs")
    for header in headers:
        table.add_column(header, justify="left" if header in ("model", "runtime") else "right")
    for row in rows:
        table.add_row(*row)
    Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(table)
    console.print(f"done in {time.perf_counter() - started:.0f} s")
    if args.no_record:
        console.print("not recorded (--quick or --no-record)")
        return 0
    append_results(
        f"Speedup of FLOPs-{args.ratio:.0%} pruned models ({args.input_size}, batch {args.batch})",
        headers, rows, threads=args.threads,
        notes=[f"pruned with kpc prune --budget-ratio {args.ratio:g}, synthetic calibration "
               f"({args.calib_batches} batches of 8), random-init torchvision weights (latency does not depend "
               "on weight values)",
               f"{args.warmup} warm-up + {args.iters} timed runs per model, baseline and pruned interleaved; "
               "speedup = median ratio, 95% CI by paired bootstrap (2000 resamples)"])
    console.print("appended to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
