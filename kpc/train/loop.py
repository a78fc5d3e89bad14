"""The trainer behind `kpc train` and `kpc distill`: one loop, with or without a teacher.

A run is a pure function of its settings: the data order and augmentation depend only on
(seed, epoch, index), the learning rate only on the global step, and BatchNorm sees the
global batch. That is what lets a resumed run, a DDP run and a single-process run agree.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from exporters.runners.base import MAX_THREADS
from kpc.artifact import LoadedModel, derived_plan, save_artifact
from kpc.atomic import check_dir_target, check_writable, output_lock
from kpc.data import DataSpec, TrainingData, training_data
from kpc.errors import KpcError
from kpc.layout import runs_in_channels_last, set_memory_format
from kpc.modelcopy import copy_model
from kpc.plan import Plan
from kpc.train import checkpoint as ckpt
from kpc.train.distill import (
    Student,
    build_projections,
    check_teacher,
    fit_projections,
    inner_loss,
    logit_kd,
    tapped,
)
from kpc.train.distributed import (
    Context,
    GlobalBatches,
    all_sum,
    barrier,
    broadcast_flag,
    check_device,
    globalize_batchnorm,
    localize_batchnorm,
    setup,
    teardown,
)
from kpc.train.optim import OPTIMIZERS, build_optimizer, lr_at, set_lr
from kpc.train.threads import CoreWatch, apply_threads

log = logging.getLogger(__name__)

AMP_MODES = ("auto", "off", "bf16", "fp16")
PROJECTION_IMAGES = 256  # images whose features fit the child->parent projections before training


@dataclass
class TrainSettings:
    """Everything that defines a run (the resume check compares these, minus `RUNTIME_ONLY`).

    The defaults are those of `kpc train`; `DISTILL_DEFAULTS` holds `kpc distill`'s. The CLI
    options and the recipe's `train:`/`distill:` sections take their defaults from these two.
    """

    data: DataSpec | None = None
    epochs: int = 10
    batch_size: int = 128  # global: split over DDP processes
    lr: float = 0.1
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    seed: int = 0
    subset: int | None = None  # first N train images, first N/5 val images
    ikd_weight: float = 0.0
    kd_weight: float = 0.0
    temperature: float = 4.0
    keep: str = "last"  # which weights the artifact gets: "last" or "best" on the val split, the starting ones included
    amp: str = "auto"  # auto: bf16/fp16 autocast on CUDA, off on CPU
    device: str = "auto"
    workers: int | None = None  # None: 2 for imagefolder, 0 for in-memory arrays
    threads: int | None = None  # intra-op threads; None: see kpc.train.threads.default_threads
    adaptive_threads: bool = True  # drop to 1 thread when the cores are oversubscribed (off when --threads is given)

    RUNTIME_ONLY = ("workers", "device", "threads", "adaptive_threads")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["data"] = self.data.label() if self.data is not None else None
        return data

    def fingerprint(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_json().items() if k not in self.RUNTIME_ONLY}

    def check(self) -> None:
        """Every number at the boundary: one line naming the option, before any data or model is touched."""
        if self.data is None:
            raise KpcError("training needs labelled data: pass --data")
        _integer(self.epochs, "--epochs", 1)
        _integer(self.batch_size, "--batch-size", 2, "BatchNorm needs two images per batch")
        _integer(self.seed, "--seed", 0, high=2**63 - 1)
        if self.subset is not None:
            _integer(self.subset, "--subset", 2, "a training split needs two images at least")
        if self.workers is not None:
            _integer(self.workers, "--workers", 0)
        if self.threads is not None:
            _integer(self.threads, "--threads", 1, high=MAX_THREADS)
        _number(self.lr, "--lr", low=0.0, strict=True)
        _number(self.weight_decay, "--weight-decay", low=0.0)
        _number(self.warmup_epochs, "--warmup-epochs", low=0.0)
        _number(self.label_smoothing, "--label-smoothing", low=0.0, high=1.0)
        _number(self.ikd_weight, "--ikd-weight", low=0.0)
        _number(self.kd_weight, "--kd-weight", low=0.0)
        _number(self.temperature, "--temperature", low=0.0, strict=True)
        if self.optimizer not in OPTIMIZERS:
            raise KpcError(f"unknown optimizer {self.optimizer!r}: use {' or '.join(OPTIMIZERS)}")
        if self.amp not in AMP_MODES:
            raise KpcError(f"unknown --amp {self.amp!r}: use {', '.join(AMP_MODES)}")
        if self.keep not in ("last", "best"):
            raise KpcError(f"unknown --keep {self.keep!r}: use last or best")
        check_device(self.device)


def _integer(value: Any, name: str, low: int, why: str = "", high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise KpcError(f"{name} must be an integer {bound}{f' ({why})' if why else ''}, got {value!r}")


def _number(value: Any, name: str, *, low: float, high: float | None = None, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value > low if strict else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"in [{low:g}, {high:g})" if high is not None else f"{'>' if strict else '>='} {low:g}"
        raise KpcError(f"{name} must be a finite number {bound}, got {value!r}")


EXPLODING_TERM = 1e4  # a distillation term this many times the cross-entropy (or 1) drove the step that broke


def non_finite_loss(parts: dict[str, torch.Tensor], epoch: int, previous: dict[str, float] | None = None) -> str:
    """Which loss term went non-finite (or, in the step before, dwarfed the rest), and the advice that fits it.

    Advice to lower --lr was wrong where the inner-distillation term overflowed on a teacher
    whose features were huge (a teacher trained one epoch, logits near 1e6): its term read
    1e19 while the cross-entropy read 2, the step that followed broke the weights, and a
    lower rate only delayed the NaN into validation.
    """
    values = {name: float(value.detach()) for name, value in parts.items()}
    broken = [name for name, value in values.items() if not math.isfinite(value)]
    if previous and "ce" in broken:  # the cross-entropy broke after a step some distillation term dominated
        scale = EXPLODING_TERM * max(1.0, abs(previous.get("ce", 0.0)))
        huge = [name for name in ("ikd", "kd") if abs(previous.get(name, 0.0)) > scale]
        if huge:
            broken, values = huge, {**previous, "ce": previous.get("ce", float("nan"))}
    if broken and "ce" not in broken:
        names = {"ikd": ("inner-distillation", "--ikd-weight"), "kd": ("logit-distillation", "--kd-weight")}
        term, flag = names.get(broken[0], (broken[0], "--lr"))
        return (f"the {term} loss became {values[broken[0]]:.3g} in epoch {epoch + 1} while the cross-entropy is "
                f"{values['ce']:.3g}: the teacher's features or logits are too large to match (a teacher that is not "
                f"trained to convergence?); check the teacher's accuracy, or lower {flag} (0 turns the term off)")
    shown = values.get("ce", float("nan")) if "ce" in broken else sum(values.values())
    return f"the loss became {shown} in epoch {epoch + 1}: lower --lr"


def default_lr(optimizer: str, defaults: TrainSettings) -> float:
    """The peak learning rate when none is given: the defaults' for SGD, a hundredth of it for AdamW."""
    return defaults.lr / 100 if optimizer == "adamw" else defaults.lr


