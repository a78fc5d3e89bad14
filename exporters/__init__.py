"""Export, run, validate and time CNNs on several runtimes behind one runner contract.

This package never imports ``kpc``: it takes a torch module or an exported file plus named
example inputs. Optional runtimes (onnxruntime, tensorrt) are imported only when a runner
that needs them is prepared, so ``import exporters`` works without them.
"""

from exporters.errors import (
    DeviceUnavailable,
    ExporterError,
    OutputError,
    ParityError,
    RuntimeNotInstalled,
    UnknownRuntime,
)
from exporters.kernel_timing import KernelRatio, ort_cpu_kernel_ms, ort_cpu_kernel_ratio
from exporters.onnx_export import check_onnx, export_onnx
from exporters.parity import OutputCheck, compare_outputs, raise_on_failures, validate_onnx
from exporters.runners import RUNTIMES, Runner, get_runner, runner_class
from exporters.tensorrt_engine import ProfileShape, build_engine, engine_filename, profile_shapes
from exporters.timing import TimingStats, blocked, bootstrap_ratio_ci, interleaved, measure

__all__ = [
    "RUNTIMES",
    "DeviceUnavailable",
    "ExporterError",
    "KernelRatio",
    "OutputCheck",
    "OutputError",
    "ParityError",
    "ProfileShape",
    "Runner",
    "RuntimeNotInstalled",
    "TimingStats",
    "UnknownRuntime",
    "blocked",
    "bootstrap_ratio_ci",
    "build_engine",
    "check_onnx",
    "compare_outputs",
    "engine_filename",
    "export_onnx",
    "get_runner",
    "interleaved",
    "measure",
    "ort_cpu_kernel_ms",
    "ort_cpu_kernel_ratio",
    "profile_shapes",
    "raise_on_failures",
    "runner_class",
    "validate_onnx",
]
