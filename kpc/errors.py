"""Errors that the CLI turns into one line on stderr and an exit code.

Library code raises these for anything a user can fix (a bad spec, a budget out of
range, a corrupt artifact); everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class KpcError(Exception):
    """A user mistake or unusable input: exit code 2, one line, no traceback."""

    exit_code = 2


class VerificationFailed(KpcError):
    """A check ran and its verdict is 'no' (parity, speedup gate): exit code 1."""

    exit_code = 1


def as_kpc_errors(func: F) -> F:
    """`func` with the exporters' typed errors raised as KpcError (VerificationFailed for a failed check).

    The exporters package must not import kpc, so its errors (an output directory that
    exists, a runtime not installed, failed parity) are not KpcErrors; a library user who
    catches `kpc.KpcError` around `kpc.save` or `kpc.bench` missed them.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KpcError:
            raise
        except Exception as exc:
            from exporters.errors import ExporterError

            if not isinstance(exc, ExporterError):
                raise
            kind = VerificationFailed if getattr(exc, "exit_code", 2) == 1 else KpcError
            raise kind(str(exc)) from exc

    return wrapper  # type: ignore[return-value]
