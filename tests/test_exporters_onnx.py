"""ONNX export and parity validation on real torchvision models (random init, small inputs)."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision

from exporters import (
    ExporterError,
    OutputCheck,
    ParityError,
    compare_outputs,
    export_onnx,
    raise_on_failures,
    validate_onnx,
)

ATOL, RTOL = 1e-5, 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


MODELS = {
    "resnet18": torchvision.models.resnet18,
    "mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
    "efficientnet_b0": torchvision.models.efficientnet_b0,
}


@cache
def calibrated(name: str) -> torch.nn.Module:
    """Random init with BatchNorm statistics from a batch, so outputs are not ~0.

    With fresh running stats every BN is an identity and the logits of these models are
    ~1e-16, which any tolerance would pass; calibrating makes parity a real check. Cached:
    building and first forwards dominate the test time; nothing below mutates the model.
    """
    torch.manual_seed(0)
    model = MODELS[name](num_classes=10)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.kaiming_normal_(module.weight)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))
    return model.eval()


def image(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((batch, 3, 64, 64), dtype=np.float32)}


def as_tensors(inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in inputs.items()}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_export_matches_pytorch_on_onnxruntime(name: str, dynamic: bool, tmp_path: Path) -> None:
    model = calibrated(name)
    path = export_onnx(model, as_tensors(image()), tmp_path / f"{name}.onnx", dynamic_batch=dynamic)

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["output"]
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert (batch_dim.dim_param == "batch") if dynamic else (batch_dim.dim_value == 1)

    batches = [1, 2] if dynamic else [1]
    for batch in batches:
        checks = validate_onnx(model, path, image(batch, seed=batch), atol=ATOL, rtol=RTOL, threads=1)
        assert [c.name for c in checks] == ["output"]
        assert all(c.ok for c in checks), [c.line() for c in checks]
        assert checks[0].shape_ref == checks[0].shape_got == (batch, 10)
        raise_on_failures(checks)  # must not raise


def test_static_export_rejects_other_batch(tmp_path: Path) -> None:
    model = calibrated("resnet18")
    path = export_onnx(model, as_tensors(image()), tmp_path / "static.onnx")
    with pytest.raises(ExporterError, match=r"takes \(1, 3, 64, 64\).*dynamic_batch=True"):
        validate_onnx(model, path, image(batch=2))


def test_wrong_model_fails_with_parity_error_naming_worst_output(tmp_path: Path) -> None:
    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(1))
            self.small = torch.nn.LazyLinear(4)
            self.large = torch.nn.LazyLinear(4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.body(x)
            return self.small(h), self.large(h)

    torch.manual_seed(0)
    inputs = {"input": np.random.default_rng(1).standard_normal((1, 3, 16, 16), dtype=np.float32)}
    exported = TwoHeads()
    exported(torch.from_numpy(inputs["input"]))  # materialise the lazy layers
    exported.eval()
    path = export_onnx(exported, as_tensors(inputs), tmp_path / "two.onnx", output_names=["small", "large"])

    reference = copy.deepcopy(exported)
    with torch.no_grad():
        reference.small.bias.add_(1e-3)  # slightly off
        reference.large.bias.add_(1.0)  # badly off: the worst output

    checks = validate_onnx(reference, path, inputs)
    assert [c.name for c in checks] == ["small", "large"]
    assert not any(c.ok for c in checks)
    by_name = {c.name: c for c in checks}
    assert by_name["large"].max_abs == pytest.approx(1.0, rel=1e-4)
    assert by_name["small"].max_abs == pytest.approx(1e-3, rel=1e-2)
    assert "FAIL large" in by_name["large"].line()

    with pytest.raises(ParityError) as info:
        raise_on_failures(checks)
    error = info.value
    assert error.exit_code == 1
    assert [c.name for c in error.failures] == ["large", "small"]
    message = str(error)
    assert "\n" not in message
    assert message.startswith("output 'large'")
    assert "+1 more failed output" in message


def test_shape_mismatch_is_reported_before_values() -> None:
    ref = {"logits": np.zeros((1, 10), np.float32)}
    got = {"logits": np.zeros((1, 9), np.float32)}
    (check,) = compare_outputs(ref, got, atol=1e-4, rtol=1e-3)
    assert not check.ok
    assert check.shape_ref == (1, 10) and check.shape_got == (1, 9)
    assert "shape (1, 9) != reference (1, 10)" in check.line()


def test_missing_and_nan_outputs_fail() -> None:
    ref = {"a": np.ones(3, np.float32), "b": np.ones(3, np.float32)}
    got = {"a": np.array([1.0, np.nan, 1.0], np.float32)}
    checks = {c.name: c for c in compare_outputs(ref, got, atol=1e-4, rtol=1e-3)}
    assert not checks["a"].ok and "NaN" in checks["a"].problem()
    assert not checks["b"].ok and checks["b"].problem() == "missing from the export"


def test_outputs_matched_by_position_when_names_differ() -> None:
    ref = {"output": np.array([1.0, 2.0], np.float32)}
    got = {"logits": np.array([1.0, 2.0 + 1e-6], np.float32)}
    (check,) = compare_outputs(ref, got, atol=1e-4, rtol=1e-3)
    assert isinstance(check, OutputCheck)
    assert check.ok and check.name == "logits"
    assert check.max_abs == pytest.approx(1e-6, rel=0.1)


def test_a_passing_line_says_how_much_of_the_bound_was_used() -> None:
    """An element near zero gives a max_rel above rtol in a check that passes; the line printed
    "max_rel 0.257 (rtol 0.05)" beside "ok", which read as a failure."""
    ref = {"logits": np.array([1.0, 0.001])}
    got = {"logits": np.array([1.001, 0.0012])}
    (check,) = compare_outputs(ref, got, atol=1e-3, rtol=0.05)
    assert check.ok and check.max_rel > 0.05
    assert check.line().startswith("ok ") and "worst element at 19% of atol 0.001 + rtol 0.05 x |ref|" in check.line()


def test_atol_is_in_units_of_the_outputs_scale() -> None:
    """float32 rounding in an output reaching 1e13 leaves errors near 1e6 on its small elements: right to 7 digits
    of the output, and failed by a fixed atol (a random-init MobileOne's export)."""
    ref = {"logits": np.array([[1e13, -4e12, 3.0]])}
    rounded = {"logits": ref["logits"] + np.array([[2e6, -1e6, 1.5e6]])}
    (check,) = compare_outputs(ref, rounded, atol=1e-4, rtol=1e-3)
    assert check.ok and check.scale == 1e13 and "atol 0.0001 x scale 1e+13" in check.line()
    wrong = {"logits": ref["logits"] + np.array([[0.0, 0.0, 5e10]])}  # a real difference at 0.5% of the scale
    (check,) = compare_outputs(ref, wrong, atol=1e-4, rtol=1e-3)
    assert not check.ok
    small = {"logits": np.array([[0.5, 0.1]])}  # outputs within [-1, 1]: atol as given
    (check,) = compare_outputs(small, {"logits": small["logits"] + 2e-4}, atol=1e-4, rtol=1e-3)
    assert not check.ok and check.scale == 1.0


def test_fp16_export_has_half_weights_and_io(tmp_path: Path) -> None:
    model = calibrated("resnet18")
    path = export_onnx(model, as_tensors(image()), tmp_path / "half.onnx", fp16=True)
    graph = onnx.load(str(path)).graph
    half = onnx.TensorProto.FLOAT16
    assert graph.input[0].type.tensor_type.elem_type == half
    assert graph.output[0].type.tensor_type.elem_type == half
    float_inits = [i for i in graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, half)]
    assert float_inits and all(i.data_type == half for i in float_inits)
    # The caller's module is untouched, and fp16 stays close to fp32 with fp16 tolerances.
    assert next(model.parameters()).dtype == torch.float32
    checks = validate_onnx(model, path, image(), atol=5e-2, rtol=5e-2)
    assert all(c.ok for c in checks), [c.line() for c in checks]


