"""What every command shares: error mapping at the boundary, consoles, option aliases."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from kpc.errors import KpcError

# Piped or captured output gets a wide console so tables are never cut to 80 columns.
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
out_console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line on stderr and return the exit to raise."""
    err_console.print(f"kpc: error: {message}", markup=False, soft_wrap=True)
    return typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn user errors into one line on stderr and an exit code; KPC_DEBUG=1 keeps tracebacks."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except Exception as exc:
            code = _exit_code(exc)
            if code is None or os.environ.get("KPC_DEBUG"):
                raise
            raise fail(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, code) from None
        except KeyboardInterrupt:
            err_console.print("kpc: interrupted", markup=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _exit_code(exc: BaseException) -> int | None:
    if isinstance(exc, KpcError):
        return exc.exit_code
    try:
        from exporters.errors import ExporterError
    except ImportError:  # pragma: no cover - exporters ships with kpc
        return None
    if isinstance(exc, ExporterError):
        return int(getattr(exc, "exit_code", 2))
    return None


def log(message: str) -> None:
    err_console.print(message, markup=False, soft_wrap=True)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


WeightsOpt = Annotated[str | None, typer.Option("--weights", help="State dict to load (.pt/.pth or .safetensors).")]
NumClassesOpt = Annotated[int | None, typer.Option("--num-classes", help="Classifier outputs (default: the model's).")]
InputSizeOpt = Annotated[str | None, typer.Option("--input-size", help="CxHxW the model is built and costed for, "
                                                   "e.g. 3x224x224 (default: the model's).")]
