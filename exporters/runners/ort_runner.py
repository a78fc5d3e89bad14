"""ONNX Runtime runners (CPU and CUDA execution providers).

onnxruntime is imported inside functions so ``import exporters`` stays cheap and works
where it is missing. Given a torch module instead of a file, the runner exports it to a
temporary ONNX file with :func:`exporters.onnx_export.export_onnx` (static shapes taken
from the example inputs, default opset) so every runner accepts the same ``prepare``
arguments; export explicitly when the opset or a dynamic batch matters.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from exporters.device import cpu_name, cpu_vector_floats, cuda_available, gpu_name, tensor_core_block
from exporters.errors import DeviceUnavailable, ExporterError, RuntimeNotInstalled
from exporters.runners.base import Arrays, ModelLike, Runner, check_input_names
from exporters.tensors import batch_of

# ONNX tensor element types the runners feed, mapped to numpy.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}
_PRECISION_OF_TYPE = {"tensor(float)": "fp32", "tensor(float16)": "fp16"}


def import_onnxruntime(runtime: str) -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeNotInstalled(runtime, "onnxruntime cannot be imported") from exc
    return onnxruntime


def session_options(ort: Any, threads: int, *, spinning: bool | None = None) -> Any:
    """The session a server runs: a pinned thread count, sequential, all graph optimisations.

    `spinning=None` keeps ONNX Runtime's default (idle workers spin briefly before they
    sleep), which is what a serving process gets and so what kpc's milliseconds mean.
    Comparisons stay fair by timing each model in blocks of its own (`exporters.blocked`):
    a spinning pool slows whatever runs right after it, which biased run-by-run interleaving
    (measured here: mobilenet_v3_large read 2.37x instead of 1.56x). The kernel profiler of
    lone layers passes True (see `exporters.kernel_timing`).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


SERVING_SESSION = {"intra_op_num_threads": "the table's threads", "inter_op_num_threads": 1,
                   "execution_mode": "sequential", "graph_optimization_level": "all",
                   "allow_spinning": "onnxruntime default"}


def resolve_onnx_file(model: ModelLike, example_inputs: Arrays, workdir: Path) -> Path:
    """An ONNX path for ``model``: the file itself, or a fresh export of a torch module."""
    if isinstance(model, torch.nn.Module):
        from exporters.onnx_export import export_onnx

        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in example_inputs.items()}
        return export_onnx(model, tensors, workdir / "model.onnx")
    path = Path(model)
    if not path.is_file():
        raise ExporterError(f"ONNX file {str(path)!r} does not exist; export the model first")
    return path


class _OrtRunner(Runner):
    providers: ClassVar[list[Any]]
    precisions = ("fp32", "fp16")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._session: Any = None
        self._input_types: dict[str, Any] = {}
        self._input_shapes: dict[str, tuple[Any, ...]] = {}
        self._output_names: list[str] = []
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.model_path: Path | None = None

    def prepare(self, model: ModelLike, example_inputs: Arrays) -> None:
        ort = import_onnxruntime(self.name)
        if isinstance(model, torch.nn.Module):
            self._workdir = tempfile.TemporaryDirectory(prefix="exporters-ort-")
        workdir = Path(self._workdir.name) if self._workdir else Path(".")
        self.model_path = resolve_onnx_file(model, example_inputs, workdir)

        options = session_options(ort, self.threads)
        self._session = ort.InferenceSession(str(self.model_path), options, providers=self._providers())
        self._check_session()
        self._input_types = {i.name: i.type for i in self._session.get_inputs()}
        self._input_shapes = {i.name: tuple(i.shape) for i in self._session.get_inputs()}
        self._output_names = [o.name for o in self._session.get_outputs()]
        model_precision = _PRECISION_OF_TYPE.get(next(iter(self._input_types.values()), ""), self.precision)
        if model_precision != self.precision:
            raise ExporterError(
                f"{self.model_path.name} takes {model_precision} inputs but precision "
                f"{self.precision!r} was asked; pass precision={model_precision!r} "
                f"or export with fp16={self.precision == 'fp16'}"
            )
        self.batch = batch_of(example_inputs)
        self._feed(example_inputs)

    def infer(self, inputs: Arrays) -> dict[str, np.ndarray]:
        outputs = self._live_session().run(self._output_names, self._feed(inputs))
        return dict(zip(self._output_names, outputs, strict=True))

    def describe(self) -> dict[str, Any]:
        import onnxruntime

        return {
            **self._base_description(),
            "versions": {"onnxruntime": onnxruntime.__version__},
            "providers": self._live_session().get_providers(),
            "model": str(self.model_path),
        }

    def close(self) -> None:
        self._session = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        super().close()

    def _providers(self) -> list[Any]:
        return ["CPUExecutionProvider"]

    def _check_session(self) -> None:
        """Hook for providers that can silently fall back to the CPU."""

    def _live_session(self) -> Any:
        if self._session is None:
            raise ExporterError(f"runner {self.name!r} is not prepared; call prepare() first")
        return self._session

    def _feed(self, inputs: Arrays) -> dict[str, np.ndarray]:
        check_input_names(self.name, list(self._input_types), inputs)
        for name, declared in self._input_shapes.items():
            got = np.shape(inputs[name])
            fixed_mismatch = any(isinstance(d, int) and d != g for d, g in zip(declared, got, strict=False))
            if len(declared) != len(got) or fixed_mismatch:
                shown = tuple(d if isinstance(d, int) else "?" for d in declared)
                raise ExporterError(
                    f"input {name!r} has shape {got} but the ONNX model takes {shown}; "
                    "feed that shape or re-export (dynamic_batch=True for other batch sizes)"
                )
        return {
            name: np.ascontiguousarray(inputs[name], dtype=_ORT_TYPES.get(kind))
            for name, kind in self._input_types.items()
        }