def test_export_writes_atomically(tmp_path: Path) -> None:
    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.eigvals(x).real  # complex intermediates: not exportable

    target = tmp_path / "broken.onnx"
    with pytest.raises(Exception):  # noqa: B017 - the exporter's own error type is not stable
        export_onnx(Broken(), {"x": torch.randn(1, 4, 4)}, target)
    assert list(tmp_path.iterdir()) == []


def test_export_needs_inputs(tmp_path: Path) -> None:
    with pytest.raises(ExporterError, match="at least one example input"):
        export_onnx(torch.nn.Identity(), {}, tmp_path / "x.onnx")


@pytest.mark.parametrize(("size_in", "size_out"), [(2, 7), (5, 3), (13, 6), (7, 7), (1, 4)])
def test_averaging_matrices_are_adaptive_average_pooling(size_in, size_out):
    from exporters.onnx_rewrites import MatmulAdaptiveAvgPool2d

    x = torch.randn(2, 3, size_in, size_in + 1)
    expected = torch.nn.functional.adaptive_avg_pool2d(x, (size_out, size_out))
    got = MatmulAdaptiveAvgPool2d((size_in, size_in + 1), (size_out, size_out))(x)
    torch.testing.assert_close(got, expected)


def test_a_pool_the_exporter_cannot_lower_is_exported_as_matrix_products(tmp_path):
    """VGG at 64x64 pools a 2x2 map to 7x7: the exporter refuses that AdaptiveAvgPool2d as it stands."""
    model = torchvision.models.vgg11(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    path = export_onnx(model, {"input": x}, tmp_path / "vgg.onnx", dynamic_batch=True)
    assert any(node.op_type == "MatMul" for node in onnx.load(str(path)).graph.node)
    assert isinstance(model.avgpool, torch.nn.AdaptiveAvgPool2d), "the caller's model is untouched"
    checks = validate_onnx(model, path, {"input": x.numpy()}, atol=ATOL, rtol=RTOL)
    raise_on_failures(checks)


@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_is_exported_as_the_operations_that_define_it(tmp_path, eps):
    """The exporter has no aten::rms_norm at any opset it implements: aimv2 and gemma4's ViT failed to export."""
    from exporters.onnx_rewrites import decomposed

    norm = torch.nn.RMSNorm(16, eps=eps)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, stride=4), torch.nn.Flatten(2), _Transpose(), norm,
                                torch.nn.Flatten(1), torch.nn.Linear(16 * 16, 10)).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        with decomposed():
            torch.testing.assert_close(model(x), expected)
    path = export_onnx(model, {"input": x}, tmp_path / "rms.onnx", opset=17, dynamic_batch=True)
    assert any(node.op_type == "ReduceMean" for node in onnx.load(str(path)).graph.node)
    raise_on_failures(validate_onnx(model, path, {"input": x.numpy()}, atol=ATOL, rtol=RTOL))


