"""kpc against its peers: NVIDIA ModelOpt FastNAS and Torch-Pruning's global pruners, on speed and on accuracy.

Needs the bench extra (`pip install -e ".[bench]"`: nvidia-modelopt 0.47, requests,
torchprofile 0.0.4).

Part 1, speed (ResNet-50 at 3x224x224, random init, 50% of the FLOPs, as issue 15 ran it):
each pruner's CPU seconds, counted MACs, and speedup over the unpruned model on ort-cpu
and torch-cpu (serving sessions, alternating blocks, 95% interval); then kpc's model timed
directly against ModelOpt's (>1: kpc's is faster). Target: kpc at least as fast (>= 1.00).

Part 2, accuracy (the kpc-trained ResNet-18 Fashion-MNIST teacher of _fmnist.py): ModelOpt
FastNAS and Torch-Pruning (uniform magnitude, global Taylor) at 50% of the FLOPs, and kpc,
with its defaults (8 calibration batches of 32, and 32 batches; `--sensitivity auto`, which measures
this teacher's groups) and with summed Taylor values (`--sensitivity 0`, the default before
2026-12-03), each pruned along a ladder of FLOPs budgets (`--ladder`). Every child is
timed against ModelOpt's child, interleaved on ort-cpu, and scored straight after pruning
(BatchNorm re-estimated on the same batches) on the validation split (the last 5,000
training images) and the test split. Of each kpc ladder, the child compared is the most
accurate on validation among those at least as fast as ModelOpt's (median ratio >= 1.00);
its test accuracy, and after the same short fine-tune, is reported. ModelOpt scores its
candidate subnets by validation accuracy (BatchNorm calibrated by ModelOpt on training
batches). The question it answers: at the same measured latency, whose model is most
accurate? (At 28x28 the teacher runs in about half a millisecond; a latency budget in
milliseconds, or a table's latency ratio, taken from a separate run moves by tens of
percent on a shared host, so the ladder is matched by measurement.)

    .venv/bin/python benchmarks/peers.py --work /tmp/kpc-bench [--part speed|accuracy|both]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from _fmnist import (
    SIZE,
    TEACHER_EPOCHS,
    accuracy,
    batches,
    dataset,
    macs,
    teacher,
    teacher_description,
    tp_prune,
)
from _record import append_results
from torch import nn
from torch.utils.data import DataLoader, Subset

import kpc
from kpc.artifact import LoadedModel
from kpc.batchnorm import recalibrate_batchnorm
from kpc.benchmark import BenchSettings, ModelSide, run_bench
from kpc.costs import count_macs
from kpc.data import parse_data_spec
from kpc.plan import Plan
from kpc.train.loop import TRAIN_DEFAULTS, fit


def timed(function: Any) -> tuple[Any, float]:
    """(result, CPU seconds of this process, all threads) of a call."""
    started = time.process_time()
    return function(), time.process_time() - started


def layer_outputs(model: nn.Module, example: torch.Tensor) -> int:
    """Elements every conv and linear layer writes for one input: the activation traffic a MAC count does not see."""
    written = 0

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal written
        written += output.numel() if isinstance(output, torch.Tensor) else 0

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return written


def modelopt_fastnas(model: nn.Module, example: torch.Tensor, fraction: float, loader: Any, score: Any,
                     checkpoint: Path) -> nn.Module:
    import modelopt.torch.prune as mtp

    candidate = copy.deepcopy(model).eval()
    checkpoint.unlink(missing_ok=True)  # ModelOpt resumes a search from it: a stale one returns the old result
    # ModelOpt's forward loop takes element 0 of every batch (a DataLoader's (images, labels)): give it tuples
    batches = [(batch,) if isinstance(batch, torch.Tensor) else batch for batch in loader]
    subnet, _state = mtp.prune(model=candidate, mode="fastnas", constraints={"flops": f"{100 * fraction:g}%"},
                               dummy_input=example, config={"data_loader": batches, "score_func": score,
                                                            "checkpoint": str(checkpoint)})
    return subnet.eval()


def speedups(base: nn.Module, children: dict[str, nn.Module], size: tuple[int, ...], runtimes: list[str],
             threads: int, iters: int) -> dict[tuple[str, str], dict[str, Any]]:
    reports = {}
    for runtime in runtimes:
        settings = BenchSettings(runtime=runtime, threads=threads, iters=iters)
        for name, child in children.items():
            reports[(name, runtime)] = run_bench(ModelSide(base, size, "baseline"), ModelSide(child, size, name),
                                                 settings)
    return reports


def output_fidelity(parent: nn.Module, images: torch.Tensor) -> Any:
    """FastNAS's score on random weights: how close a subnet's logits stay to the parent's (minus their MSE).

    FastNAS ranks every width choice by how much the score drops with it (its sensitivity map)
    and then bisects a threshold on that drop. A score that does not see the subnet (the
    parameter count: ModelOpt's dynamic modules keep their full weights and slice them in
    the forward) drops by zero everywhere, and the search returned the smallest subnet, 6% of
    the MACs for a 50% constraint.
    """
    with torch.no_grad():
        reference = parent.eval()(images)

    def score(model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return -float(torch.nn.functional.mse_loss(model(images), reference))

    return score


def part_speed(args: argparse.Namespace) -> None:
    size = (3, 224, 224)
    example = torch.randn(1, *size)
    torch.manual_seed(0)
    import torchvision

    base = torchvision.models.resnet50().eval()
    base_macs = count_macs(base, example)[0]
    base_outputs = layer_outputs(base, example)
    synthetic = [torch.randn(8, *size, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    children, seconds = {}, {}
    children["kpc --budget-ratio 0.5 --runtime ort-cpu"], seconds["kpc --budget-ratio 0.5 --runtime ort-cpu"] = timed(
        lambda: kpc.prune(base, example, kpc.Budget(ratio=0.5, target={"runtime": "ort-cpu"}),
                          calibration=synthetic, bn_recalibrate=0).model)
    children["kpc --budget-ratio 0.5 --round-to 32"], seconds["kpc --budget-ratio 0.5 --round-to 32"] = timed(
        lambda: kpc.prune(base, example, kpc.Budget(ratio=0.5), calibration=synthetic, round_to=32,
                          bn_recalibrate=0).model)
    children["ModelOpt FastNAS flops 50%"], seconds["ModelOpt FastNAS flops 50%"] = timed(
        lambda: modelopt_fastnas(base, example, 0.5, synthetic, output_fidelity(base, synthetic[0][:4]),
                                 args.work / "modelopt-r50.pth"))

    def tp(importance: str) -> nn.Module:
        import torch_pruning as tp_lib

        def attempt(ratio: float) -> nn.Module:
            candidate = copy.deepcopy(base)
            if importance == "taylor":
                candidate.zero_grad()
                for images in synthetic:
                    candidate(images).logsumexp(1).sum().backward()
            scorer = tp_lib.importance.GroupTaylorImportance() if importance == "taylor" else \
                tp_lib.importance.GroupMagnitudeImportance(p=1)
            tp_lib.pruner.MetaPruner(candidate, example, importance=scorer, global_pruning=True, pruning_ratio=ratio,
                                     ignored_layers=[candidate.fc], round_to=8).step()
            return candidate.eval()

        low, high, best = 0.0, 0.95, None
        for _ in range(20):
            middle = (low + high) / 2
            candidate = attempt(middle)
            counted = count_macs(candidate, example)[0]
            if counted > 0.5 * base_macs:
                low = middle
                continue
            best = candidate
            if counted >= 0.495 * base_macs:
                break
            high = middle
        return best

    for importance in ("magnitude", "taylor"):
        name = f"Torch-Pruning global {importance}, ratio bisected"
        children[name], seconds[name] = timed(lambda importance=importance: tp(importance))
    lut_arms = set(filter(None, args.lut_arms.split(",")))
    for runtime in filter(None, args.lut_runtimes.split(",")):
        # The table is measured once per machine (not counted).
        table_path = args.work / f"r50-{runtime}-{args.threads}t.json"
        table = kpc.load_table(table_path) if table_path.is_file() else \
            kpc.profile(base, example, runtime=runtime, threads=args.threads, out=table_path)
        if "flops" in lut_arms:
            # the same FLOPs budget, the table breaking near-ties toward the runtime's speed
            name = f"kpc --budget-gflops (50%) --lut ({runtime} table)"
            children[name], seconds[name] = timed(lambda table=table: kpc.prune(
                base, example, kpc.Budget(gflops=0.5 * base_macs / 1e9, table=table), calibration=synthetic,
                bn_recalibrate=0).model)
        if "latency" not in lut_arms:
            continue
        # kpc's latency budget at ModelOpt's measured latency: does a table of the runtime keep more of the model
        # (MACs) than a FLOPs search at the same speed?
        over = run_bench(ModelSide(base, size, "baseline"), ModelSide(children["ModelOpt FastNAS flops 50%"], size,
                                                                       "ModelOpt"),
                         BenchSettings(runtime=runtime, threads=args.threads, iters=args.iters))["speedup"]["ratio"]
        name = f"kpc --lut ({runtime} table) --budget-ratio {1 / over:.3f} (ModelOpt's measured latency ratio)"
        children[name], seconds[name] = timed(lambda table=table, over=over: kpc.prune(
            base, example, kpc.Budget(ratio=1 / over, table=table), calibration=synthetic, bn_recalibrate=0).model)
    reports = speedups(base, children, size, args.runtimes.split(","), args.threads, args.iters)
    rows = []
    for name, child in children.items():
        row = [name, f"{seconds[name]:.0f}", f"{count_macs(child, example)[0] / base_macs:.4f}",
               f"{layer_outputs(child, example) / base_outputs:.3f}"]
        for runtime in args.runtimes.split(","):
            s = reports[(name, runtime)]["speedup"]
            row.append(f"{s['ratio']:.2f}x ({s['ci_low']:.2f}-{s['ci_high']:.2f})")
        rows.append(row)
        print(" | ".join(row), flush=True)
    versus = []
    ours = [n for n in children if n.startswith("kpc")]
    for runtime in args.runtimes.split(","):
        settings = BenchSettings(runtime=runtime, threads=args.threads, iters=args.iters)
        for name in ours:
            report = run_bench(ModelSide(children["ModelOpt FastNAS flops 50%"], size, "ModelOpt"),
                               ModelSide(children[name], size, name), settings)
            s = report["speedup"]
            versus.append([name, runtime, f"{s['ratio']:.3f}x", f"{s['ci_low']:.3f}-{s['ci_high']:.3f}",
                           "met" if s["ratio"] >= 1.0 else "NOT met"])
            print(" | ".join(versus[-1]), flush=True)
    headers = ["pruner (ResNet-50, 224, random init, 50% FLOPs)", "CPU-s to prune", "MACs / unpruned",
               "layer outputs / unpruned",
               *[f"speedup on {r} (95% CI)" for r in args.runtimes.split(",")]]
    if not args.no_record:
        append_results("Peers on speed: ResNet-50 at half its FLOPs (issue 15)", headers, rows, threads=args.threads,
                       notes=["CPU seconds of each pruner's call in this process (all threads; imports excluded); "
                              "(--lut arms: the table's profiling not counted); "
                              "synthetic calibration, 2 batches of 8 for the Taylor pruners; ModelOpt FastNAS scores "
                              "a subnet by minus the MSE of its logits to the parent's on 4 of those images",
                              f"speedups: {args.iters} runs per model in alternating blocks, serving sessions",
                              "layer outputs: elements written by every conv and linear layer for one image (the "
                              "activation traffic that MACs do not count)"])
        append_results("kpc's ResNet-50 against ModelOpt's at 50% FLOPs (issue 15)",
                       ["kpc plan", "runtime", "kpc speed / ModelOpt speed", "95% CI", "target >= 1.00"], versus,
                       threads=args.threads, notes=["both children timed against each other in alternating blocks"])


class LadderPoint(NamedTuple):
    ratio: float
    versus: dict[str, Any]  # the child's speed against ModelOpt's child (run_bench's "speedup")
    val: float
    test: float
    recalibrated: nn.Module
    row: int  # its row in the table


def part_accuracy(args: argparse.Namespace) -> None:
    """Each kpc setting pruned along a ladder of budgets; the one compared is the most accurate on validation
    among those that run at least as fast as ModelOpt's child (both timed interleaved)."""
    parent = teacher(args.work, epochs=args.teacher_epochs)
    base = parent.model.eval()
    example = torch.randn(1, *SIZE)
    base_macs = macs(base)
    calibration = batches("train", 8, seed=0)
    bn = batches("train", 20, seed=1)
    val_subset = Subset(dataset("val"), range(1000))
    settings = BenchSettings(runtime="ort-cpu", threads=args.threads, iters=args.accuracy_iters)

    def score(model: nn.Module) -> float:
        model.eval()
        correct = seen = 0
        with torch.no_grad():
            for images, labels in DataLoader(val_subset, batch_size=500):
                correct += int((model(images).argmax(1) == labels).sum())
                seen += len(labels)
        return correct / seen

    reference = "ModelOpt FastNAS flops 50%"
    modelopt, modelopt_seconds = timed(lambda: modelopt_fastnas(
        base, example, 0.5, [images for images, _labels in bn], score, args.work / "modelopt-r18.pth"))
    over_teacher = run_bench(ModelSide(base, SIZE, "teacher"), ModelSide(modelopt, SIZE, reference),
                             settings)["speedup"]
    more = batches("train", 32, seed=0)
    arms = [("kpc (defaults)", kpc.PruneSettings(), calibration),
            ("kpc (defaults) --calib-batches 32", kpc.PruneSettings(calib_batches=32), more),
            ("kpc --sensitivity 0 (summed Taylor values)", kpc.PruneSettings(sensitivity=0), calibration)]
    if args.only:
        arms = [arm for arm in arms if any(part in arm[0] for part in args.only.split(","))]
    if args.skip:
        arms = [arm for arm in arms if not any(part in arm[0] for part in args.skip.split(","))]
    table = None
    if args.accuracy_lut:
        table_path = args.work / f"teacher-e{args.teacher_epochs}-ort-cpu-{args.threads}t.json"
        table = kpc.load_table(table_path) if table_path.is_file() else \
            kpc.profile(base, example, runtime="ort-cpu", threads=args.threads, out=table_path)
        arms.append(("kpc (defaults) --lut (ort-cpu table)", kpc.PruneSettings(), calibration))
    ladder = [float(value) for value in args.ladder.split(",")]

    def evaluate(model: nn.Module) -> tuple[nn.Module, float, float]:
        recalibrated = copy.deepcopy(model)
        recalibrate_batchnorm(recalibrated, bn, len(bn))
        return recalibrated, accuracy(recalibrated, "val"), accuracy(recalibrated, "test")

    modelopt_bn, modelopt_val, modelopt_test = evaluate(modelopt)
    rows = [[reference, "flops 50%", f"{modelopt_seconds:.0f}", f"{macs(modelopt) / base_macs:.3f}",
             "1 (itself)", f"{modelopt_val:.2f}", f"{modelopt_test:.2f}", "reference"]]
    print(" | ".join(rows[-1]), f"(over the teacher {over_teacher['ratio']:.2f}x)", flush=True)
    for importance, uniform in (("magnitude", True), ("taylor", False)):
        name = f"Torch-Pruning {'uniform' if uniform else 'global'} {importance}"
        child, seconds = timed(lambda importance=importance, uniform=uniform: tp_prune(
            base, base_macs * 0.5, importance=importance, global_pruning=not uniform, calibration=calibration))
        versus = run_bench(ModelSide(modelopt, SIZE, reference), ModelSide(child, SIZE, name), settings)["speedup"]
        _recalibrated, val, test = evaluate(child)
        rows.append([name, "flops 50% (ratio bisected)", f"{seconds:.0f}", f"{macs(child) / base_macs:.3f}",
                     f"{versus['ratio']:.3f}x ({versus['ci_low']:.3f}-{versus['ci_high']:.3f})", f"{val:.2f}",
                     f"{test:.2f}", ""])
        print(" | ".join(rows[-1]), flush=True)
    verdicts, tuned = [], {reference: finetune(modelopt_bn, reference, args)}
    for label, prune_settings, data in arms:
        points = []
        with_table = "--lut" in label
        for ratio in ladder:
            budget = kpc.Budget(gflops=ratio * base_macs / 1e9, table=table) if with_table else \
                kpc.Budget(ratio=ratio, target={"runtime": "ort-cpu"})
            child, seconds = timed(lambda budget=budget, prune_settings=prune_settings, data=data: kpc.prune(
                base, example, budget, calibration=data, bn_recalibrate=0, settings=prune_settings).model)
            versus = run_bench(ModelSide(modelopt, SIZE, reference), ModelSide(child, SIZE, label),
                               settings)["speedup"]
            recalibrated, val, test = evaluate(child)
            points.append(LadderPoint(ratio, versus, val, test, recalibrated, len(rows)))
            asked = f"--budget-gflops ({ratio:g} of the teacher's)" if with_table else \
                f"--budget-ratio {ratio:g} --runtime ort-cpu"
            rows.append([label, asked, f"{seconds:.0f}",
                         f"{macs(child) / base_macs:.3f}",
                         f"{versus['ratio']:.3f}x ({versus['ci_low']:.3f}-{versus['ci_high']:.3f})",
                         f"{val:.2f}", f"{test:.2f}", ""])
            print(" | ".join(rows[-1]), flush=True)
        fast_enough = [point for point in points if point.versus["ratio"] >= 1.0]
        if not fast_enough:
            verdicts.append([label, "no budget of the ladder ran at ModelOpt's speed", "-", "-", "-", "-",
                             "NOT met"])
            continue
        best = max(fast_enough, key=lambda point: point.val)
        rows[best.row][-1] = "chosen"
        name = f"{label} --budget-ratio {best.ratio:g}"
        tuned[name] = finetune(best.recalibrated, name, args)
        verdicts.append([label, f"--budget-ratio {best.ratio:g}", f"{best.versus['ratio']:.3f}x", f"{best.test:.2f}",
                         f"{modelopt_test:.2f}", f"{tuned[name]:.2f} / {tuned[reference]:.2f}",
                         "met" if best.test >= modelopt_test else "NOT met"])
        print(" | ".join(verdicts[-1]), flush=True)
    headers = ["pruner (ResNet-18 Fashion-MNIST teacher)", "budget", "CPU-s", "MACs / teacher",
               "speed / ModelOpt's (>1: faster; 95% CI)", "val top-1 one-shot", "test top-1 one-shot",
               "at ModelOpt's latency"]
    verdict_headers = ["kpc setting", "chosen on validation (fastest enough, most accurate)",
                       "speed / ModelOpt's", "kpc test top-1 one-shot", "ModelOpt's test top-1 one-shot",
                       f"test top-1 after {args.epochs} epochs, kpc / ModelOpt",
                       "target: kpc >= ModelOpt at its latency"]
    print(" | ".join(verdict_headers))
    if not args.no_record:
        teacher_test = accuracy(base, "test")
        notes = [f"teacher ({teacher_description(args.teacher_epochs)}) test {teacher_test:.2f}%",
                 "BatchNorm re-estimated on the same 20 batches of 32 for every child; one-shot = no fine-tune; "
                 f"fine-tune: cross-entropy, kpc.train.fit, {args.epochs} epochs on {args.subset} training images, "
                 f"lr {args.lr}, seed 0 (chosen children and ModelOpt's only)",
                 "ModelOpt's score: top-1 on 1,000 validation images (last 5,000 training images)",
                 f"speeds: ort-cpu, batch 1, serving sessions, {args.accuracy_iters} runs per model in alternating "
                 f"blocks (95% interval); ModelOpt's child over the teacher {over_teacher['ratio']:.2f}x",
                 "chosen: of each setting's ladder, the child with the best validation top-1 among those "
                 "whose median speed is at least ModelOpt's child's; the test split is reported"]
        append_results("Peers on accuracy at a measured latency (issue 15)", headers, rows, threads=args.threads,
                       notes=notes)
        append_results("kpc against ModelOpt at ModelOpt's measured latency (issue 15)", verdict_headers,
                       verdicts, threads=args.threads, notes=notes[:1])


