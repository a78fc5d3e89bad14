"""TensorRT runner: kpc's runner contract over Polygraphy's TrtRunner.

Accepts a torch module (exported to ONNX first), an ONNX file (built into an engine with
Polygraphy's loaders, see `exporters.tensorrt_engine`) or a serialized ``.engine``/``.plan``.
Timing feeds Polygraphy torch CUDA tensors already on the device and keeps the outputs
there, so `infer_timed` measures the engine's execution, not host copies.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters.device import cuda_available, gpu_name
from exporters.errors import DeviceUnavailable, ExporterError
from exporters.runners.base import Arrays, ModelLike, Runner, check_input_names
from exporters.runners.ort_runner import resolve_onnx_file
from exporters.tensorrt_engine import TRT_PRECISIONS, build_engine_bytes, import_polygraphy, import_tensorrt
from exporters.tensors import batch_of

ENGINE_SUFFIXES = (".engine", ".plan")


class TrtRunner(Runner):
    name = "trt"
    precisions = TRT_PRECISIONS

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._runner: Any = None
        self._inputs: list[str] = []
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.engine_path: Path | None = None

    @classmethod
    def check_available(cls, device_index: int = 0) -> None:
        if not cuda_available():
            raise DeviceUnavailable(cls.name, "torch.cuda.is_available() is False")
        import_tensorrt(cls.name)
        import_polygraphy(cls.name)

    @classmethod
    def device_name(cls, device_index: int = 0) -> str:
        return gpu_name(device_index)

    @classmethod
    def channel_block(cls, precision: str = "fp32") -> int:
        """TensorRT picks tensor-core tactics for fp16/bf16/int8 at multiples of 8 channels."""
        return 8 if precision in ("fp16", "bf16", "int8") else 1

    def prepare(self, model: ModelLike, example_inputs: Arrays) -> None:
        polygraphy_trt = import_polygraphy(self.name)
        torch.cuda.set_device(self.device_index)
        self._workdir = tempfile.TemporaryDirectory(prefix="exporters-trt-")
        if isinstance(model, str | Path) and Path(model).suffix in ENGINE_SUFFIXES:
            self.engine_path = Path(model)
            serialized = self.engine_path.read_bytes()
        else:
            onnx_path = resolve_onnx_file(model, example_inputs, Path(self._workdir.name))
            serialized = build_engine_bytes(onnx_path, input_shapes={k: tuple(v.shape) for k, v in
                                                                     example_inputs.items()},
                                            precision=self.precision)
        try:
            self._runner = polygraphy_trt.TrtRunner(polygraphy_trt.EngineFromBytes(serialized))
            self._runner.activate()
        except Exception as exc:  # an engine built for another GPU or TensorRT version
            raise ExporterError(f"TensorRT could not load the engine ({type(exc).__name__}: {exc}); rebuild it for "
                                "this GPU and TensorRT version") from exc
        self._inputs = list(self._runner.get_input_metadata().keys())
        self.batch = batch_of(example_inputs)

    def infer(self, inputs: Arrays) -> dict[str, np.ndarray]:
        check_input_names(self.name, self._inputs, inputs)
        outputs = self._live().infer({k: np.ascontiguousarray(inputs[k]) for k in self._inputs})
        return {name: np.asarray(value) for name, value in outputs.items()}

    def describe(self) -> dict[str, Any]:
        import polygraphy
        import tensorrt

        return {
            **self._base_description(),
            "versions": {"tensorrt": tensorrt.__version__, "polygraphy": polygraphy.__version__,
                         "torch": torch.__version__, "cuda": torch.version.cuda},
            "device": gpu_name(self.device_index),
            "engine": str(self.engine_path) if self.engine_path else "built in memory",
        }

    def close(self) -> None:
        if self._runner is not None and getattr(self._runner, "is_active", False):
            self._runner.deactivate()
        self._runner = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        super().close()

    def _live(self) -> Any:
        if self._runner is None:
            raise ExporterError("runner 'trt' is not prepared; call prepare() first")
        return self._runner

    def _stage(self, inputs: Arrays) -> dict[str, torch.Tensor]:
        """Inputs as CUDA tensors, so timed runs feed the engine without host copies."""
        check_input_names(self.name, self._inputs, inputs)
        device = torch.device("cuda", self.device_index)
        return {name: torch.from_numpy(np.ascontiguousarray(inputs[name])).to(device) for name in self._inputs}

    def _run_staged(self, staged: dict[str, torch.Tensor]) -> float:
        runner = self._live()
        runner.infer(staged, copy_outputs_to_host=False)
        return float(runner.last_inference_time())
