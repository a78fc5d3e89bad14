"""Accuracy after pruning on Fashion-MNIST: Torch-Pruning magnitude vs kpc knapsack, with and without distillation.

A teacher ResNet (defined below, used as the file spec `benchmarks/accuracy.py:bench_resnet`)
is trained by `kpc.train.fit`; then, at 2x and 4x FLOPs reduction, four arms are fine-tuned
with the same epochs, data and seeds:

    A  Torch-Pruning MetaPruner + MagnitudeImportance, uniform ratio tuned to B's MACs   cross-entropy
    B  kpc knapsack (Taylor)                                                              cross-entropy
    C  kpc knapsack (Taylor)                                                              + logit KD
    D  kpc knapsack (Taylor)                                                              + inner KD + logit KD

Targets: D within 0.3 points of the teacher at 2x; D at least 1 point above A at 4x.
Prints a table and appends it to benchmarks/RESULTS.md (not in --quick mode).

    python benchmarks/accuracy.py            # about 30-45 min on 2 CPU cores
    python benchmarks/accuracy.py --quick    # a minute: proves the pipeline, records nothing
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


# ---------------------------------------------------------------- the teacher architecture (a file spec)
class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.down is None else self.down(x)))


class BenchResNet(nn.Module):
    """A ResNet for 1x28x28 (3 stages x 2 blocks, widths 32/64/128, ~24 MMACs): 92-93% on Fashion-MNIST."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(_Block(width, width, 1), _Block(width, width, 1))
        self.layer2 = nn.Sequential(_Block(width, 2 * width, 2), _Block(2 * width, 2 * width, 1))
        self.layer3 = nn.Sequential(_Block(2 * width, 4 * width, 2), _Block(4 * width, 4 * width, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


def bench_resnet(num_classes: int = 10) -> nn.Module:
    return BenchResNet(num_classes)


# ---------------------------------------------------------------- arms
def _macs(model: nn.Module, size: tuple[int, int, int]) -> float:
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(model.eval(), torch.randn(1, *size))
    return float(macs)


def torch_pruning_uniform(teacher: nn.Module, size: tuple[int, int, int], target_macs: float) -> nn.Module:
    """Arm A: MetaPruner + MagnitudeImportance at the uniform ratio whose MACs land on (just under) the target."""
    import copy

    import torch_pruning as tp

    def pruned(ratio: float) -> nn.Module:
        model = copy.deepcopy(teacher).eval().requires_grad_(True)  # its dependency graph is traced via autograd
        fc = [m for m in model.modules() if isinstance(m, nn.Linear)]
        pruner = tp.pruner.MetaPruner(model, torch.randn(1, *size), importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=fc)
        pruner.step()
        return model

    low, high = 0.0, 0.95
    for _ in range(14):  # bisection on the ratio: MACs fall monotonically as it grows
        mid = (low + high) / 2
        if _macs(pruned(mid), size) > target_macs:
            low = mid
        else:
            high = mid
    model = pruned(high)
    if _macs(model, size) > 1.01 * target_macs:
        raise RuntimeError(f"Torch-Pruning could not reach {target_macs:.4g} MACs at any uniform ratio")
    return model


def run(args: argparse.Namespace) -> list[list[object]]:
    from kpc.artifact import LoadedModel, base_plan, open_model, save_artifact
    from kpc.data import parse_data_spec
    from kpc.evaluate import evaluate_accuracy
    from kpc.pruning import Budget, PruneSettings, prune
    from kpc.train import TrainSettings, fit

    torch.set_num_threads(args.threads)
    data = parse_data_spec("fashion-mnist")
    size = (1, 28, 28)
    quiet = (lambda _m: None) if not args.verbose else print
    work = Path(tempfile.mkdtemp(prefix="kpc-accuracy-"))
    started = time.perf_counter()

    torch.manual_seed(0)
    spec = f"{Path(__file__).resolve()}:bench_resnet"
    base = open_model(spec, num_classes=10, input_size=size)
    teacher_settings = TrainSettings(data, epochs=args.teacher_epochs, batch_size=128, lr=0.1, warmup_epochs=1,
                                     subset=args.teacher_subset, seed=0)
    result = fit(base, teacher_settings, work / "teacher", log=quiet)

    def test_accuracy(model: nn.Module) -> float:
        """Top-1 on the whole Fashion-MNIST test split (10k), the same images for the teacher and every arm."""
        return evaluate_accuracy(model, data, size)["top1"] / 100.0

    teacher_acc = test_accuracy(result.model)
    print(f"teacher: {teacher_acc:.4f} after {args.teacher_epochs} epochs ({time.perf_counter() - started:.0f} s)",
          flush=True)
    teacher = open_model(str(work / "teacher"))
    full_macs = _macs(teacher.model, size)

    accuracy: dict[tuple[str, float], list[float]] = {}
    for speedup in args.speedups:
        for seed in range(args.seeds):
            kp = prune(open_model(str(work / "teacher")), Budget(ratio=1.0 / speedup),
                       PruneSettings(data, calib_batches=args.calib_batches, seed=seed), log=quiet)
            plan = base_plan(teacher, "pruned")
            plan["rounds"] = [*plan["rounds"], kp.round]
            child_dir = work / f"child-{speedup}-{seed}"
            save_artifact(child_dir, kp.model, plan)
            child_macs = _macs(open_model(str(child_dir)).model, size)
            tp_model = torch_pruning_uniform(teacher.model, size, child_macs)
            arms = {
                "A": (LoadedModel(tp_model, teacher.spec, [], "torch-pruning"), None, 0.0, 0.0),
                "B": (open_model(str(child_dir)), None, 0.0, 0.0),
                "C": (open_model(str(child_dir)), teacher, 0.0, args.kd_weight),
                "D": (open_model(str(child_dir)), teacher, args.ikd_weight, args.kd_weight),
            }
            for arm, (student, parent, ikd, kd) in arms.items():
                lr = args.lr if parent is None else args.distill_lr
                settings = TrainSettings(data, epochs=args.finetune_epochs, batch_size=128, lr=lr,
                                         warmup_epochs=0, subset=args.finetune_subset, seed=seed,
                                         ikd_weight=ikd, kd_weight=kd, temperature=4.0)
                out = work / f"{arm}-{speedup}-{seed}"
                fitted = fit(student, settings, out, teacher=parent, log=quiet)
                acc = test_accuracy(fitted.model)
                accuracy.setdefault((arm, speedup), []).append(acc)
                macs = _macs(fitted.model, size)
                print(f"{speedup:g}x seed {seed} arm {arm}: {acc:.4f} ({macs / full_macs:.3f} of teacher MACs; "
                      f"{time.perf_counter() - started:.0f} s)", flush=True)

    rows: list[list[object]] = [["teacher", "1x", f"{100 * teacher_acc:.2f}", "", ""]]
    for (arm, speedup), values in accuracy.items():
        mean = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append([arm, f"{speedup:g}x", f"{100 * mean:.2f}", f"{100 * spread:.2f}",
                     f"{100 * (mean - teacher_acc):+.2f}"])

    def mean_of(arm: str, speedup: float) -> float | None:
        values = accuracy.get((arm, speedup))
        return statistics.mean(values) if values else None

    verdicts = []
    d2, d4, a4 = mean_of("D", 2.0), mean_of("D", 4.0), mean_of("A", 4.0)
    if d2 is not None:
        verdicts.append(f"D at 2x within 0.3 points of the teacher: {'yes' if teacher_acc - d2 <= 0.003 else 'NO'} "
                        f"({100 * (d2 - teacher_acc):+.2f})")
    if d4 is not None and a4 is not None:
        verdicts.append(f"D at least 1 point above A at 4x: {'yes' if d4 - a4 >= 0.01 else 'NO'} "
                        f"({100 * (d4 - a4):+.2f})")
    return rows, verdicts, time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny subsets, 1 seed: proves it runs, records nothing")
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--teacher-subset", type=int, default=None, help="default: all 60k training images")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--finetune-subset", type=int, default=30_000)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--speedups", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--lr", type=float, default=0.02, help="fine-tune lr of the cross-entropy arms A and B")
    parser.add_argument("--distill-lr", type=float, default=0.005,
                        help="fine-tune lr of the distilled arms C and D (their KD and inner losses add to the step)")
    parser.add_argument("--ikd-weight", type=float, default=5.0)
    parser.add_argument("--kd-weight", type=float, default=1.0)
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.teacher_epochs, args.teacher_subset = 1, 1024
        args.finetune_epochs, args.finetune_subset, args.seeds, args.calib_batches = 1, 512, 1, 2
    rows, verdicts, seconds = run(args)
    headers = ["arm", "FLOPs reduction", "val acc %", "std over seeds", "vs teacher"]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _record import markdown_table

    print(markdown_table(headers, rows))
    for line in verdicts:
        print(line)
    print(f"total {seconds / 60:.1f} min")
    if args.quick:
        print("(--quick: figures not recorded)")
        return
    from _record import append_results

    notes = [*verdicts, f"teacher {args.teacher_epochs} epochs; every arm {args.finetune_epochs} epochs on the first "
             f"{args.finetune_subset} training images, lr {args.lr} (A, B) and {args.distill_lr} (C, D), "
             f"seeds 0..{args.seeds - 1}; "
             f"C: kd {args.kd_weight} at T=4; D: ikd {args.ikd_weight} + kd {args.kd_weight}; "
             "accuracy on the whole Fashion-MNIST test split (10k) for the teacher and every arm; "
             f"total {seconds / 60:.1f} min"]
    append_results("Accuracy after pruning (Fashion-MNIST)", headers, rows, threads=args.threads, notes=notes)


if __name__ == "__main__":
    main()
