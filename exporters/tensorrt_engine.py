"""Build TensorRT engines from ONNX files (TensorRT 10 Python API).

TensorRT is imported only inside :func:`build_engine` and :func:`import_tensorrt`. The
decisions that do not need it (optimisation-profile shapes, engine file names, argument
checks) are plain functions so they are tested on machines without a GPU.

Engines are specific to the GPU model and the TensorRT version, so both are part of the
engine file name: a cached engine is never silently reused on the wrong device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from exporters.atomic import write_bytes_atomic
from exporters.errors import ExporterError, RuntimeNotInstalled

# int8 expects explicit quantisation (Q/DQ nodes in the ONNX graph): implicit calibration
# is deprecated in TensorRT 10 and not offered here.
TRT_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DEFAULT_WORKSPACE_MB = 4096


class ProfileShape(NamedTuple):
    """min / opt / max shapes of one input in a TensorRT optimisation profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def import_tensorrt(runtime: str = "trt") -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise RuntimeNotInstalled(runtime, "tensorrt cannot be imported") from exc
    return tensorrt


def check_build_args(
    precision: str, workspace_mb: int, min_batch: int, opt_batch: int, max_batch: int
) -> None:
    """Reject impossible builds before spending minutes in the builder."""
    if precision not in TRT_PRECISIONS:
        raise ExporterError(
            f"TensorRT precision {precision!r} is not supported; choose one of: {', '.join(TRT_PRECISIONS)}"
        )
    if workspace_mb < 1:
        raise ExporterError(f"workspace must be at least 1 MiB, got {workspace_mb}; the default is 4096")
    check_batches(min_batch, opt_batch, max_batch)


def check_batches(min_batch: int, opt_batch: int, max_batch: int) -> None:
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ExporterError(
            f"batch sizes must satisfy 1 <= min <= opt <= max, got min={min_batch} opt={opt_batch} "
            f"max={max_batch}; e.g. min=1 opt=8 max=32"
        )


def needs_profile(shape: Sequence[int]) -> bool:
    """An input needs an optimisation profile only if a dimension is dynamic (negative)."""
    return any(d < 0 for d in shape)


def profile_shapes(
    input_shapes: Mapping[str, Sequence[int]], *, min_batch: int, opt_batch: int, max_batch: int
) -> dict[str, ProfileShape]:
    """Profile shapes that vary only the leading (batch) dimension.

    ``input_shapes`` are the shapes of the example inputs; their own batch is replaced, the
    other dimensions are kept, because kpc prunes image models with a fixed input size.
    """
    check_batches(min_batch, opt_batch, max_batch)
    shapes = {}
    for name, shape in input_shapes.items():
        if len(shape) == 0:
            raise ExporterError(f"input {name!r} is a scalar; TensorRT profiles need a batch dimension")
        if any(d < 1 for d in shape[1:]):
            raise ExporterError(
                f"input {name!r} has non-batch dimension <= 0 in {tuple(shape)}; give real sizes"
            )
        rest = tuple(int(d) for d in shape[1:])
        shapes[name] = ProfileShape((min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    return shapes


def engine_filename(
    onnx_path: str | Path,
    *,
    precision: str,
    min_batch: int,
    max_batch: int,
    device_name: str,
    trt_version: str,
) -> str:
    """e.g. ``resnet18.fp16.b1-32.nvidia-h100-80gb-hbm3.trt10.3.0.engine``."""
    device = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "gpu"
    batch = f"b{min_batch}" if min_batch == max_batch else f"b{min_batch}-{max_batch}"
    return f"{Path(onnx_path).stem}.{precision}.{batch}.{device}.trt{trt_version}.engine"


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    input_shapes: Mapping[str, Sequence[int]],
    precision: str = "fp32",
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | Path | None = None,
) -> Path:
    """Parse ``onnx_path``, build a serialized engine and write it to ``engine_path``.

    ``opt_batch`` and ``max_batch`` default to the example batch. A ``timing_cache`` file
    is read if present and written back after the build, which makes rebuilding pruned
    variants of the same network much faster.
    """
    example_batch = int(next(iter(input_shapes.values()))[0])
    opt_batch = example_batch if opt_batch is None else opt_batch
    max_batch = max(opt_batch, example_batch) if max_batch is None else max_batch
    check_build_args(precision, workspace_mb, min_batch, opt_batch, max_batch)
    trt = import_tensorrt()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Explicit batch is the only mode in TensorRT 10; the flag exists only in older versions.
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    flags = 1 << int(explicit) if explicit is not None and int(trt.__version__.split(".")[0]) < 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExporterError(f"TensorRT could not parse {Path(onnx_path).name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)

    network_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if any(needs_profile(tuple(t.shape)) for t in network_inputs):
        profile = builder.create_optimization_profile()
        wanted = profile_shapes(input_shapes, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch)
        for tensor in network_inputs:
            if tensor.name not in wanted:
                raise ExporterError(
                    f"no example input for network input {tensor.name!r}; name inputs to match"
                )
            profile.set_shape(tensor.name, *wanted[tensor.name])
        config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExporterError(f"TensorRT failed to build {Path(onnx_path).name}; rerun with a verbose logger")
    engine_path = Path(engine_path)
    write_bytes_atomic(engine_path, bytes(serialized))
    if cache_path is not None:
        write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return engine_path
