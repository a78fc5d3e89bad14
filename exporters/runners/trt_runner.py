"""TensorRT runner: ONNX file or module -> engine -> execute_async_v3 on a CUDA stream.

Device buffers are torch CUDA tensors (torch is always installed), so no pycuda or
cuda-python is needed to run. Accepts a torch module (exported to ONNX first), an ONNX
file (built into an engine in a temporary directory) or a serialized ``.engine``/``.plan``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters.device import cuda_available, gpu_name
from exporters.errors import DeviceUnavailable, ExporterError
from exporters.runners.base import Arrays, ModelLike, Runner, check_input_names
from exporters.runners.ort_runner import resolve_onnx_file
from exporters.tensorrt_engine import TRT_PRECISIONS, build_engine, engine_filename, import_tensorrt
from exporters.tensors import batch_of

ENGINE_SUFFIXES = (".engine", ".plan")


class TrtRunner(Runner):
    name = "trt"
    precisions = TRT_PRECISIONS

    @classmethod
    def device_name(cls, device_index: int = 0) -> str:
        return gpu_name(device_index)

    @classmethod
    def channel_block(cls, precision: str = "fp32") -> int:
        """TensorRT picks tensor-core tactics for fp16/bf16/int8 at multiples of 8 channels."""
        return 8 if precision in ("fp16", "bf16", "int8") else 1

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._engine: Any = None
        self._context: Any = None
        self._stream: torch.cuda.Stream | None = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.engine_path: Path | None = None

    @classmethod
    def check_available(cls, device_index: int = 0) -> None:
        if not cuda_available():
            raise DeviceUnavailable(cls.name, "torch.cuda.is_available() is False")
        import_tensorrt(cls.name)

    def prepare(self, model: ModelLike, example_inputs: Arrays) -> None:
        trt = import_tensorrt(self.name)
        torch.cuda.set_device(self.device_index)
        self._workdir = tempfile.TemporaryDirectory(prefix="exporters-trt-")
        workdir = Path(self._workdir.name)
        if isinstance(model, str | Path) and Path(model).suffix in ENGINE_SUFFIXES:
            self.engine_path = Path(model)
        else:
            onnx_path = resolve_onnx_file(model, example_inputs, workdir)
            batch = batch_of(example_inputs) or 1
            name = engine_filename(
                onnx_path,
                precision=self.precision,
                min_batch=1,
                max_batch=batch,
                device_name=gpu_name(self.device_index),
                trt_version=trt.__version__,
            )
            shapes = {k: tuple(v.shape) for k, v in example_inputs.items()}
            self.engine_path = build_engine(
                onnx_path, workdir / name, input_shapes=shapes, precision=self.precision
            )

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise ExporterError(
                f"TensorRT could not load {self.engine_path.name}; rebuild it for this GPU/version"
            )
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream(self.device_index)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [n for n in names if is_input[n]]
        self._outputs = [n for n in names if not is_input[n]]
        self.batch = batch_of(example_inputs)

    def infer(self, inputs: Arrays) -> dict[str, np.ndarray]:
        outputs = self._stage(inputs)[1]
        self._execute()
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}

    def describe(self) -> dict[str, Any]:
        import tensorrt

        return {
            **self._base_description(),
            "versions": {
                "tensorrt": tensorrt.__version__,
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
            },
            "device": gpu_name(self.device_index),
            "engine": str(self.engine_path),
        }

    def close(self) -> None:
        self._context = self._engine = self._stream = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        super().close()

    def _stage(self, inputs: Arrays) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Copy inputs to device, set shapes, allocate outputs and bind every address."""
        import tensorrt as trt

        if self._context is None:
            raise ExporterError("runner 'trt' is not prepared; call prepare() first")
        check_input_names(self.name, self._inputs, inputs)
        device = torch.device("cuda", self.device_index)
        staged_in: dict[str, torch.Tensor] = {}
        for name in self._inputs:
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            array = np.ascontiguousarray(inputs[name], dtype=dtype)
            staged_in[name] = torch.from_numpy(array).to(device)
            self._context.set_input_shape(name, tuple(array.shape))
            self._context.set_tensor_address(name, staged_in[name].data_ptr())
        staged_out: dict[str, torch.Tensor] = {}
        for name in self._outputs:
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape = tuple(self._context.get_tensor_shape(name))
            staged_out[name] = torch.from_numpy(np.empty(0, dtype=dtype)).new_empty(shape, device=device)
            self._context.set_tensor_address(name, staged_out[name].data_ptr())
        torch.cuda.synchronize(device)
        return staged_in, staged_out

    def _execute(self) -> None:
        assert self._stream is not None
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise ExporterError("TensorRT execution failed; see the TensorRT log above")
        self._stream.synchronize()

    def _run_staged(self, staged: Any) -> float:
        # Addresses are bound per context; rebind in case infer() staged other buffers since.
        staged_in, staged_out = staged
        for name, tensor in {**staged_in, **staged_out}.items():
            self._context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in staged_in.items():
            self._context.set_input_shape(name, tuple(tensor.shape))
        start = time.perf_counter_ns()
        self._execute()
        return (time.perf_counter_ns() - start) * 1e-9
