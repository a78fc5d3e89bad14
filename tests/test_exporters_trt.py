"""TensorRT engine building: plain helpers tested everywhere, the real build where TensorRT is."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters import ExporterError, ProfileShape, RuntimeNotInstalled, engine_filename, profile_shapes
from exporters.atomic import write_bytes_atomic as write_atomic
from exporters.tensorrt_engine import build_engine, check_build_args, needs_profile


def test_profile_varies_only_the_batch() -> None:
    shapes = profile_shapes({"input": (4, 3, 224, 224)}, min_batch=1, opt_batch=8, max_batch=32)
    assert shapes == {"input": ProfileShape((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))}


@pytest.mark.parametrize(("low", "opt", "high"), [(0, 1, 1), (2, 1, 4), (1, 8, 4)])
def test_profile_rejects_unordered_batches(low: int, opt: int, high: int) -> None:
    with pytest.raises(ExporterError, match="1 <= min <= opt <= max"):
        profile_shapes({"input": (1, 3, 8, 8)}, min_batch=low, opt_batch=opt, max_batch=high)


def test_profile_rejects_scalars_and_unknown_sizes() -> None:
    with pytest.raises(ExporterError, match="scalar"):
        profile_shapes({"scale": ()}, min_batch=1, opt_batch=1, max_batch=1)
    with pytest.raises(ExporterError, match="non-batch dimension"):
        profile_shapes({"input": (1, 3, -1, 8)}, min_batch=1, opt_batch=1, max_batch=1)


def test_needs_profile_only_for_dynamic_dims() -> None:
    assert needs_profile((-1, 3, 64, 64))
    assert not needs_profile((1, 3, 64, 64))


def test_engine_filename_names_device_version_precision_and_batch() -> None:
    name = engine_filename(
        "/models/resnet18.onnx",
        precision="fp16",
        min_batch=1,
        max_batch=32,
        device_name="NVIDIA H100 80GB HBM3",
        trt_version="10.3.0",
    )
    assert name == "resnet18.fp16.b1-32.nvidia-h100-80gb-hbm3.trt10.3.0.engine"
    fixed = engine_filename(
        "m.onnx", precision="fp32", min_batch=4, max_batch=4, device_name="?", trt_version="10.0"
    )
    assert fixed == "m.fp32.b4.gpu.trt10.0.engine"


def test_build_arguments_are_checked() -> None:
    with pytest.raises(ExporterError, match="precision 'fp8'"):
        check_build_args("fp8", 1024, 1, 1, 1)
    with pytest.raises(ExporterError, match="workspace"):
        check_build_args("fp16", 0, 1, 1, 1)
    check_build_args("int8", 1024, 1, 2, 4)  # valid: returns quietly


def test_write_atomic_leaves_only_the_final_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.engine"
    write_atomic(target, b"abc")
    write_atomic(target, b"defg")
    assert target.read_bytes() == b"defg"
    assert [p.name for p in target.parent.iterdir()] == ["x.engine"]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_without_tensorrt_names_the_extra(tmp_path: Path) -> None:
    with pytest.raises(RuntimeNotInstalled, match=r"kpc\[trt\]"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", input_shapes={"input": (1, 3, 8, 8)})


def test_build_checks_arguments_before_needing_tensorrt(tmp_path: Path) -> None:
    with pytest.raises(ExporterError, match="1 <= min <= opt <= max"):
        build_engine(
            tmp_path / "m.onnx", tmp_path / "m.engine", input_shapes={"input": (1, 3, 8, 8)}, max_batch=0
        )


def test_trt_engine_matches_torch(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from exporters import export_onnx, get_runner

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(1)).eval()
    inputs = {"input": np.random.default_rng(0).standard_normal((2, 3, 16, 16), dtype=np.float32)}
    onnx_path = export_onnx(
        model, {"input": torch.from_numpy(inputs["input"])}, tmp_path / "m.onnx", dynamic_batch=True
    )
    cache = tmp_path / "timing.cache"
    engine = build_engine(
        onnx_path, tmp_path / "m.engine", input_shapes={"input": (2, 3, 16, 16)}, timing_cache=cache
    )
    assert engine.is_file() and cache.is_file()
    with get_runner("trt") as runner:
        runner.prepare(engine, inputs)
        got = runner.infer(inputs)["output"]
        with torch.inference_mode():
            want = model(torch.from_numpy(inputs["input"])).numpy()
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)
        assert runner.infer_timed(inputs) > 0


def _conv_onnx(path: Path, dynamic: bool) -> Path:
    from exporters import export_onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    return export_onnx(model, {"input": torch.randn(1, 3, 8, 8)}, path, dynamic_batch=dynamic)


def test_int8_is_refused_without_quantization_nodes_before_needing_tensorrt(tmp_path: Path) -> None:
    from exporters.tensorrt_engine import build_engine_bytes, has_quantization_nodes

    onnx_path = _conv_onnx(tmp_path / "m.onnx", dynamic=False)
    assert not has_quantization_nodes(onnx_path)
    with pytest.raises(ExporterError, match="no QuantizeLinear/DequantizeLinear nodes"):
        build_engine_bytes(onnx_path, input_shapes={"input": (1, 3, 8, 8)}, precision="int8")


def test_a_profile_is_made_only_for_dynamic_graphs(tmp_path: Path) -> None:
    from exporters.tensorrt_engine import dynamic_inputs

    assert not dynamic_inputs(_conv_onnx(tmp_path / "static.onnx", dynamic=False))
    assert dynamic_inputs(_conv_onnx(tmp_path / "dynamic.onnx", dynamic=True))


def test_engines_are_built_and_run_through_polygraphy() -> None:
    from exporters.tensorrt_engine import import_polygraphy

    backend = import_polygraphy()  # pure Python: importable without TensorRT, which it loads lazily
    assert all(hasattr(backend, name) for name in ("TrtRunner", "EngineBytesFromNetwork", "NetworkFromOnnxPath",
                                                   "CreateConfig", "Profile", "EngineFromBytes"))
