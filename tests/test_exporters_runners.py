"""One contract test for every runtime in RUNTIMES, plus the runner factory's errors.

A runtime that cannot run on this machine is not skipped: the test asserts that
``get_runner`` refuses it with the typed error a user would see.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters import (
    RUNTIMES,
    DeviceUnavailable,
    ExporterError,
    RuntimeNotInstalled,
    UnknownRuntime,
    export_onnx,
    get_runner,
)

GPU_RUNTIMES = {"torch-cuda", "ort-cuda", "trt"}


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(1),
        torch.nn.Linear(32, 10),
    )
    return model.eval()


def image(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((batch, 3, 32, 32), dtype=np.float32)}


def reference(model: torch.nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(inputs["input"])).numpy()


def expected_refusal(runtime: str) -> type[Exception] | None:
    """What get_runner must raise here, probed independently of the runners' own checks."""
    if runtime in GPU_RUNTIMES and not torch.cuda.is_available():
        return DeviceUnavailable
    if runtime == "trt" and importlib.util.find_spec("tensorrt") is None:
        return RuntimeNotInstalled
    if runtime == "ort-cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return RuntimeNotInstalled
    return None


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_runner_contract(runtime: str) -> None:
    refusal = expected_refusal(runtime)
    if refusal is not None:
        with pytest.raises(refusal) as info:
            get_runner(runtime, threads=1)
        message = str(info.value)
        assert runtime in message and "\n" not in message
        assert info.value.exit_code == 2
        if refusal is DeviceUnavailable:
            assert "GPU" in message and "ort-cpu" in message
        else:
            assert "pip install" in message and ("onnxruntime-gpu" in message or "kpc[trt]" in message)
        return

    model, inputs = small_cnn(), image()
    with get_runner(runtime, threads=1) as runner:
        assert runner.name == runtime
        runner.prepare(model, inputs)
        outputs = runner.infer(inputs)
        assert list(outputs) == ["output"]
        np.testing.assert_allclose(outputs["output"], reference(model, inputs), atol=1e-4, rtol=1e-3)

        other = image(seed=1)  # a second input set is staged afresh, not served from the cache
        np.testing.assert_allclose(
            runner.infer(other)["output"], reference(model, other), atol=1e-4, rtol=1e-3
        )

        timings = [runner.infer_timed(inputs) for _ in range(3)]
        assert all(math.isfinite(t) and t > 0 for t in timings)

        description = runner.describe()
        assert description["runtime"] == runtime
        assert description["threads"] == 1
        assert description["precision"] == "fp32"
        assert description["batch"] == 1
        assert description["device"] and description["versions"]


def test_unknown_runtime_lists_the_known_ones() -> None:
    with pytest.raises(UnknownRuntime) as info:
        get_runner("tvm")
    message = str(info.value)
    assert "'tvm'" in message
    assert all(name in message for name in RUNTIMES)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("runtime", ["torch-cpu", "ort-cpu"])
def test_threads_are_pinned_and_recorded(runtime: str) -> None:
    model, inputs = small_cnn(), image()
    with get_runner(runtime, threads=3) as runner:
        runner.prepare(model, inputs)
        runner.infer(inputs)
        assert runner.describe()["threads"] == 3
        if runtime == "torch-cpu":
            assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == 1  # the torch runner restores the process setting


def test_default_threads_follow_torch() -> None:
    runner = get_runner("ort-cpu")
    assert runner.threads == torch.get_num_threads() == 1


def test_bad_thread_count_is_rejected() -> None:
    with pytest.raises(ExporterError, match="threads must be a positive integer"):
        get_runner("torch-cpu", threads=0)


@pytest.mark.parametrize(("runtime", "precision"), [("torch-cpu", "fp16"), ("ort-cpu", "bf16")])
def test_unsupported_precision_is_rejected(runtime: str, precision: str) -> None:
    with pytest.raises(ExporterError, match="does not support precision"):
        get_runner(runtime, precision=precision)