def _missing_cuda_provider() -> str:
    """Why ONNX Runtime offers no CUDA provider: the CPU wheel alone, or both wheels with the CPU one in front."""
    from importlib import metadata

    installed = set()
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(name)
            installed.add(name)
        except metadata.PackageNotFoundError:
            continue
    if installed == {"onnxruntime", "onnxruntime-gpu"}:
        return "onnxruntime and onnxruntime-gpu are both installed and the CPU wheel hides the CUDA provider"
    if "onnxruntime-gpu" in installed:
        return "onnxruntime-gpu is installed but cannot load CUDA (check the CUDA and cuDNN libraries it needs)"
    return "this onnxruntime is the CPU build, which has no CUDAExecutionProvider"


class OrtCpuRunner(_OrtRunner):
    name = "ort-cpu"
    kernel_timing = True
    # ONNX Runtime's idle workers spin a while before they sleep (tens of ms, by the figures below). Measured on
    # a 2-core AMD EPYC (ResNet-18 at 28x28, 0.5 ms a run): blocks of 10 runs without a pause read the model
    # at 0.70-1.03 ms against 0.48-0.62 ms alone in its own process; with 50 ms pauses, 0.56-0.64 ms.
    idle_spin_s = 0.1

    @classmethod
    def channel_block(cls, precision: str = "fp32") -> int:
        """ONNX Runtime's NCHWc conv kernels block channels by the vector width: 16 floats with AVX-512, 8 with AVX2.

        ONNX Runtime only moves a conv onto them when its channels are a multiple of the
        block; any other width runs the generic path and adds layout reorders around it
        (measured on ResNet-18: a random assignment ran 8% faster once its odd widths
        were rounded *up* to 16).
        """
        return cpu_vector_floats()

    @classmethod
    def check_available(cls, device_index: int = 0) -> None:
        import_onnxruntime(cls.name)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": cpu_name()}

    def _stage(self, inputs: Arrays) -> dict[str, np.ndarray]:
        return self._feed(inputs)

    def _run_staged(self, staged: dict[str, np.ndarray]) -> float:
        session = self._live_session()
        start = time.perf_counter_ns()
        session.run(self._output_names, staged)
        return (time.perf_counter_ns() - start) * 1e-9


class OrtCudaRunner(_OrtRunner):
    """CUDA execution provider; timing uses IO binding so host<->device copies are excluded."""

    name = "ort-cuda"

    @classmethod
    def device_name(cls, device_index: int = 0) -> str:
        return gpu_name(device_index)

    @classmethod
    def channel_block(cls, precision: str = "fp32") -> int:
        return tensor_core_block(precision)

    @classmethod
    def check_available(cls, device_index: int = 0) -> None:
        if not cuda_available():
            raise DeviceUnavailable(cls.name, "torch.cuda.is_available() is False")
        ort = import_onnxruntime(cls.name)
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeNotInstalled(cls.name, _missing_cuda_provider())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": gpu_name(self.device_index)}

    def _providers(self) -> list[Any]:
        return [("CUDAExecutionProvider", {"device_id": self.device_index}), "CPUExecutionProvider"]

    def _check_session(self) -> None:
        # ONNX Runtime falls back to the CPU provider with only a warning when CUDA fails to
        # load (driver or cuDNN mismatch); timing that as "ort-cuda" would be a lie.
        if "CUDAExecutionProvider" not in self._live_session().get_providers():
            raise DeviceUnavailable(self.name, "ONNX Runtime could not initialise CUDAExecutionProvider")

    def _stage(self, inputs: Arrays) -> Any:
        import onnxruntime

        binding = self._live_session().io_binding()
        device_values = []  # kept with the binding so the device buffers outlive it
        for name, array in self._feed(inputs).items():
            value = onnxruntime.OrtValue.ortvalue_from_numpy(array, "cuda", self.device_index)
            binding.bind_ortvalue_input(name, value)
            device_values.append(value)
        for name in self._output_names:
            binding.bind_output(name, "cuda", self.device_index)
        binding.synchronize_inputs()
        return binding, device_values

    def _run_staged(self, staged: Any) -> float:
        session, (binding, _) = self._live_session(), staged
        start = time.perf_counter_ns()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return (time.perf_counter_ns() - start) * 1e-9
