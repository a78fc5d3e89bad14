"""Fine-tune settings sweep for the accuracy benchmark's arms, on children it already pruned.

`benchmarks/accuracy.py` leaves its teacher and pruned children in its work directory
(`kpc-accuracy-*` under the temp dir). This script fine-tunes one child under several
settings (learning rate, inner and logit distillation weights, temperature) and reports
top-1 on the whole Fashion-MNIST test split, so the accuracy benchmark's settings are
chosen on evidence. Arm A is rebuilt from the teacher (Torch-Pruning magnitude, uniform
ratio at the child's MACs), as in the accuracy benchmark.

    python benchmarks/distill_sweep.py --work /tmp/kpc-accuracy-XXXX \\
        --run d1,child-4.0-1,D,0.005,5,1,1 --run a1,child-4.0-1,A,0.02,0,0,1

A run is NAME,CHILD,ARM,LR,IKD,KD,SEED[,TEMPERATURE[,EPOCHS]].
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import append_results, markdown_table
from accuracy import _macs, torch_pruning_uniform

from kpc.artifact import LoadedModel, open_model
from kpc.data import parse_data_spec
from kpc.evaluate import evaluate_accuracy
from kpc.train import TrainSettings, fit

SIZE = (1, 28, 28)


def run_one(work: Path, spec: str, subset: int, out_root: Path) -> list[str]:
    parts = spec.split(",")
    name, child, arm, lr, ikd, kd, seed = parts[:7]
    temperature = float(parts[7]) if len(parts) > 7 else 4.0
    epochs = int(parts[8]) if len(parts) > 8 else 2
    data = parse_data_spec("fashion-mnist")
    teacher = open_model(str(work / "teacher"))
    if arm == "A":
        pruned = open_model(str(work / child))
        model = torch_pruning_uniform(teacher.model, SIZE, _macs(pruned.model, SIZE))
        student, parent = LoadedModel(model, teacher.spec, [], "torch-pruning"), None
    else:
        student = open_model(str(work / child))
        parent = teacher if float(ikd) > 0 or float(kd) > 0 else None
    settings = TrainSettings(data, epochs=epochs, batch_size=128, lr=float(lr), warmup_epochs=0, subset=subset,
                             seed=int(seed), ikd_weight=float(ikd), kd_weight=float(kd), temperature=temperature)
    started = time.perf_counter()
    result = fit(student, settings, out_root / name, teacher=parent, overwrite=True, log=lambda _m: None)
    top1 = evaluate_accuracy(result.model, data, SIZE)["top1"]
    return [name, child, arm, lr, ikd, kd, f"{temperature:g}", str(epochs), seed, f"{top1:.2f}",
            f"{time.perf_counter() - started:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="an accuracy benchmark's work directory")
    parser.add_argument("--run", action="append", required=True, help="NAME,CHILD,ARM,LR,IKD,KD,SEED[,T[,EPOCHS]]")
    parser.add_argument("--subset", type=int, default=30_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    headers = ["run", "child", "arm", "lr", "ikd", "kd", "T", "epochs", "seed", "test top-1 %", "s"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kpc-sweep-") as tmp:
        for spec in args.run:
            rows.append(run_one(args.work, spec, args.subset, Path(tmp)))
            print(markdown_table(headers, rows[-1:]), flush=True)
    print(markdown_table(headers, rows))
    if not args.no_record:
        append_results("Fine-tune settings sweep for the accuracy benchmark (issue 5)", headers, rows,
                       threads=args.threads,
                       notes=[f"children and teacher from {args.work}; every run {args.subset} training images, "
                              "batch 128, cosine lr without warm-up; top-1 on the whole test split (10k)"])


if __name__ == "__main__":
    main()
