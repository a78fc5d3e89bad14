"""Training threads: images/s with 1 and 2 threads, on an idle machine and beside one CPU-bound process.

Each case is a fresh `kpc train` process (ResNet-18 at 1x28x28 on the first 4,096
Fashion-MNIST images, one epoch) reporting its throughput; the competing process is a
pure-Python busy loop on one core. "auto" is kpc's default: no --threads, which picks the
count from the cores and drops to 1 thread when it sees them oversubscribed.

    .venv/bin/python benchmarks/threads.py       # a few minutes; appends to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _record import append_results

ROOT = Path(__file__).resolve().parents[1]
BUSY = "while True:\n    pass\n"


def train(threads: str, out: Path) -> tuple[float, str]:
    args = [sys.executable, "-m", "kpc", "train", "torchvision:resnet18", "--data", "fashion-mnist", "--subset",
            "4096", "--epochs", "1", "--batch-size", "64", "--out", str(out)]
    if threads != "auto":
        args += ["--threads", threads]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, check=True)
    rows = [json.loads(line) for line in (out.with_name(out.name + ".work") / "metrics.jsonl").read_text().splitlines()]
    warned = "continuing on 1 thread" in done.stderr
    return float(rows[-1]["images_per_s"]), "dropped to 1 thread" if warned else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kpc-threads-") as tmp:
        for load in ("idle", "one busy process"):
            busy = subprocess.Popen([sys.executable, "-c", BUSY]) if load != "idle" else None
            try:
                for threads in ("1", "2", "auto"):
                    rates, notes = [], set()
                    for repeat in range(args.repeats):
                        rate, note = train(threads, Path(tmp) / f"{load[:4]}-{threads}-{repeat}")
                        rates.append(rate)
                        notes.add(note)
                    rows.append([load, threads, f"{max(rates):.0f}", " ".join(f"{r:.0f}" for r in rates),
                                 " ".join(sorted(n for n in notes if n)) or "-"])
                    print(" | ".join(rows[-1]), flush=True)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    headers = ["machine", "--threads", "images/s (best)", "images/s per run", "note"]
    if not args.no_record:
        append_results("Training threads: images/s idle and beside one CPU-bound process (issue 17)", headers, rows,
                       threads="as in the table",
                       notes=["kpc train torchvision:resnet18 --data fashion-mnist --subset 4096 --epochs 1 "
                              "--batch-size 64 [--threads N]; the busy process: a Python loop on one core; "
                              "auto = no --threads (kpc's default: every core, but one above 2 cores, "
                              "dropping to 1 thread when it sees the cores oversubscribed)"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
