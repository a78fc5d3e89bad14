"""The `kpc` command line: one thin module per command over the library functions."""

from __future__ import annotations

from typing import Annotated

import typer

from kpc import __version__

app = typer.Typer(
    name="kpc",
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
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """kpc: make a trained vision network measurably faster on its runtime, and prove it."""


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
