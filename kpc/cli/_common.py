"""What every command shares: errors and signals mapped at the boundary, logging rendered, option types.

Errors: a user mistake (KpcError, an exporter's typed error) is one line on stderr and
exit 2 (1 when a verification said no); an interrupt is 130, SIGTERM 143 after the same
clean-up as Ctrl-C; anything else is a bug in kpc, reported in one line with exit 3 (set
KPC_DEBUG=1 for the traceback). The library logs through `logging`; the CLI renders it on
stderr (`-v` for detail, `-q` for warnings only).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from kpc.errors import KpcError

# Piped or captured output gets a wide console so tables are never cut to 80 columns.
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
out_console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
F = TypeVar("F", bound=Callable[..., Any])
INTERNAL_ERROR_EXIT = 3


class Terminated(BaseException):
    """SIGTERM (timeout, docker stop, Kubernetes): unwinds like Ctrl-C so temporary outputs are removed."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def install_signal_handlers() -> None:
    with contextlib.suppress(ValueError):  # not the main thread (e.g. a test runner's worker): nothing to install
        signal.signal(signal.SIGTERM, _on_sigterm)


def output_path(text: str) -> Path:
    """An output option's path; an empty one is refused (Path("") would silently mean the current directory)."""
    if not str(text).strip():
        raise typer.BadParameter("the path is empty: give a file or directory path")
    return Path(text)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line on stderr and return the exit to raise."""
    err_console.print(f"kpc: error: {message}", markup=False, soft_wrap=True)
    return typer.Exit(code)


def _first_line(exc: BaseException) -> str:
    """The message's first line; for an error torch re-raised from a data-loader worker, the worker's own.

    torch wraps it as "Caught KpcError in DataLoader worker process 0." followed by the
    worker's traceback, whose last line holds the message that says what to do.
    """
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "Original Traceback" in text:
        _, _, message = lines[-1].partition(": ")
        return message or lines[-1]
    return lines[0]


def handle_errors(func: F) -> F:
    """Turn errors into one line on stderr and an exit code; KPC_DEBUG=1 keeps tracebacks."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        install_signal_handlers()
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            err_console.print("kpc: interrupted", markup=False)
            raise typer.Exit(130) from None
        except Terminated:
            err_console.print("kpc: terminated (SIGTERM): temporary outputs removed", markup=False)
            raise typer.Exit(143) from None
        except Exception as exc:
            if os.environ.get("KPC_DEBUG"):
                raise
            code = _exit_code(exc)
            if code is None:
                raise fail(f"internal error: {type(exc).__name__}: {_first_line(exc)} (a bug in kpc: rerun with "
                           "KPC_DEBUG=1 for the traceback and report it)", INTERNAL_ERROR_EXIT) from None
            if is_out_of_memory(exc):
                raise fail(f"out of memory ({_first_line(exc)[:160]}): give a smaller --batch, --calib-batch-size, "
                           "--batch-size or --input-size, or run on a machine with more memory", code) from None
            raise fail(_first_line(exc), code) from None

    return wrapper  # type: ignore[return-value]


def _exit_code(exc: BaseException) -> int | None:
    if isinstance(exc, KpcError):
        return exc.exit_code
    from exporters.errors import ExporterError

    if isinstance(exc, ExporterError):
        return int(getattr(exc, "exit_code", 2))
    if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return 2  # a path the user gave that cannot be used
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno in (28, 30, 122):  # no space, read-only
        return 2
    if is_out_of_memory(exc):  # sizes the user chose (batch, input size, classes) that this machine cannot hold
        return 2
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, torch's CUDA OOM or its CPU allocator's refusal."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


class _RichHandler(logging.Handler):
    """The library's log records as plain lines on stderr (warnings prefixed), through rich's console."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record must never take a command down
            message = str(record.msg)
        if record.levelno >= logging.WARNING:
            message = f"WARNING: {message}"
        err_console.print(message, markup=False, soft_wrap=True, highlight=False)


_HANDLER = _RichHandler()


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    for name in ("kpc", "exporters"):
        logger = logging.getLogger(name)
        if _HANDLER not in logger.handlers:
            logger.addHandler(_HANDLER)
        logger.setLevel(level)
        logger.propagate = False


def log(message: str) -> None:
    """A line of the command's own (not the library's) narration on stderr."""
    if logging.getLogger("kpc").level <= logging.INFO:
        err_console.print(message, markup=False, soft_wrap=True)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


class Runtime(StrEnum):
    ort_cpu = "ort-cpu"
    ort_cuda = "ort-cuda"
    torch_cpu = "torch-cpu"
    torch_cuda = "torch-cuda"
    trt = "trt"


class Importance(StrEnum):
    auto = "auto"
    taylor = "taylor"
    magnitude = "magnitude"
    taylor_signed = "taylor-signed"
    taylor_normalized = "taylor-normalized"
    consumer_l2 = "consumer-l2"


class ImportancePrecision(StrEnum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Solver(StrEnum):
    exact = "exact"
    greedy = "greedy"


class Precision(StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"


def value(choice: Any) -> Any:
    """An enum option's string (Typer passes enum members), or the value itself."""
    return choice.value if isinstance(choice, Enum) else choice


def flag(*names: str, **options: Any) -> Any:
    """A boolean option shown without a value placeholder in --help (it takes none)."""
    return typer.Option(*names, metavar="", **options)


WeightsOpt = Annotated[str | None, typer.Option("--weights", help="State dict to load (.pt/.pth or .safetensors).")]
NumClassesOpt = Annotated[int | None, typer.Option("--num-classes", help="Classifier outputs (default: the model's).")]
InputSizeOpt = Annotated[str | None, typer.Option("--input-size", help="CxHxW the model is built and costed for, "
                                                   "e.g. 3x224x224 (default: the model's).")]
PretrainedOpt = Annotated[bool, flag("--pretrained", help="torchvision/timm: load the registry's pretrained "
                                             "weights from the local cache.")]
ModelFileOpt = Annotated[str | None, typer.Option("--model-file", help="FILE.py:factory that builds the architecture "
                                                  "of an artifact made from a Python file (kpc never runs code an "
                                                  "artifact names).")]
