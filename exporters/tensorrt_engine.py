"""Build TensorRT engines from ONNX files with NVIDIA's Polygraphy (its loaders over the TensorRT 10 API).

TensorRT and Polygraphy are imported only when an engine is built. The decisions that
do not need them (optimisation-profile shapes, engine file names, argument checks, whether
a graph is quantised or dynamic) are plain functions, tested on machines without a GPU.

Engines are specific to the GPU model and the TensorRT version, so both are part of the
engine file name: a cached engine is never silently reused on the wrong device.
"""

from __future__ import annotations

import re
import tempfile
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


def import_polygraphy(runtime: str = "trt") -> Any:
    """Polygraphy's TensorRT backend (pure Python; it imports TensorRT itself, lazily)."""
    try:
        from polygraphy.backend import trt as polygraphy_trt
    except ImportError as exc:
        raise RuntimeNotInstalled(runtime, "polygraphy cannot be imported") from exc
    return polygraphy_trt


def has_quantization_nodes(onnx_path: str | Path) -> bool:
    """Whether the graph carries explicit quantisation (Q/DQ nodes): what a real int8 engine is built from."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.node)


def dynamic_inputs(onnx_path: str | Path) -> bool:
    """Whether any graph input has a free (symbolic or unknown) dimension: then the engine needs a profile."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    for tensor in graph.input:
        if tensor.name in initializers:
            continue
        dims = tensor.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
            return True
    return False


def build_engine_bytes(
    onnx_path: str | Path,
    *,
    input_shapes: Mapping[str, Sequence[int]],
    precision: str = "fp32",
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | Path | None = None,
) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine with Polygraphy's loaders.

    ``opt_batch`` and ``max_batch`` default to the example batch. A ``timing_cache`` file is
    read if present and written back (atomically) after the build, which makes rebuilding
    pruned variants of the same network much faster. int8 needs Q/DQ nodes in the graph:
    implicit calibration is deprecated in TensorRT 10 and not offered.
    """
    example_batch = int(next(iter(input_shapes.values()))[0])
    opt_batch = example_batch if opt_batch is None else opt_batch
    max_batch = max(opt_batch, example_batch) if max_batch is None else max_batch
    check_build_args(precision, workspace_mb, min_batch, opt_batch, max_batch)
    if precision == "int8" and not has_quantization_nodes(onnx_path):
        raise ExporterError(f"{Path(onnx_path).name} has no QuantizeLinear/DequantizeLinear nodes: an int8 engine "
                            "built from it would run in fp16; quantize the model first (e.g. with NVIDIA ModelOpt)")
    trt = import_tensorrt()
    polygraphy_trt = import_polygraphy()
    profiles = None
    if dynamic_inputs(onnx_path):
        profile = polygraphy_trt.Profile()
        wanted = profile_shapes(input_shapes, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch)
        for name, shape in wanted.items():
            profile.add(name, min=shape.min, opt=shape.opt, max=shape.max)
        profiles = [profile]
    cache_path = Path(timing_cache) if timing_cache else None
    config = polygraphy_trt.CreateConfig(
        fp16=precision in ("fp16", "int8") or None, bf16=precision == "bf16" or None, int8=precision == "int8" or None,
        profiles=profiles, memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_mb << 20},
        load_timing_cache=str(cache_path) if cache_path is not None and cache_path.is_file() else None,
    )
    with tempfile.TemporaryDirectory(prefix="exporters-trt-cache-") as tmp:
        new_cache = Path(tmp) / "timing.cache" if cache_path is not None else None
        try:
            serialized = polygraphy_trt.EngineBytesFromNetwork(
                polygraphy_trt.NetworkFromOnnxPath(str(onnx_path)), config=config,
                save_timing_cache=str(new_cache) if new_cache is not None else None)()
        except Exception as exc:  # Polygraphy raises its own error types for a parse or build failure
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExporterError(f"TensorRT could not build {Path(onnx_path).name}: {first}") from exc
        if cache_path is not None and new_cache is not None and new_cache.is_file():
            write_bytes_atomic(cache_path, new_cache.read_bytes())
    if serialized is None:
        raise ExporterError(f"TensorRT failed to build {Path(onnx_path).name}; rerun with a verbose logger")
    return bytes(serialized)


def build_engine(onnx_path: str | Path, engine_path: str | Path, **options: Any) -> Path:
    """`build_engine_bytes`, written to ``engine_path`` through the atomic writer."""
    data = build_engine_bytes(onnx_path, **options)
    return write_bytes_atomic(Path(engine_path), data)
