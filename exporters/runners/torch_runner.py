"""Eager PyTorch runners: the reference every exported runtime is compared against.

Inputs are passed positionally in the order of the input dict, because a module's
``forward`` argument names are not part of any exported graph. Each runner works on a
deep copy of the module so ``eval()``, ``half()`` and ``channels_last`` never leak into
the caller's model.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters.device import cpu_name, cpu_vector_floats, cuda_available, gpu_name, tensor_core_block
from exporters.errors import DeviceUnavailable, ExporterError
from exporters.modelcopy import copy_model
from exporters.runners.base import Arrays, ModelLike, Runner, check_input_names
from exporters.tensors import batch_of, name_outputs, to_numpy

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _TorchRunner(Runner):
    """Shared eager logic; subclasses choose the device and how precision is applied."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._module: torch.nn.Module | None = None
        self._input_names: list[str] = []
        self._output_names: list[str] | None = None
        self._previous_threads: int | None = None

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def prepare(self, model: ModelLike, example_inputs: Arrays) -> None:
        if isinstance(model, str | Path):
            raise ExporterError(
                f"runtime {self.name!r} runs a torch.nn.Module, not the file {str(model)!r}; "
                "use 'ort-cpu', 'ort-cuda' or 'trt' for exported files"
            )
        if self._previous_threads is None:  # a second prepare must not record our own setting
            self._previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        module = copy_model(model).eval().to(self.device)
        module = self._convert_module(module)
        try:
            if self.channels_last:
                module = module.to(memory_format=torch.channels_last)
            self._module = module
            self._input_names = list(example_inputs)
            self.batch = batch_of(example_inputs)
            with self._context():
                outputs = self._forward(self._stage(example_inputs))
        except (RuntimeError, ValueError) as exc:
            if not self.channels_last:
                raise
            # x.view(x.size(0), -1) on NHWC activations, or a 5-D weight: the user asked for a layout it cannot take
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise ExporterError(f"the model does not run in channels_last ({reason}): drop --channels-last") from exc
        self._output_names = list(name_outputs(outputs))

    def infer(self, inputs: Arrays) -> dict[str, np.ndarray]:
        with self._context():
            outputs = self._forward(self._stage(inputs))
        return {k: to_numpy(v) for k, v in name_outputs(outputs, self._output_names).items()}

    def describe(self) -> dict[str, Any]:
        return {**self._base_description(), "versions": {"torch": torch.__version__}}

    def close(self) -> None:
        if self._previous_threads is not None:
            torch.set_num_threads(self._previous_threads)
            self._previous_threads = None
        self._module = None
        super().close()

    def _convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def _context(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def _forward(self, staged: list[torch.Tensor]) -> Any:
        if self._module is None:
            raise ExporterError(f"runner {self.name!r} is not prepared; call prepare() first")
        # torch threads are process-wide: re-pin so interleaved runners keep their own count.
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self._module(*staged)

    def _stage(self, inputs: Arrays) -> list[torch.Tensor]:
        check_input_names(self.name, self._input_names, inputs)
        staged = []
        for name in self._input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device)
            if tensor.is_floating_point():
                tensor = tensor.to(self._input_dtype())
                if self.channels_last and tensor.ndim == 4:
                    tensor = tensor.contiguous(memory_format=torch.channels_last)
            staged.append(tensor)
        return staged

    def _input_dtype(self) -> torch.dtype:
        return torch.float32


class TorchCpuRunner(_TorchRunner):
    """Eager CPU inference; bf16 goes through autocast so unsupported ops stay in fp32."""

    name = "torch-cpu"
    precisions = ("fp32", "bf16")
    supports_channels_last = True

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": cpu_name()}

    @classmethod
    def channel_block(cls, precision: str = "fp32") -> int:
        """oneDNN, under PyTorch's CPU convs, blocks channels by the vector width as ONNX Runtime's NCHWc does.

        Measured at half the FLOPs on an AVX-512 CPU (benchmarks/speedup.py): widths in
        steps of 16 ran 1.11x (ResNet-50) and 1.06x (MobileNetV3-L) faster than steps of 8
        on torch-cpu, and steps of 32 no faster than 16.
        """
        return cpu_vector_floats()

    def _context(self) -> AbstractContextManager[Any]:
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    def _run_staged(self, staged: list[torch.Tensor]) -> float:
        with self._context():
            start = time.perf_counter_ns()
            self._forward(staged)
            return (time.perf_counter_ns() - start) * 1e-9


class TorchCudaRunner(_TorchRunner):
    """Eager CUDA inference; fp16/bf16 convert module and inputs, as deployment would."""

    name = "torch-cuda"
    precisions = ("fp32", "fp16", "bf16")
    supports_channels_last = True

    @classmethod
    def device_name(cls, device_index: int = 0) -> str:
        return gpu_name(device_index)

    @classmethod
    def channel_block(cls, precision: str = "fp32") -> int:
        """16 in fp16/bf16: measured on an H200 (benchmarks/gpu_width_step.py, cuDNN through PyTorch, batch 64).

        Widths off a multiple of 8 ran 1.6-2.0x slower than the multiple of 8 above them
        (the tensor cores' block), and multiples of 8 that are not multiples of 16 ran
        1.04-1.16x slower than the multiple of 16 above them at 28x28 and 14x14 (the same at
        7x7): such a width costs more time for fewer channels. Multiples of 16 against 32:
        0.99-1.03x, nothing to gain. fp32 has no block measured (1).
        """
        return 16 if tensor_core_block(precision) > 1 else 1

    @classmethod
    def check_available(cls, device_index: int = 0) -> None:
        if not cuda_available():
            raise DeviceUnavailable(cls.name, "torch.cuda.is_available() is False")
        if device_index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                cls.name, f"device index {device_index} does not exist ({torch.cuda.device_count()} GPUs)"
            )

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.device_index)

    def describe(self) -> dict[str, Any]:
        description = super().describe()
        description["versions"]["cuda"] = torch.version.cuda
        return {**description, "device": gpu_name(self.device_index)}

    def _convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(_DTYPES[self.precision])

    def _input_dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    def _run_staged(self, staged: list[torch.Tensor]) -> float:
        # Synchronise before and after: the clock must not include queued work from before,
        # and must include all kernels of this forward.
        torch.cuda.synchronize(self.device)
        start = time.perf_counter_ns()
        self._forward(staged)
        torch.cuda.synchronize(self.device)
        return (time.perf_counter_ns() - start) * 1e-9
