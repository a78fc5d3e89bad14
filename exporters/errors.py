"""Typed errors for exporters.

Every error carries an ``exit_code`` so a CLI can map it to a process status without
knowing each class, and every message is one line that says what is wrong and what to
do next, because that line is all a user sees on stderr.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exporters.parity import OutputCheck

# Which pip command brings each optional runtime; kept here so the hint and the
# pyproject extras are edited in one place.
INSTALL_HINTS: dict[str, str] = {
    "ort-cpu": "pip install onnxruntime",
    # onnxruntime-gpu provides the same module as onnxruntime (plus the CUDA provider): the two must not be
    # installed together, or the CPU wheel can shadow the CUDA provider. So there is no "gpu" extra.
    "ort-cuda": "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu",
    "trt": 'pip install "kpc[trt]" (brings tensorrt and polygraphy)',
}


class ExporterError(Exception):
    """Base class; ``exit_code`` 2 marks a usage or environment problem, not a bad model."""

    exit_code: int = 2


class OutputError(ExporterError):
    """An output path kpc must not write (a device, a symlinked directory, another run's lock, no space)."""


class UnknownRuntime(ExporterError):
    """A runtime name that no runner implements; the message lists the ones that exist."""

    def __init__(self, runtime: str, known: Sequence[str]) -> None:
        self.runtime = runtime
        self.known = tuple(known)
        super().__init__(f"unknown runtime {runtime!r}; choose one of: {', '.join(self.known)}")


class RuntimeNotInstalled(ExporterError):
    """The runtime's Python package is missing; the message names the extra that installs it."""

    def __init__(self, runtime: str, detail: str = "") -> None:
        self.runtime = runtime
        hint = INSTALL_HINTS.get(runtime, "install the package that provides it")
        reason = f" ({detail})" if detail else ""
        super().__init__(f"runtime {runtime!r} is not installed{reason}; run: {hint}")


class DeviceUnavailable(ExporterError):
    """A CUDA runtime was asked for on a machine where no GPU is visible."""

    def __init__(self, runtime: str, detail: str = "no CUDA GPU is visible") -> None:
        self.runtime = runtime
        super().__init__(
            f"runtime {runtime!r} needs a CUDA GPU but {detail}; "
            "use 'ort-cpu' or 'torch-cpu', or run on a machine with an NVIDIA GPU"
        )


class ParityError(ExporterError):
    """Exported outputs disagree with the reference.

    ``exit_code`` is 1 (the model is wrong, not the command line). All failed checks are
    kept so the caller can print every one; the message leads with the worst.
    """

    exit_code = 1

    def __init__(self, failures: Sequence[OutputCheck]) -> None:
        if not failures:
            raise ValueError("ParityError needs at least one failed check")
        self.failures = sorted(failures, key=lambda c: c.severity, reverse=True)
        worst = self.failures[0]
        others = len(self.failures) - 1
        more = f" (+{others} more failed output{'s' if others != 1 else ''})" if others else ""
        super().__init__(
            f"output {worst.name!r} does not match the reference: {worst.problem()}{more}; "
            "check the export (opset, dynamic axes, precision) or loosen atol/rtol if the gap is expected"
        )