def test_torch_cpu_bf16_autocast_is_close_to_fp32() -> None:
    model, inputs = small_cnn(), image()
    with get_runner("torch-cpu", precision="bf16", threads=1) as runner:
        runner.prepare(model, inputs)
        got = runner.infer(inputs)["output"]
        assert got.dtype == np.float32  # bf16 has no numpy type; outputs come back as fp32
        np.testing.assert_allclose(got, reference(model, inputs), atol=5e-2, rtol=5e-2)
        assert runner.describe()["precision"] == "bf16"


def test_torch_runner_leaves_callers_module_alone() -> None:
    model = small_cnn().train()
    with get_runner("torch-cpu", threads=1, channels_last=True) as runner:
        runner.prepare(model, image())
        runner.infer(image())
    assert model.training
    assert model[0].weight.is_contiguous()  # not converted to channels_last


class _ViewFlatten(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


def test_channels_last_a_model_cannot_take_is_a_typed_error() -> None:
    """`x.view(x.size(0), -1)` on NHWC activations: "internal error" from kpc bench --channels-last before."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _ViewFlatten(), torch.nn.Linear(8 * 32 * 32, 4))
    with (get_runner("torch-cpu", threads=1, channels_last=True) as runner,
          pytest.raises(ExporterError, match=r"does not run in channels_last \(view size .*drop --channels-last")):
        runner.prepare(model, image())
    with get_runner("torch-cpu", threads=1) as runner:  # its own layout runs
        runner.prepare(model, image())
        assert runner.infer(image())["output"].shape == (1, 4)


def test_torch_runner_refuses_files(tmp_path: Path) -> None:
    with pytest.raises(ExporterError, match=r"runs a torch\.nn\.Module"):
        get_runner("torch-cpu").prepare(tmp_path / "model.onnx", image())


def test_ort_runner_on_dynamic_batch_file(tmp_path: Path) -> None:
    model = small_cnn()
    tensors = {"input": torch.from_numpy(image()["input"])}
    path = export_onnx(model, tensors, tmp_path / "small.onnx", dynamic_batch=True)
    with get_runner("ort-cpu", threads=1) as runner:
        runner.prepare(path, image())
        batch2 = image(batch=2, seed=3)
        got = runner.infer(batch2)["output"]
        assert got.shape == (2, 10)
        np.testing.assert_allclose(got, reference(model, batch2), atol=1e-4, rtol=1e-3)
        assert runner.describe()["model"] == str(path)


def test_ort_runner_names_inputs_it_expects(tmp_path: Path) -> None:
    with get_runner("ort-cpu", threads=1) as runner:
        runner.prepare(small_cnn(), image())
        with pytest.raises(ExporterError, match=r"expects inputs \['input'\]"):
            runner.infer({"pixels": image()["input"]})


def test_ort_runner_checks_model_precision(tmp_path: Path) -> None:
    tensors = {"input": torch.from_numpy(image()["input"])}
    path = export_onnx(small_cnn(), tensors, tmp_path / "half.onnx", fp16=True)
    with pytest.raises(ExporterError, match="precision='fp16'"), get_runner("ort-cpu", threads=1) as runner:
        runner.prepare(path, image())
    with get_runner("ort-cpu", threads=1, precision="fp16") as runner:
        runner.prepare(path, image())
        assert runner.infer(image())["output"].dtype == np.float16


def test_missing_onnx_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExporterError, match="does not exist; export the model first"):
        get_runner("ort-cpu").prepare(tmp_path / "nope.onnx", image())


def test_install_hints_name_the_extras() -> None:
    # onnxruntime-gpu replaces onnxruntime (same module): the hint removes both, then installs the GPU wheel
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in \
        str(RuntimeNotInstalled("ort-cuda"))
    assert 'pip install "kpc[trt]"' in str(RuntimeNotInstalled("trt"))
    assert "tensorrt" in str(RuntimeNotInstalled("trt"))
