"""Errors that the CLI turns into one line on stderr and an exit code.

Library code raises these for anything a user can fix (a bad spec, a budget out of
range, a corrupt artifact); everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class KpcError(Exception):
    """A user mistake or unusable input: exit code 2, one line, no traceback."""

    exit_code = 2


class VerificationFailed(KpcError):
    """A check ran and its verdict is 'no' (parity, speedup gate): exit code 1."""

    exit_code = 1