class _Transpose(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class _Windows(torch.nn.Module):
    """Halo attention's key/value windows: a padded map cut into overlapping blocks with Tensor.unfold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8 * 9 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = torch.nn.functional.pad(self.conv(x), [1, 1, 1, 1]).unfold(2, 4, 3).unfold(3, 4, 3)
        return self.head(kv.flatten(1))


def test_unfold_is_exported_as_a_gather_of_its_windows(tmp_path):
    """The exporter's unfold needs the input size, which a padded tensor of a dynamic-batch graph lacks:
    timm's halonet and haloregnetz did not export."""
    from exporters.onnx_rewrites import decomposed

    model = _Windows().eval()
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        with decomposed():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    path = export_onnx(model, {"input": x}, tmp_path / "windows.onnx", opset=17, dynamic_batch=True)
    raise_on_failures(validate_onnx(model, path, {"input": x.numpy()}, atol=ATOL, rtol=RTOL))
    y = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    raise_on_failures(validate_onnx(model, path, {"input": y.numpy()}, atol=ATOL, rtol=RTOL))


class _FunctionalPool(torch.nn.Module):
    """A pool called as a function, as timm's VGG pools its pre-logits map: 2x2 to 3x3 at a small input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.head = torch.nn.Linear(4 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.adaptive_avg_pool2d(self.conv(x), (3, 3)).flatten(1))


def test_a_functional_adaptive_pool_the_exporter_cannot_lower_is_exported_as_matrix_products(tmp_path):
    model = _FunctionalPool().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    path = export_onnx(model, {"input": x}, tmp_path / "pool.onnx", opset=17, dynamic_batch=True)
    assert any(node.op_type == "MatMul" for node in onnx.load(str(path)).graph.node)
    raise_on_failures(validate_onnx(model, path, {"input": x.numpy()}, atol=ATOL, rtol=RTOL))
