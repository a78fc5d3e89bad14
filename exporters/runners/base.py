"""The one contract every runtime implements.

Borrowed from Polygraphy's runner idea: the same name->array inputs and outputs for every
runtime, so a comparator or a timer never needs to know which runtime it is talking to.
``infer`` is the correctness path (host arrays in and out); ``infer_timed`` is the
latency path and times only the inference, with inputs already staged on the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch

from exporters.errors import ExporterError

ModelLike = torch.nn.Module | str | Path
Arrays = Mapping[str, np.ndarray]


MAX_THREADS = 1024  # far above any CPU this runs on; more is a typo


def resolve_threads(threads: int | None) -> int:
    """Pin a thread count even when none is asked for, so it is always recorded.

    None means torch's own default (physical cores), used for ONNX Runtime too so the two
    CPU runtimes are compared on equal footing.
    """
    if threads is None:
        return torch.get_num_threads()
    if threads < 1:
        raise ExporterError(f"threads must be a positive integer, got {threads}; omit it to use the default")
    if threads > MAX_THREADS:  # 10,000 threads ran a bench for over 10 minutes before anyone noticed the typo
        raise ExporterError(f"threads {threads} is more than {MAX_THREADS}: pass the cores the model will run on "
                            "(or omit it for torch's default)")
    return threads


class Runner(ABC):
    """Run a model on one runtime with named inputs and outputs.

    Subclasses set ``name`` and ``precisions`` and implement the abstract methods. A runner
    is also a context manager that calls :meth:`close` on exit.
    """

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    # Whether a lone layer is timed from the runtime's own kernel profiler (relative to a reference conv in
    # the same session) instead of by wall time around the call; see exporters.kernel_timing.
    kernel_timing: ClassVar[bool] = False
    # Whether the runtime honours channels_last (NHWC); refused where it would be recorded but ignored.
    supports_channels_last: ClassVar[bool] = False
    # Seconds a session's idle worker threads may keep spinning after a run at the runtime's defaults. kpc
    # bench pauses this long before each of its short blocks, or the idle session's spinning workers take
    # cores from the one being timed (see exporters.timing.blocked).
    idle_spin_s: ClassVar[float] = 0.0

    def __init__(
        self,
        *,
        threads: int | None = None,
        precision: str = "fp32",
        channels_last: bool = False,
        device_index: int = 0,
    ) -> None:
        if precision not in self.precisions:
            raise ExporterError(
                f"runtime {self.name!r} does not support precision {precision!r}; "
                f"choose one of: {', '.join(self.precisions)}"
            )
        self.threads = resolve_threads(threads)
        self.precision = precision
        self.channels_last = channels_last
        self.device_index = device_index
        self.batch: int | None = None
        self._staged_key: tuple[Any, ...] | None = None
        self._staged_refs: Arrays | None = None
        self._staged: Any = None

    @classmethod
    def check_available(cls, device_index: int = 0) -> None:
        """Raise a typed error if this runtime cannot run here; default: always available."""
        return None

    @classmethod
    def device_name(cls, device_index: int = 0) -> str:
        """What a latency table measured on this runtime belongs to: the CPU model, or the GPU's name."""
        from exporters.device import cpu_name

        return cpu_name()

    @classmethod
    def channel_block(cls, precision: str = "fp32") -> int:
        """Channels the runtime's fast kernels process as one block (widths off it run slower); 1: none known."""
        return 1

    @abstractmethod
    def prepare(self, model: ModelLike, example_inputs: Arrays) -> None:
        """Load or build the model once; ``example_inputs`` fix names, shapes and batch."""

    @abstractmethod
    def infer(self, inputs: Arrays) -> dict[str, np.ndarray]:
        """Run once on host arrays and return host arrays, named."""

    def infer_timed(self, inputs: Arrays) -> float:
        """Seconds for one inference, device synchronised, input copies excluded.

        Inputs are staged (copied to the device, cast) on the first call with a given set
        of arrays and reused afterwards, so repeated timing calls measure only compute.
        """
        return self._run_staged(self._stage_once(inputs))

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Provenance for a latency table: runtime, versions, device, threads, precision, batch."""

    def close(self) -> None:
        """Release runtime resources; safe to call twice."""
        self._staged_key = self._staged_refs = self._staged = None

    @abstractmethod
    def _stage(self, inputs: Arrays) -> Any:
        """Put inputs where the runtime reads them (device, dtype, layout)."""

    @abstractmethod
    def _run_staged(self, staged: Any) -> float:
        """Run once on staged inputs and return elapsed seconds."""

    def _stage_once(self, inputs: Arrays) -> Any:
        # Keyed by array identity; the arrays are kept referenced so an id cannot be reused.
        key = tuple((name, id(arr), arr.shape, arr.dtype.str) for name, arr in inputs.items())
        if key != self._staged_key:
            self._staged = self._stage(inputs)
            self._staged_key, self._staged_refs = key, dict(inputs)
        return self._staged

    def _base_description(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "threads": self.threads,
            "precision": self.precision,
            "batch": self.batch,
            "channels_last": self.channels_last,
        }

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} precision={self.precision} threads={self.threads}>"


def check_input_names(runtime: str, expected: list[str], inputs: Arrays) -> None:
    """Fail with both name lists; a silent positional mix-up would give wrong numbers."""
    if set(inputs) != set(expected):
        raise ExporterError(
            f"runtime {runtime!r} expects inputs {expected} but got {list(inputs)}; "
            "name the example inputs like the model's inputs"
        )
