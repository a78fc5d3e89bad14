"""kpc's outputs are written through `exporters.atomic`: complete or absent, never clobbering.

Kept as kpc's own import path so library code reads `from kpc.atomic import atomic_dir`;
the implementation lives in `exporters` because that package must not import kpc.
"""

from __future__ import annotations

from exporters.atomic import (
    KPC_RECORDS,
    append_line,
    atomic_dir,
    atomic_file,
    check_dir_target,
    check_writable,
    clean_debris,
    output_lock,
    resolve_file_target,
    write_bytes_atomic,
    write_text_atomic,
)

__all__ = [
    "KPC_RECORDS",
    "append_line",
    "atomic_dir",
    "atomic_file",
    "check_dir_target",
    "check_writable",
    "clean_debris",
    "output_lock",
    "resolve_file_target",
    "write_bytes_atomic",
    "write_text_atomic",
]
