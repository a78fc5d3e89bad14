"""Runner registry: one string front door (``get_runner("ort-cpu")``) to every runtime."""

from __future__ import annotations

from exporters.errors import UnknownRuntime
from exporters.runners.base import Runner, resolve_threads
from exporters.runners.ort_runner import OrtCpuRunner, OrtCudaRunner
from exporters.runners.torch_runner import TorchCpuRunner, TorchCudaRunner
from exporters.runners.trt_runner import TrtRunner

_REGISTRY: dict[str, type[Runner]] = {
    cls.name: cls for cls in (TorchCpuRunner, TorchCudaRunner, OrtCpuRunner, OrtCudaRunner, TrtRunner)
}
RUNTIMES: tuple[str, ...] = tuple(_REGISTRY)


def runner_class(runtime: str) -> type[Runner]:
    """The runner class of ``runtime`` (its traits: device, channel block, kernel timing), without checking it runs."""
    try:
        return _REGISTRY[runtime]
    except KeyError:
        raise UnknownRuntime(runtime, RUNTIMES) from None


def get_runner(
    runtime: str,
    *,
    threads: int | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    device_index: int = 0,
) -> Runner:
    """An unprepared runner for ``runtime``, after checking it can run on this machine.

    Availability is checked here rather than in ``prepare`` so a CLI can fail in a second
    with a typed error (UnknownRuntime, DeviceUnavailable, RuntimeNotInstalled) before
    exporting anything. The GPU check comes before the package check because installing a
    package does not help a machine without a GPU.
    """
    cls = runner_class(runtime)
    cls.check_available(device_index)
    return cls(threads=threads, precision=precision, channels_last=channels_last, device_index=device_index)


__all__ = [
    "RUNTIMES",
    "OrtCpuRunner",
    "OrtCudaRunner",
    "Runner",
    "TorchCpuRunner",
    "TorchCudaRunner",
    "TrtRunner",
    "get_runner",
    "resolve_threads",
    "runner_class",
]
