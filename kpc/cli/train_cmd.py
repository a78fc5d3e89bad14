"""`kpc train` and `kpc distill`: thin views over kpc.train.fit (same trainer, with or without a teacher)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kpc.cli._common import InputSizeOpt, NumClassesOpt, WeightsOpt, err_console, handle_errors, log


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("distill")(distill_command)


DataOpt = Annotated[str, typer.Option("--data", help="fashion-mnist[:PATH], cifar10:PATH or imagefolder:PATH "
                                      "(with train/ and val/).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Artifact directory to write (checkpoints go to OUT.work/).")]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=1)]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Global batch (split over torchrun processes).")]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="sgd (Nesterov, momentum 0.9) or adamw.")]
WdOpt = Annotated[float, typer.Option("--weight-decay")]
WarmupOpt = Annotated[float, typer.Option("--warmup-epochs", help="Linear warm-up before the cosine decay.")]
SmoothOpt = Annotated[float, typer.Option("--label-smoothing")]
SeedOpt = Annotated[int, typer.Option("--seed")]
SubsetOpt = Annotated[int | None, typer.Option("--subset", help="Train on the first N images, validate on N/5.")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="Loader processes (default 2 for imagefolder, "
                                                "0 for in-memory datasets).")]
AmpOpt = Annotated[str, typer.Option("--amp", help="auto (bf16/fp16 on CUDA, off on CPU), off, bf16 or fp16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda.")]
KeepOpt = Annotated[str, typer.Option("--keep", help="Weights the artifact gets: last or best (val accuracy).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in OUT.work/.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace --out and any unfinished run.")]


@handle_errors
def train_command(
    model: Annotated[str, typer.Argument(help="torchvision:NAME, timm:NAME, path/file.py:factory or an artifact dir.")],
    out: OutOpt,
    data: DataOpt = "fashion-mnist",
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    input_size: InputSizeOpt = None,
    epochs: EpochsOpt = 10,
    batch_size: BatchOpt = 128,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (default 0.1 sgd, 0.001 adamw).")] = 0.0,
    optimizer: OptimizerOpt = "sgd",
    weight_decay: WdOpt = 5e-4,
    warmup_epochs: WarmupOpt = 1.0,
    label_smoothing: SmoothOpt = 0.0,
    seed: SeedOpt = 0,
    subset: SubsetOpt = None,
    workers: WorkersOpt = None,
    amp: AmpOpt = "auto",
    device: DeviceOpt = "auto",
    keep: KeepOpt = "last",
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train a model from scratch (or from --weights) and save it as an artifact kpc prune/distill accept."""
    import torch

    from kpc.artifact import is_artifact, open_model
    from kpc.data import dataset_num_classes, native_input_size, parse_data_spec
    from kpc.specs import parse_input_size
    from kpc.train import TrainSettings

    spec = parse_data_spec(data)
    size = parse_input_size(input_size)
    classes = num_classes
    if not is_artifact(model):  # a fresh spec is built for the dataset unless told otherwise
        size = size or native_input_size(spec)
        classes = classes if classes is not None else dataset_num_classes(spec)
    settings = TrainSettings(spec, epochs=epochs, batch_size=batch_size, lr=lr or _default_lr(optimizer),
                             optimizer=optimizer, weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                             label_smoothing=label_smoothing, seed=seed, subset=subset, workers=workers, amp=amp,
                             device=device, keep=keep)
    settings.check()
    torch.manual_seed(seed)  # the initial weights of a from-scratch run depend on --seed only
    loaded = open_model(model, weights=weights, num_classes=classes, input_size=size)
    _run(loaded, settings, out, None, resume, overwrite)