# keep="best": a child pruned with measured sensitivity can start close to its parent, and a short distillation
# at its peak rate then ends below its start (the demo's: 84.83% test straight after the prune, 81.92% after
# three epochs); the starting weights compete on validation, so `kpc distill` never hands back a worse child.
DISTILL_DEFAULTS = TrainSettings(epochs=5, lr=0.01, warmup_epochs=0.0, ikd_weight=5.0, kd_weight=1.0, keep="best")
TRAIN_DEFAULTS = TrainSettings()


class Reporter(Protocol):
    """What the loop tells a progress display (called on rank 0 only)."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, loss: float, accuracy: float, images_per_s: float) -> None: ...
    def epoch_end(self, row: dict[str, Any]) -> None: ...


@dataclass
class FitResult:
    model: nn.Module
    plan: Plan
    history: list[dict[str, Any]] = field(default_factory=list)
    out: Path | None = None


def model_outputs(model: nn.Module, example: torch.Tensor) -> int:
    """The model's number of logits, from one forward pass on the example input.

    The first forward pass of a run: a model that fails on the input (a user file's
    3-channel stem given 1x28x28 images) or returns something other than one tensor of
    logits is a user mistake, refused in one line before any data is read.
    """
    from kpc.safety import first_line
    from kpc.tracing import input_advice

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(example)
    except Exception as exc:
        raise KpcError(f"the model fails on an input of shape {tuple(example.shape)} ({first_line(exc)}): "
                       f"{input_advice(model)}") from exc
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        what = f"a tensor of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else \
            f"a {type(logits).__name__}"
        raise KpcError(f"the model returns {what}; kpc trains classifiers that return one tensor of logits "
                       "(batch, classes)")
    return int(logits.shape[-1])


def _autocast(settings: TrainSettings, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether fp16 gradient scaling is needed)."""
    mode = settings.amp
    if device.type != "cuda":
        if mode == "fp16":
            raise KpcError("--amp fp16 needs CUDA; on CPU only --amp bf16 is available")
        return (torch.bfloat16, False) if mode == "bf16" else (None, False)
    if mode == "off":
        return None, False
    if mode == "fp16" or (mode == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16, True
    return torch.bfloat16, False


class _Run:
    """State of one fit() call; methods are the loop's steps."""

    def __init__(self, loaded: LoadedModel, settings: TrainSettings, out: Path, teacher: LoadedModel | None,
                 context: Context, reporter: Reporter | None) -> None:
        self.loaded, self.settings, self.out, self.teacher = loaded, settings, Path(out), teacher
        self.context, self.reporter = context, reporter
        self.work = ckpt.work_dir_for(self.out)
        self.device = context.device
        self.threads = apply_threads(settings.threads)
        self.watch: CoreWatch | None = CoreWatch(self.threads, adaptive=settings.adaptive_threads) \
            if self.device.type == "cpu" else None
        self.dtype, scaled = _autocast(settings, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if scaled else None
        self.data = self._open_data()
        self.stages: list[str] = []
        self.channels_last = False  # NHWC batches: set where the model runs in it on a GPU (`_build_student`)
        self.student = self._build_student()
        self.optimizer = build_optimizer(self.student, settings.optimizer, settings.lr, settings.weight_decay)
        self.wrapped: nn.Module = self.student
        if context.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.student, device_ids=ids, broadcast_buffers=False)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.start_epoch = 0

    # ------------------------------------------------------------ set-up
    def _open_data(self) -> TrainingData:
        s = self.settings
        data = training_data(s.data, self.loaded.input_size, subset=s.subset, seed=s.seed)
        outputs = model_outputs(self.loaded.model, self.loaded.example_input())
        if outputs != data.num_classes:
            raise KpcError(f"the model has {outputs} outputs but {data.label} has {data.num_classes} classes: "
                           f"build it with --num-classes {data.num_classes}")
        if len(data.train) < s.batch_size:
            raise KpcError(f"the training split has {len(data.train)} images, fewer than --batch-size "
                           f"{s.batch_size}: lower --batch-size or raise --subset")
        return data

    def _build_student(self) -> Student:
        s = self.settings
        model = self.loaded.model
        projections: dict[str, nn.Module] = {}
        if self.teacher is not None:
            check_teacher(self.loaded, self.teacher)
            if s.ikd_weight > 0:
                torch.manual_seed(s.seed)  # projection init: the same on every rank and every resume
                self.stages, projections = build_projections(model, self.teacher.model, self.loaded.example_input())
            self.teacher.model.to(self.device).eval().requires_grad_(False)
        elif s.ikd_weight > 0 or s.kd_weight > 0:
            raise KpcError("--ikd-weight and --kd-weight need a --teacher")
        student = Student(model.requires_grad_(True), projections).to(self.device)  # it may have been a teacher
        if projections:
            assert self.teacher is not None
            residuals = fit_projections(student, self.teacher.model, self.stages, self._projection_batches())
            if self.context.is_main:
                shown = ", ".join(f"{stage} {100 * r:.1f}%" for stage, r in residuals.items())
                log.info(f"projections start at the least-squares fit; parent feature energy left unexplained: {shown}")
        globalize_batchnorm(student, self.context)
        if self.device.type == "cuda":  # NHWC: cuDNN's fast layout, where the model runs in it
            example = self.data.train[0][0][None].to(self.device)
            self.channels_last = runs_in_channels_last(model.eval(), example)
            if self.channels_last:
                set_memory_format(student, torch.channels_last)  # the projections too
        return student.train()

    def _projection_batches(self, images: int = PROJECTION_IMAGES, batch: int = 64) -> Iterator[torch.Tensor]:
        """The first training images (epoch 0's augmentation), the same on every rank and every resume."""
        train = self.data.train
        train.set_epoch(0)
        count = min(images, len(train))
        for start in range(0, count, batch):
            stacked = torch.stack([train[i][0] for i in range(start, min(count, start + batch))])
            yield stacked.to(self.device)

    def _loader(self, dataset: Any, *, train: bool) -> tuple[DataLoader, GlobalBatches]:
        s = self.settings
        workers = s.workers if s.workers is not None else (2 if s.data.kind == "imagefolder" else 0)
        sampler = GlobalBatches(len(dataset), s.batch_size, self.context, shuffle=train, seed=s.seed,
                                drop_last=train)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                            pin_memory=self.device.type == "cuda")
        return loader, sampler

    def prepare_work_dir(self, resume: bool, overwrite: bool) -> None:
        """Rank 0 checks the working directory; every rank then loads the same checkpoint."""
        exists = broadcast_flag(self.context, self.context.is_main and ckpt.has_checkpoint(self.work))
        if exists and not resume:
            if not overwrite:
                raise KpcError(f"{self.work} holds an unfinished run: pass --resume to continue it or --overwrite "
                               "to start over")
            barrier(self.context)
            if self.context.is_main:
                shutil.rmtree(self.work, ignore_errors=True)
            exists = False
        if exists:
            record = ckpt.load_checkpoint(self.work, self.student, self.optimizer)
            if record.get("settings") != self.settings.fingerprint():
                changed = sorted(k for k, v in self.settings.fingerprint().items()
                                 if record.get("settings", {}).get(k) != v)
                raise KpcError(f"the checkpoint in {self.work} was written with other settings "
                               f"({', '.join(changed)}): rerun with the same options or --overwrite")
            self.start_epoch = int(record["epoch"])
            self.history = list(record.get("history", []))
            self.best = dict(record.get("best", {}))
            if self.scaler is not None and record.get("scaler"):
                self.scaler.load_state_dict(record["scaler"])
            if self.context.is_main:
                ckpt.rewrite_metrics(self.work, self.history)
                log.info(f"resuming {self.out} from {self.work} after epoch {self.start_epoch}")
        elif self.context.is_main:
            self.work.mkdir(parents=True, exist_ok=True)
            (self.work / "metrics.jsonl").unlink(missing_ok=True)
        barrier(self.context)

    # ------------------------------------------------------------ steps
    def _cast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def _losses(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                                                            torch.Tensor]:
        s = self.settings
        parts: dict[str, torch.Tensor] = {}
        teacher_logits = None
        teacher_features: dict[str, torch.Tensor] = {}
        if self.teacher is not None:
            with torch.no_grad(), self._cast(), tapped(self.teacher.model, self.stages) as tap:
                teacher_logits = self.teacher.model(images)
                teacher_features = tap.take()
        with self._cast(), tapped(self.student.model, self.stages) as tap:
            logits = self.wrapped(images)
            child_features = tap.take()
        parts["ce"] = F.cross_entropy(logits.float(), labels, label_smoothing=s.label_smoothing)
        total = parts["ce"]
        if self.stages:
            parts["ikd"] = inner_loss(self.student, child_features, teacher_features, self.stages)
            total = total + s.ikd_weight * parts["ikd"]
        if teacher_logits is not None and s.kd_weight > 0:
            parts["kd"] = logit_kd(logits, teacher_logits, s.temperature)
            total = total + s.kd_weight * parts["kd"]
        return total, parts, logits

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        s = self.settings
        self.data.train.set_epoch(epoch)
        loader, sampler = self._loader(self.data.train, train=True)
        sampler.set_epoch(epoch)
        steps = len(sampler)
        total_steps = steps * s.epochs
        warmup = round(s.warmup_epochs * steps)
        self.student.train()
        if self.reporter is not None and self.context.is_main:
            self.reporter.epoch_start(epoch, s.epochs, steps)
        sums = {"loss": 0.0, "ce": 0.0, "ikd": 0.0, "kd": 0.0}
        correct = seen = 0
        lr = s.lr
        started = time.perf_counter()
        previous: dict[str, float] | None = None  # the last step's loss terms, to tell which one broke the weights
        for index, (images, labels) in enumerate(loader):
            lr = lr_at(epoch * steps + index, base=s.lr, total=total_steps, warmup=warmup)
            set_lr(self.optimizer, lr)
            images, labels = self._to_device(images, labels)
            total, parts, logits = self._losses(images, labels)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(total).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                total.backward()
                self.optimizer.step()
            if self.watch is not None and self.context.is_main:
                self.watch.step()
            if not torch.isfinite(total):
                raise KpcError(non_finite_loss(parts, epoch, previous))
            previous = {key: float(value.detach()) for key, value in parts.items()}
            loss_value = float(total.detach())
            sums["loss"] += loss_value * len(labels)
            for key, value in parts.items():
                sums[key] += float(value.detach()) * len(labels)
            batch_correct = int((logits.argmax(1) == labels).sum())
            correct += batch_correct
            seen += len(labels)
            if self.reporter is not None and self.context.is_main:
                rate = seen * self.context.world / max(1e-9, time.perf_counter() - started)
                self.reporter.step(loss_value, batch_correct / len(labels), rate)
        elapsed = time.perf_counter() - started
        keys = list(sums)
        reduced = all_sum(self.context, [sums[k] for k in keys] + [correct, seen])
        count = max(1.0, reduced[-1])
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
        shown = {"loss", "ce"} | ({"ikd"} if self.stages else set())
        shown |= {"kd"} if self.teacher is not None and s.kd_weight > 0 else set()
        row.update({f"train_{k}": reduced[i] / count for i, k in enumerate(keys) if k in shown})
        row["train_acc"] = reduced[-2] / count
        row["images_per_s"] = reduced[-1] / max(1e-9, elapsed)
        return row

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Val loss and top-1 accuracy (and, when distilling, the inner loss with both nets in eval mode)."""
        loader, _ = self._loader(self.data.val, train=False)
        self.student.eval()
        loss = correct = seen = inner = 0.0
        for images, labels in loader:
            images, labels = self._to_device(images, labels)
            with self._cast(), tapped(self.student.model, self.stages) as tap:
                logits = self.student(images)
                child_features = tap.take()
            if self.stages:
                assert self.teacher is not None
                with self._cast(), tapped(self.teacher.model, self.stages) as tap:
                    self.teacher.model(images)
                    inner += float(inner_loss(self.student, child_features, tap.take(), self.stages)) * len(labels)
            loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            correct += float((logits.argmax(1) == labels).sum())
            seen += len(labels)
        self.student.train()
        loss, correct, seen, inner = all_sum(self.context, [loss, correct, seen, inner])
        result = {"val_loss": loss / max(1.0, seen), "val_acc": correct / max(1.0, seen)}
        if self.stages:
            result["val_ikd"] = inner / max(1.0, seen)
        return result

    def mark_start(self) -> None:
        """With keep=best, the starting weights compete: evaluated once before the first epoch, as epoch 0."""
        if self.settings.keep != "best" or self.start_epoch != 0:
            return
        row = self.evaluate()
        self.best = {"epoch": 0, "val_acc": row["val_acc"]}
        if self.context.is_main:
            ckpt.save_best(self.work, self.student.model)
            log.info(f"starting weights: val_acc {row['val_acc']:.4f} (kept unless an epoch does better)")
        barrier(self.context)

    def end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        row.update(self.evaluate())
        self.history.append(row)
        improved = not self.best or row["val_acc"] > self.best["val_acc"]
        if improved:
            self.best = {"epoch": row["epoch"], "val_acc": row["val_acc"]}
        if self.context.is_main:
            if improved:
                ckpt.save_best(self.work, self.student.model)
            ckpt.append_metrics(self.work, row)
            state = {"settings": self.settings.fingerprint(), "history": self.history, "best": self.best,
                     "scaler": self.scaler.state_dict() if self.scaler is not None else None}
            ckpt.save_checkpoint(self.work, epoch + 1, self.student, self.optimizer, state)
            if self.reporter is not None:
                self.reporter.epoch_end(row)
        barrier(self.context)

    # ------------------------------------------------------------ result
    def result(self, kind: str, overwrite: bool) -> FitResult:
        s = self.settings
        model = localize_batchnorm(self.student.model).to("cpu").eval()
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.contiguous_format)
        if s.keep == "best" and (self.work / "best.safetensors").is_file():
            from kpc.weights import load_weights_file

            model = copy_model(model)
            load_weights_file(model, self.work / "best.safetensors")
            if self.best.get("epoch") == 0:
                log.warning(f"no epoch beat the starting weights on validation ({self.best['val_acc']:.4f}): the "
                            "artifact keeps them (--keep last for the last epoch's)")
        plan = derived_plan(self.loaded, kind)
        plan.normalization = self.data.normalization.to_json()
        plan.data = self.data.label
        last = self.history[-1] if self.history else {}
        plan.metrics = {"epochs": len(self.history), "best_val_acc": self.best.get("val_acc"),
                        "best_epoch": self.best.get("epoch"), "last_val_acc": last.get("val_acc"),
                        "last_val_loss": last.get("val_loss"), "kept": s.keep}
        plan.training = {**s.to_json(), "world_size": self.context.world, "device": self.device.type,
                         "autocast": str(self.dtype).replace("torch.", "") if self.dtype else None}
        if self.teacher is not None:
            plan.teacher = {"source": self.teacher.source, "stages": self.stages,
                            "weights_sha256": self.teacher.plan.weights.get("sha256")}
        plan.history = self.history
        if self.context.is_main:
            save_artifact(self.out, model, plan, overwrite=overwrite, factory=self.loaded.factory)
            ckpt.finish(self.work)
        barrier(self.context)
        return FitResult(model, plan, self.history, self.out)


def _module_state(module: nn.Module) -> tuple[bool, list[bool]]:
    return module.training, [p.requires_grad for p in module.parameters()]


def _restore_module_state(module: nn.Module, state: tuple[bool, list[bool]]) -> None:
    training, flags = state
    module.train(training)
    for parameter, flag in zip(module.parameters(), flags, strict=False):
        parameter.requires_grad_(flag)


def fit(loaded: LoadedModel, settings: TrainSettings, out: str | Path, *, teacher: LoadedModel | None = None,
        resume: bool = False, overwrite: bool = False, reporter: Reporter | None = None) -> FitResult:
    """Train `loaded` (under `teacher` when given) and write the artifact to `out`.

    Runs in one process, or under torchrun (WORLD_SIZE > 1) with DDP; only rank 0 writes,
    and holds the lock of `out` (and so of its `OUT.work/` checkpoints) for the whole run.
    """
    settings.check()
    out = Path(out)
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        check_dir_target(out, overwrite=overwrite)
        check_writable(out, need_bytes=3 * sum(p.numel() * p.element_size() for p in loaded.model.parameters()))
    work = ckpt.work_dir_for(out)
    had_work = work.exists()
    # The teacher is frozen while it teaches; the caller's module gets its flags and mode back (a frozen
    # parent left behind broke Torch-Pruning's graph, which it traces through autograd, in a later prune).
    teacher_state = _module_state(teacher.model) if teacher is not None else None
    with output_lock(out) if main else contextlib.nullcontext():
        context = setup(settings.device)
        try:
            run = _Run(loaded, settings, out, teacher, context, reporter)
            run.prepare_work_dir(resume, overwrite)
            run.mark_start()
            for epoch in range(run.start_epoch, settings.epochs):
                run.end_epoch(epoch, run.train_epoch(epoch))
            return run.result("distilled" if teacher is not None else "trained", overwrite)
        except BaseException:
            if main and not had_work:
                ckpt.remove_without_checkpoint(work)
            raise
        finally:
            teardown(context)
            if teacher is not None and teacher_state is not None:
                _restore_module_state(teacher.model, teacher_state)
