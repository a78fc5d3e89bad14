"""Latency tables on the serving runtime: profiling time, and predicted vs measured full-model latency.

For each model: `kpc profile` on the runtime (the table is written under profiles/, the
shipped tables), then random width assignments are applied to real pruned copies and
each copy is timed; the error is predicted/measured - 1. Targets (issue 4, ort-cpu):
median |error| within 3%, worst within 8%; profiling resnet50 at batch 1, 2 threads
under 3 minutes. The full-width error is the table's own calibration at full width (its
fit against its timing of the unpruned model), within 15%: a bound a test once held and
a loaded two-core machine broke (15.1%), so it is a benchmark's figure.

    python benchmarks/latency_model.py [--runtime ort-cpu] [--threads 2] [--samples 8] [--models resnet18 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _record import append_results, markdown_table

from kpc.artifact import open_model
from kpc.latency.model import LatencyModel, RelativeTimer
from kpc.latency.profiler import (
    ProfileSettings,
    default_table_path,
    model_layers,
    profile,
    pruned_copy,
    random_widths,
    target_device,
)

MODELS = ["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf"]
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="ort-cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=100, help="interleaved timing rounds per sample")
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--reuse", action="store_true", help="Reuse existing tables instead of profiling again.")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    settings = ProfileSettings(runtime=args.runtime, batch=args.batch, threads=args.threads)
    device = target_device(args.runtime)
    rows, all_errors, full_errors = [], [], []
    for name in args.models:
        spec = f"torchvision:{name}"
        loaded = open_model(spec, num_classes=1000, input_size=(3, args.size, args.size))
        path = default_table_path(ROOT / "profiles", device, settings, spec)
        started = time.perf_counter()
        if args.reuse and path.is_file():
            from kpc.latency import load_table

            table = load_table(path)
            seconds = float(table.header.get("profile_seconds", "nan"))  # how long the reused table took
        else:
            table = profile(loaded.model, loaded.example_input(), settings, path, label=loaded.label)
            seconds = time.perf_counter() - started
        round_to, min_channels = int(table.header["round_to"]), int(table.header["min_channels"])  # block-aligned
        layers = model_layers(loaded.model, loaded.example_input(), round_to, min_channels)
        model = LatencyModel(table, layers.layers, layers.full_widths, layers.min_widths)
        rng = np.random.default_rng(0)  # the table's own calibration draws use another seed
        errors = []
        timer = RelativeTimer(loaded.model, loaded.input_size, runtime=args.runtime, batch=args.batch,
                              threads=args.threads, precision="fp32", reference_ms=table.header["full_model_ms"],
                              iters=args.rounds)
        for _ in range(args.samples):
            widths = random_widths(layers, rng, round_to, min_channels)
            measured = timer(pruned_copy(loaded.model, layers, widths))
            errors.append(model.total(widths) / measured - 1)
        timer.close()
        all_errors += errors
        absolute = [abs(e) for e in errors]
        full = next(c for c in table.remainder.calibration if c["variant"] == "uniform 1")
        full_error = full["predicted_ms"] / full["measured_ms"] - 1
        full_errors.append(full_error)
        rows.append([name, f"{seconds:.0f}", table.header["points"], f"{table.header['full_model_ms']:.2f}",
                     f"{full_error:+.1%}", f"{statistics.median(absolute):.1%}", f"{max(absolute):.1%}",
                     " ".join(f"{e:+.1%}" for e in errors)])
        print(markdown_table(["model", "profile s", "points", "full ms", "full-width err", "median |err|",
                              "worst |err|", "errors"], rows[-1:]))
    absolute = [abs(e) for e in all_errors]
    worst_full = max(abs(e) for e in full_errors)
    rows.append(["all", "", "", "", f"worst {worst_full:.1%} ({'met' if worst_full <= 0.15 else 'NOT met'})",
                 f"{statistics.median(absolute):.1%}", f"{max(absolute):.1%}", ""])
    headers = ["model", "profile s", "points", "full model ms", "full-width error (calibration, target 15%)",
               "median |error|", "worst |error|", "errors (predicted/measured - 1)"]
    print(markdown_table(headers, rows))
    if not args.no_record:
        append_results(f"Latency model: predicted vs measured ({args.runtime}, batch {args.batch}, "
                       f"{args.size}x{args.size}) (issue 4)", headers, rows, threads=args.threads,
                       notes=[f"device: {device}; {args.samples} random width assignments per model (seed 0; the "
                              "tables calibrate on other draws), each timed in alternating blocks with the unpruned "
                              f"model ({args.rounds} runs each), as ratio x the table's full-model ms; "
                              "tables written to profiles/; layer entries are ONNX Runtime kernel times relative to a "
                              "reference conv in the same session (ort-cpu), "
                              "widths in steps of the table's round_to (the channel block)"])


if __name__ == "__main__":
    main()
