"""The `kpc` command line: one thin module per command over the library functions."""

from __future__ import annotations

import re
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from kpc import __version__
from kpc.cli._common import flag


class OneLineErrors(TyperGroup):
    """Command-line usage errors (an unknown choice, a number out of range) in one line, like every kpc error.

    Typer's documented `cls=` hook: parsing runs as usual, only the way a click usage
    error is shown changes (one line on stderr, exit 2, instead of a boxed usage panel).
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        from kpc.cli._common import err_console

        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            err_console.print("kpc: aborted", markup=False)
            sys.exit(1)
        except typer.TyperException as exc:  # click's usage errors (Typer's public base class of them)
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
                typer.echo(ctx.get_help())
                sys.exit(0)
            command = ctx.command_path if ctx is not None else "kpc"
            message = _readable(exc)
            err_console.print(f"kpc: error: {' '.join(message.split())} (see {command} --help)", markup=False,
                              soft_wrap=True)
            sys.exit(int(getattr(exc, "exit_code", 2)))
        sys.exit(result if isinstance(result, int) else 0)


def _readable(exc: Exception) -> str:
    """Click's message, with a bad choice said the way kpc says it: what was given and what exists."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = message.replace("Value error, ", "")
    choice = re.search(r"'(?P<value>[^']*)' is not one of (?P<choices>.+?)\.?$", message)
    param = getattr(exc, "param", None)
    if choice is not None and param is not None and getattr(param, "name", None):
        names = ", ".join(re.findall(r"'([^']*)'", choice["choices"]))
        return f"unknown {param.name.replace('_', ' ')} {choice['value']!r}; choose one of: {names}"
    return message


app = typer.Typer(
    name="kpc",
    cls=OneLineErrors,
    help="Knapsack channel pruning with inner distillation, verified on the runtime that serves the model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kpc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, flag("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    verbose: Annotated[bool, flag("--verbose", "-v", help="Show detail (debug messages).")] = False,
    quiet: Annotated[bool, flag("--quiet", "-q", help="Show warnings and errors only.")] = False,
) -> None:
    """kpc: make a trained vision network measurably faster on its runtime, and prove it."""
    from kpc.cli._common import setup_logging

    setup_logging(verbose=verbose, quiet=quiet)


def _register() -> None:
    from kpc.cli import inspect_cmd, prune_cmd

    prune_cmd.register(app)
    inspect_cmd.register(app)
    for optional in ("export_cmd", "bench_cmd", "profile_cmd", "train_cmd", "run_cmd"):
        try:
            module = __import__(f"kpc.cli.{optional}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"kpc.cli.{optional}":
                raise
            continue
        module.register(app)


_register()


def main() -> None:
    app()
