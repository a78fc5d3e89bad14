"""Append a dated, attributed figures section to benchmarks/RESULTS.md.

A number without its conditions cannot be compared with the next one, so every section
records when, on what CPU, with how many threads and by which exact command it was
measured, followed by a markdown table. Shared by the benchmark scripts:

    from _record import append_results   # scripts in benchmarks/ have it on sys.path
    append_results("Speedup", ["model", "speedup"], [["resnet50", "1.9x"]], threads=2)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().with_name("RESULTS.md")
HEADER = ("# Benchmark results\n\nAppended by the scripts in `benchmarks/`; newest last. "
          "Each section says how it was measured.\n")


def machine() -> str:
    from exporters.device import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as a user would retype it from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]) if argv else Path("?")
    with contextlib.suppress(ValueError):  # a script outside the repository keeps its absolute path
        script = script.resolve().relative_to(Path(__file__).resolve().parents[1])
    return shlex.join(["python", str(script), *argv[1:]])


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def append_results(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]], *, threads: int | str,
                   command: str | None = None, notes: Sequence[str] = (), path: Path = RESULTS) -> str:
    """Append one section (and create the file with a header if needed); returns the section's text.

    The whole file is rewritten to a temporary sibling and renamed, so an interrupted run
    never leaves a half-appended table.
    """
    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    section = "\n".join([
        f"## {title}",
        "",
        f"- date: {now}",
        f"- machine: {machine()}",
        f"- threads: {threads}",
        f"- command: `{command or command_line()}`",
        *[f"- {note}" for note in notes],
        "",
        markdown_table(headers, rows),
        "",
    ])
    path = Path(path)
    existing = path.read_text() if path.is_file() else HEADER
    text = existing.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return section
