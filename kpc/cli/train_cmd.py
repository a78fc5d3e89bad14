"""`kpc train` and `kpc distill`: thin views over kpc.train.fit (same trainer, with or without a teacher)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from kpc.cli._common import (
    InputSizeOpt,
    ModelFileOpt,
    NumClassesOpt,
    PretrainedOpt,
    WeightsOpt,
    flag,
    handle_errors,
    log,
    output_path,
)
from kpc.train.loop import DISTILL_DEFAULTS, TRAIN_DEFAULTS, default_lr


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("distill")(distill_command)


T = TRAIN_DEFAULTS


def _lr_help(defaults: Any) -> str:
    # parentheses, not square brackets: rich reads "[default: ...]" in a help text as markup and drops it
    return (f"Peak learning rate (default: {default_lr('sgd', defaults):g} for sgd, "
            f"{default_lr('adamw', defaults):g} for adamw).")
D = DISTILL_DEFAULTS
DataOpt = Annotated[str, typer.Option("--data", help="fashion-mnist[:PATH], cifar10:PATH or imagefolder:PATH "
                                      "(with train/ and val/).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", parser=output_path,
                                      help="Artifact directory to write (checkpoints go to OUT.work/).")]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=1, help="Passes over the training split.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=2, help="Global batch (split over torchrun processes).")]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="sgd (Nesterov, momentum 0.9) or adamw.")]
WdOpt = Annotated[float, typer.Option("--weight-decay", help="L2 weight decay (decoupled for adamw).")]
WarmupOpt = Annotated[float, typer.Option("--warmup-epochs", help="Linear warm-up before the cosine decay.")]
SmoothOpt = Annotated[float, typer.Option("--label-smoothing", help="Label smoothing of the cross-entropy, in "
                                          "[0, 1).")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=2**63 - 1, help="Seed of the initial weights, data order "
                                      "and augmentation.")]
SubsetOpt = Annotated[int | None, typer.Option("--subset", help="Train on the first N images, validate on N/5.")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="Loader processes (default 2 for imagefolder, "
                                                "0 for in-memory datasets).")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="Intra-op CPU threads, pinned (default: every core, "
                                                "but one above 2 cores, dropping to 1 when the cores are "
                                                "oversubscribed).")]
AmpOpt = Annotated[str, typer.Option("--amp", help="auto (bf16/fp16 on CUDA, off on CPU), off, bf16 or fp16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
KeepOpt = Annotated[str, typer.Option("--keep", help="Weights the artifact gets: last or best (val accuracy).")]
ResumeOpt = Annotated[bool, flag("--resume", help="Continue from the last checkpoint in OUT.work/.")]
OverwriteOpt = Annotated[bool, flag("--overwrite", help="Replace --out and any unfinished run.")]


@handle_errors
def train_command(
    model: Annotated[str, typer.Argument(help="torchvision:NAME, timm:NAME, path/file.py:factory or an artifact dir.")],
    out: OutOpt,
    data: DataOpt = "fashion-mnist",
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    input_size: InputSizeOpt = None,
    pretrained: PretrainedOpt = False,
    model_file: ModelFileOpt = None,
    epochs: EpochsOpt = T.epochs,
    batch_size: BatchOpt = T.batch_size,
    lr: Annotated[float | None, typer.Option("--lr", help=_lr_help(T), show_default=False)] = None,
    optimizer: OptimizerOpt = T.optimizer,
    weight_decay: WdOpt = T.weight_decay,
    warmup_epochs: WarmupOpt = T.warmup_epochs,
    label_smoothing: SmoothOpt = T.label_smoothing,
    seed: SeedOpt = T.seed,
    subset: SubsetOpt = T.subset,
    workers: WorkersOpt = T.workers,
    threads: ThreadsOpt = T.threads,
    amp: AmpOpt = T.amp,
    device: DeviceOpt = T.device,
    keep: KeepOpt = T.keep,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train a model from scratch (or from --weights) and save it as an artifact kpc prune/distill accept."""
    import torch

    from kpc.artifact import is_artifact, open_model
    from kpc.data import dataset_num_classes, native_input_size, parse_data_spec
    from kpc.specs import parse_input_size

    spec = parse_data_spec(data)
    size = parse_input_size(input_size)
    classes = num_classes
    settings = replace(T, data=spec, epochs=epochs, batch_size=batch_size, lr=lr or default_lr(optimizer, T),
                       optimizer=optimizer, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                       label_smoothing=label_smoothing, seed=seed, subset=subset, workers=workers, threads=threads,
                       adaptive_threads=threads is None, amp=amp, device=device, keep=keep)
    settings.check()
    if not is_artifact(model):  # a fresh spec is built for the dataset unless told otherwise
        size = size or native_input_size(spec)
        classes = classes if classes is not None else dataset_num_classes(spec)
    torch.manual_seed(seed)  # the initial weights of a from-scratch run depend on --seed only
    loaded = open_model(model, weights=weights, num_classes=classes, input_size=size, pretrained=pretrained,
                        model_file=model_file)
    _run(loaded, settings, out, None, resume, overwrite)