@handle_errors
def distill_command(
    child: Annotated[str, typer.Argument(help="The pruned child: an artifact directory.")],
    teacher: Annotated[str, typer.Option("--teacher", help="Its unpruned parent: an artifact directory.")],
    out: OutOpt,
    data: DataOpt = "fashion-mnist",
    epochs: EpochsOpt = 5,
    ikd_weight: Annotated[float, typer.Option("--ikd-weight", help="Weight of the inner (per-stage feature MSE) "
                                              "loss (5 beat 1 in the Fashion-MNIST sweep).")] = 5.0,
    kd_weight: Annotated[float, typer.Option("--kd-weight", help="Weight of logit KD (KL at --temperature, "
                                             "x T^2).")] = 0.0,
    temperature: Annotated[float, typer.Option("--temperature")] = 4.0,
    batch_size: BatchOpt = 128,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (default 0.01 sgd, 0.0005 adamw).")] = 0.0,
    optimizer: OptimizerOpt = "sgd",
    weight_decay: WdOpt = 5e-4,
    warmup_epochs: WarmupOpt = 0.0,
    label_smoothing: SmoothOpt = 0.0,
    seed: SeedOpt = 0,
    subset: SubsetOpt = None,
    workers: WorkersOpt = None,
    amp: AmpOpt = "auto",
    device: DeviceOpt = "auto",
    keep: KeepOpt = "last",
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Fine-tune a pruned child under its frozen parent: cross-entropy + inner distillation (+ logit KD)."""
    from kpc.artifact import open_model
    from kpc.data import parse_data_spec
    from kpc.train import TrainSettings

    settings = TrainSettings(parse_data_spec(data), epochs=epochs, batch_size=batch_size,
                             lr=lr or _default_lr(optimizer) / 10, optimizer=optimizer, weight_decay=weight_decay,
                             warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, seed=seed, subset=subset,
                             ikd_weight=ikd_weight, kd_weight=kd_weight, temperature=temperature, workers=workers,
                             amp=amp, device=device, keep=keep)
    settings.check()
    _run(open_model(child), settings, out, open_model(teacher), resume, overwrite)


def _default_lr(optimizer: str) -> float:
    return 0.001 if optimizer == "adamw" else 0.1


def _run(loaded: Any, settings: Any, out: Path, teacher: Any, resume: bool, overwrite: bool) -> None:
    from kpc.train import fit

    main = int(os.environ.get("RANK", "0")) == 0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=err_console,
                  transient=True, disable=not main) as progress:
        result = fit(loaded, settings, out, teacher=teacher, resume=resume, overwrite=overwrite,
                     reporter=_RichReporter(progress), log=log)
    if main:
        m = result.plan["metrics"]
        log(f"{'distilled' if teacher is not None else 'trained'} {loaded.source}: val accuracy "
            f"{m['last_val_acc']:.4f} (best {m['best_val_acc']:.4f} at epoch {m['best_epoch']}) after "
            f"{m['epochs']} epochs; wrote {out}")


class _RichReporter:
    """Progress bar per epoch with loss, accuracy and throughput; one summary line per epoch (stderr)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: Any = None

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"epoch {epoch + 1}/{epochs}", total=steps, status="")

    def step(self, loss: float, accuracy: float, images_per_s: float) -> None:
        self.progress.update(self.task, advance=1,
                             status=f"loss {loss:.4f}  acc {accuracy:.3f}  {images_per_s:.0f} img/s")

    def epoch_end(self, row: dict[str, Any]) -> None:
        parts = "  ".join(f"{k.removeprefix('train_')} {row[k]:.4f}" for k in ("train_ce", "train_ikd", "train_kd")
                          if k in row)
        extra = f"  val_ikd {row['val_ikd']:.4f}" if "val_ikd" in row else ""
        self.progress.console.print(
            f"epoch {row['epoch']}: {parts}  train_acc {row['train_acc']:.4f}  val_acc {row['val_acc']:.4f}  "
            f"val_loss {row['val_loss']:.4f}{extra}  lr {row['lr']:.3g}  {row['images_per_s']:.0f} img/s",
            markup=False, highlight=False)
