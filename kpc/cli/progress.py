"""What a person watching a long command sees: a rich progress bar on a terminal, one line per step otherwise.

Every stage that makes someone wait reports here: training and distillation (epoch, loss,
accuracy, images/s and the time left), profiling (points measured of all, time left), the
importance pass (batches). The library only calls the callbacks it is given; rendering is
the CLI's business.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from kpc.cli._common import err_console

LINE_EVERY_S = 20.0  # without a terminal: a progress line at most this often, so no stage is silent for long


def _progress(transient: bool = True) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=err_console, transient=transient,
                    disable=not err_console.is_terminal)


class TrainingReporter:
    """kpc.train's Reporter: a bar per epoch with loss, accuracy, images/s and ETA; one summary line per epoch."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: Any = None
        self.epoch = (0, 0)
        self.last_line = 0.0
        self.done = 0
        self.steps = 0

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.epoch, self.steps, self.done = (epoch + 1, epochs), steps, 0
        self.last_line = time.monotonic()
        self.task = self.progress.add_task(f"epoch {epoch + 1}/{epochs}", total=steps, status="")

    def step(self, loss: float, accuracy: float, images_per_s: float) -> None:
        self.done += 1
        status = f"loss {loss:.4f}  acc {accuracy:.3f}  {images_per_s:.0f} img/s"
        self.progress.update(self.task, advance=1, status=status)
        if not err_console.is_terminal and time.monotonic() - self.last_line > LINE_EVERY_S:
            self.last_line = time.monotonic()
            err_console.print(f"epoch {self.epoch[0]}/{self.epoch[1]}: step {self.done}/{self.steps}  {status}",
                              markup=False, highlight=False)

    def epoch_end(self, row: dict[str, Any]) -> None:
        parts = "  ".join(f"{k.removeprefix('train_')} {row[k]:.4f}" for k in ("train_ce", "train_ikd", "train_kd")
                          if k in row)
        extra = f"  val_ikd {row['val_ikd']:.4f}" if "val_ikd" in row else ""
        err_console.print(
            f"epoch {row['epoch']}/{self.epoch[1]}: {parts}  train_acc {row['train_acc']:.4f}  "
            f"val_acc {row['val_acc']:.4f}  val_loss {row['val_loss']:.4f}{extra}  lr {row['lr']:.3g}  "
            f"{row['images_per_s']:.0f} img/s", markup=False, highlight=False)


@contextlib.contextmanager
def training(enabled: bool = True) -> Iterator[TrainingReporter | None]:
    if not enabled:
        yield None
        return
    with _progress() as progress:
        yield TrainingReporter(progress)


@contextlib.contextmanager
def counting(description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """A callback `(done, total)` or `()` (one more) that moves a bar; off a terminal, a line every so often."""
    with _progress() as progress:
        task = progress.add_task(description, total=total, status="")
        state = {"done": 0, "last": time.monotonic()}

        def update(done: int | None = None, total_now: int | None = None) -> None:
            state["done"] = state["done"] + 1 if done is None else done
            progress.update(task, completed=state["done"], total=total_now if total_now is not None else total)
            if not err_console.is_terminal and time.monotonic() - state["last"] > LINE_EVERY_S:
                state["last"] = time.monotonic()
                shown = total_now if total_now is not None else total
                err_console.print(f"{description}: {state['done']}" + (f"/{shown}" if shown else ""),
                                  markup=False, highlight=False)

        yield update


class RichStageUI:
    """What `kpc run` and `kpc demo` show while a stage runs (see kpc.pipeline.StageUI)."""

    def trainer(self) -> contextlib.AbstractContextManager[TrainingReporter | None]:
        return training()

    def counter(self, description: str, total: int | None = None) -> contextlib.AbstractContextManager[Any]:
        return counting(description, total)