@handle_errors
def distill_command(
    child: Annotated[str, typer.Argument(help="The pruned child: an artifact directory.")],
    teacher: Annotated[str, typer.Option("--teacher", help="Its unpruned parent: an artifact directory.")],
    out: OutOpt,
    data: DataOpt = "fashion-mnist",
    model_file: ModelFileOpt = None,
    epochs: EpochsOpt = D.epochs,
    ikd_weight: Annotated[float, typer.Option("--ikd-weight", help="Weight of the inner (per-stage feature MSE) "
                                              "loss (5 beat 1 in the Fashion-MNIST sweep).")] = D.ikd_weight,
    kd_weight: Annotated[float, typer.Option("--kd-weight", help="Weight of logit KD (KL at --temperature, "
                                             "x T^2).")] = D.kd_weight,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature of logit KD.")]
    = D.temperature,
    batch_size: BatchOpt = D.batch_size,
    lr: Annotated[float | None, typer.Option("--lr", help=_lr_help(D), show_default=False)] = None,
    optimizer: OptimizerOpt = D.optimizer,
    weight_decay: WdOpt = D.weight_decay,
    warmup_epochs: WarmupOpt = D.warmup_epochs,
    label_smoothing: SmoothOpt = D.label_smoothing,
    seed: SeedOpt = D.seed,
    subset: SubsetOpt = D.subset,
    workers: WorkersOpt = D.workers,
    threads: ThreadsOpt = D.threads,
    amp: AmpOpt = D.amp,
    device: DeviceOpt = D.device,
    keep: KeepOpt = D.keep,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Fine-tune a pruned child under its frozen parent: cross-entropy + inner distillation (+ logit KD)."""
    from kpc.artifact import open_model
    from kpc.data import parse_data_spec

    settings = replace(D, data=parse_data_spec(data), epochs=epochs, batch_size=batch_size,
                       lr=lr or default_lr(optimizer, D), optimizer=optimizer, weight_decay=weight_decay,
                       warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, seed=seed, subset=subset,
                       ikd_weight=ikd_weight, kd_weight=kd_weight, temperature=temperature, workers=workers,
                       threads=threads, adaptive_threads=threads is None, amp=amp, device=device, keep=keep)
    settings.check()
    _run(open_model(child, model_file=model_file), settings, out, open_model(teacher, model_file=model_file),
         resume, overwrite)


def _run(loaded: Any, settings: Any, out: Path, teacher: Any, resume: bool, overwrite: bool) -> None:
    from kpc.cli.progress import training
    from kpc.train import fit

    main = int(os.environ.get("RANK", "0")) == 0
    with training(enabled=main) as reporter:
        result = fit(loaded, settings, out, teacher=teacher, resume=resume, overwrite=overwrite, reporter=reporter)
    if main:
        m = result.plan.metrics or {}
        log(f"{'distilled' if teacher is not None else 'trained'} {loaded.source}: val accuracy "
            f"{m['last_val_acc']:.4f} (best {m['best_val_acc']:.4f} at epoch {m['best_epoch']}) after "
            f"{m['epochs']} epochs; wrote {out}")