def finetune(model: nn.Module, name: str, args: argparse.Namespace) -> float:
    frozen = copy.deepcopy(model)
    plan = Plan(kind="model", model={"source": "user", "class": name}, input_size=SIZE)
    loaded = LoadedModel(model, plan, name, None, None, lambda: copy.deepcopy(frozen))
    out = args.work / "peers" / "".join(c if c.isalnum() else "-" for c in name)
    settings = replace(TRAIN_DEFAULTS, data=parse_data_spec("fashion-mnist"), epochs=args.epochs, lr=args.lr,
                       warmup_epochs=0.0, subset=args.subset, seed=0, threads=args.threads,
                       adaptive_threads=False)
    result = fit(loaded, settings, out, overwrite=True)
    return accuracy(result.model, "test")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/kpc-bench"))
    parser.add_argument("--part", choices=("speed", "accuracy", "both"), default="both")
    parser.add_argument("--runtimes", default="ort-cpu,torch-cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=15_000)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--only", help="accuracy part: comma-separated substrings of the kpc settings to run "
                        "('defaults', 'sensitivity'); ModelOpt's always")
    parser.add_argument("--skip", help="accuracy part: comma-separated substrings of the kpc settings not to run")
    parser.add_argument("--lut-runtimes", default="",
                        help="speed part: also prune kpc with a latency table of these runtimes (profiled into --work "
                        "if missing): see --lut-arms")
    parser.add_argument("--lut-arms", default="flops,latency",
                        help="speed part, with --lut-runtimes: 'flops' (--budget-gflops at 50%% with the table "
                        "breaking near-ties toward speed), 'latency' (a latency budget at ModelOpt's measured ratio)")
    parser.add_argument("--accuracy-lut", action="store_true",
                        help="accuracy part: also an arm of FLOPs budgets with an ort-cpu table of the teacher "
                        "(profiled into --work if missing)")
    parser.add_argument("--ladder", default="0.4,0.45,0.5,0.55",
                        help="accuracy part: the FLOPs ratios each kpc setting is pruned to")
    parser.add_argument("--accuracy-iters", type=int, default=2000,
                        help="accuracy part: runs per model when timing a child against ModelOpt's (sub-ms models)")
    parser.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS,
                        help="accuracy part: the teacher's schedule (30: the published teacher; fewer train faster)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    # kpc's own account of each prune (closed-loop rounds, sensitivity progress) in the benchmark's log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("modelopt", "torch", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.part in ("speed", "both"):
        part_speed(args)
    if args.part in ("accuracy", "both"):
        part_accuracy(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
