"""`kpc export` end to end on pruned real networks: ONNX file, ORT parity, export.json, and every failure mode."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import kpc
from exporters.errors import ParityError
from kpc.artifact import open_model
from kpc.budget import Budget
from kpc.cli import app
from kpc.export import IMAGE_LIKE, ExportSettings, check_parity, export_model, parity_inputs

from .conftest import SMALL, needs_fashion_mnist, prune_spec

runner = CliRunner()
MODELS = ["resnet18", "mobilenet_v3_large", "efficientnet_b0"]
# Seeded init: the pruner's landing loop can miss a 0.5 budget by a rounding hair for some
# random inits of the small models (see the report); a fixed seed keeps these tests about export.
SEED = 1


def make_pruned(spec: str, ratio: float, out):
    torch.manual_seed(SEED)
    _loaded, result = prune_spec(spec, Budget(ratio=ratio), calib_batches=1, calib_batch_size=2)
    return kpc.save(result, out)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned")
    return {name: make_pruned(f"torchvision:{name}", 0.5, root / name) for name in MODELS}


def assert_one_error_line(result, code: int, fragment: str) -> str:
    """Exit code, no traceback, exactly one `kpc: error:` line on stderr, naming the problem."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("kpc: error:")]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("name", MODELS)
def test_export_pruned_model_matches_pytorch_in_onnx_runtime(name, artifacts, tmp_path):
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(artifacts[name]), "--onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "ok   output: shape (1, 10)" in result.stderr  # one line per output, printed

    record = json.loads((out / "export.json").read_text())
    assert record["schema"] == "kpc-export/1"
    assert record["model"]["artifact"] == str(artifacts[name]) and record["model"]["input_size"] == list(SMALL)
    assert record["onnx"] | {"sha256": None} == {"file": "model.onnx", "sha256": None, "opset": 17, "batch": 1,
                                                "dynamic_batch": False, "fp16": False, "inputs": ["input"],
                                                "outputs": ["output"]}
    parity = record["parity"]
    assert parity["ok"] and parity["samples"] == 3 and (parity["atol"], parity["rtol"]) == (1e-4, 1e-3)
    # Logits of a model whose BatchNorm was re-estimated on two images can reach the hundreds, so the
    # absolute error alone is not the measure: severity is max |d| / (atol + rtol * |reference|).
    assert [o["name"] for o in parity["outputs"]] == ["output"] and parity["outputs"][0]["severity"] <= 1.0

    # Independent of kpc's own check: a bare ONNX Runtime session against the reloaded artifact.
    x = torch.randn(1, *SMALL, generator=torch.Generator().manual_seed(7))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    reloaded = kpc.load(artifacts[name])  # outside no_grad: replaying the plan traces with autograd
    with torch.no_grad():
        want = reloaded(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx"]  # no temporaries left


def test_dynamic_batch_and_opset_are_honoured(artifacts, tmp_path):
    out = tmp_path / "dyn"
    result = runner.invoke(app, ["export", str(artifacts["resnet18"]), "--onnx", "--dynamic-batch", "--opset", "13",
                                 "--batch", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out / "model.onnx"))
    assert graph.opset_import[0].version == 13
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((5, *SMALL), np.float32)})[0].shape == (5, 10)
    record = json.loads((out / "export.json").read_text())
    assert record["onnx"]["dynamic_batch"] and record["parity"]["batch"] == 2
    assert record["parity_second_batch"]["ok"] and record["parity_second_batch"]["batch"] == 4  # checked at 2 + 2


def test_parity_check_catches_a_perturbed_model(artifacts, tmp_path):
    """A real mismatch: the exported graph against the same module with its classifier weights nudged."""
    loaded = open_model(str(artifacts["resnet18"]))
    export_model(loaded, tmp_path / "ok", ExportSettings())
    perturbed = copy.deepcopy(loaded.model)
    with torch.no_grad():
        perturbed.fc.weight.add_(0.05 * torch.randn_like(perturbed.fc.weight))
    samples, _ = parity_inputs(loaded, batch=1, count=2)
    checks = check_parity(perturbed, tmp_path / "ok" / "model.onnx", samples, atol=1e-4, rtol=1e-3)
    assert [c.name for c in checks] == ["output"] and not checks[0].ok and checks[0].max_abs > 1e-3
    with pytest.raises(ParityError) as caught:
        from exporters import raise_on_failures

        raise_on_failures(checks)
    assert caught.value.exit_code == 1
    assert "output 'output' does not match the reference: max abs diff" in str(caught.value)
    # The unperturbed module still passes on the same file and inputs.
    assert all(c.ok for c in check_parity(loaded.model, tmp_path / "ok" / "model.onnx", samples, atol=1e-4, rtol=1e-3))


def test_parity_failure_through_the_cli_exits_1_and_writes_nothing(artifacts, tmp_path):
    """An fp16 graph cannot meet an fp32-level tolerance: exit 1, the worst output named, no output directory."""
    out = tmp_path / "fp16"
    result = runner.invoke(app, ["export", str(artifacts["resnet18"]), "--onnx", "--fp16",
                                 "--atol", "1e-7", "--rtol", "0", "--out", str(out)])
    line = assert_one_error_line(result, 1, "output 'output' does not match the reference")
    assert "exceeds atol 1e-07" in line
    assert "FAIL output" in result.stderr
    assert not out.exists() and not any(p.name.startswith(".fp16") for p in tmp_path.iterdir())


def test_fp16_export_passes_with_its_default_tolerances(artifacts, tmp_path):
    out = tmp_path / "fp16"
    result = runner.invoke(app, ["export", str(artifacts["resnet18"]), "--onnx", "--fp16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "export.json").read_text())
    assert record["onnx"]["fp16"] and record["parity"]["precision"] == "fp16"
    assert (record["parity"]["atol"], record["parity"]["rtol"]) == (5e-2, 5e-2)
    graph = onnx.load(str(out / "model.onnx"))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: this test covers the no-GPU path")
def test_trt_without_a_gpu_is_one_line_exit_2(artifacts, tmp_path):
    out = tmp_path / "trt"
    result = runner.invoke(app, ["export", str(artifacts["resnet18"]), "--trt", "--fp16", "--batch", "64",
                                 "--out", str(out)])
    assert_one_error_line(result, 2, "runtime 'trt' needs a CUDA GPU")
    assert not out.exists()


def test_incomplete_artifact_is_exit_2(artifacts, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(artifacts["resnet18"], broken)
    (broken / "model.safetensors").unlink()
    result = runner.invoke(app, ["export", str(broken), "--onnx", "--out", str(tmp_path / "x")])
    assert_one_error_line(result, 2, "is incomplete: model.safetensors is missing")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "nothing to export: pass --onnx, --trt or both"),
        (["--onnx", "--int8"], "--int8 applies to TensorRT engines only"),
        (["--onnx", "--opset", "5"], "--opset 5 is out of range"),
        (["--onnx", "--atol", "-1"], "--atol must be a finite number >= 0"),
    ],
)
def test_bad_options_are_exit_2(args, fragment, tmp_path):
    result = runner.invoke(app, ["export", "torchvision:resnet18", *args, "--out", str(tmp_path / "x")])
    assert_one_error_line(result, 2, fragment)
    assert not (tmp_path / "x").exists()


def test_existing_output_is_not_overwritten_without_flag(artifacts, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(artifacts["resnet18"]), "--onnx", "--out", str(out)])
    assert_one_error_line(result, 2, "already exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_spec_export_with_input_size(tmp_path):
    """A spec (not an artifact) exports too, shaped by --num-classes/--input-size."""
    out = tmp_path / "spec"
    result = runner.invoke(app, ["export", "torchvision:resnet18", "--num-classes", "10", "--input-size", "3x32x32",
                                 "--onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "export.json").read_text())
    assert record["model"]["artifact"] is None and record["model"]["input_size"] == [3, 32, 32]


FOLD_NET = '''
import torch
from torch import nn


class FoldNet(nn.Module):
    """nn.Fold lowers to ONNX's Col2Im, which exists from opset 18 on."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.fold = nn.Fold(output_size=(8, 8), kernel_size=2, stride=2)
        self.head = nn.Linear(3, 10)

    def forward(self, x):
        return self.head(self.fold(self.conv(x).flatten(2)).mean((2, 3)))


def make():
    return FoldNet()
'''


def test_an_operator_of_a_later_opset_moves_the_default_export_there(tmp_path):
    """volo's col2im failed the export at the default opset 17; without --opset the export moves to 18."""
    source = tmp_path / "foldnet.py"
    source.write_text(FOLD_NET)
    spec = f"{source}:make"
    out = tmp_path / "auto"
    result = runner.invoke(app, ["export", spec, "--input-size", "3x4x4", "--onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "export.json").read_text())
    assert record["onnx"]["opset"] == 18 and record["parity"]["ok"]
    assert onnx.load(str(out / "model.onnx")).opset_import[0].version == 18
    pinned = runner.invoke(app, ["export", spec, "--input-size", "3x4x4", "--onnx", "--opset", "17",
                                 "--out", str(tmp_path / "pinned")])
    assert_one_error_line(pinned, 2, "ONNX export failed at opset 17")
    assert not (tmp_path / "pinned").exists()


@needs_fashion_mnist
def test_the_parity_check_runs_the_images_the_model_was_calibrated_on(tmp_path):
    """BatchNorm re-estimated on grayscale images replicated to RGB: the check feeds those, not colour noise."""
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", "torchvision:mobilenet_v3_small", "--num-classes", "10", "--input-size",
                                 "3x32x32", "--budget-ratio", "0.6", "--data", "fashion-mnist", "--calib-batches", "1",
                                 "--calib-batch-size", "4", "--sensitivity", "0", "--bn-recalibrate", "2",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    loaded = open_model(str(out))
    samples, inputs = parity_inputs(loaded, batch=2, count=2)
    assert inputs.startswith("fashion-mnist") and len(samples) == 2
    images = samples[0]["input"]
    assert images.shape == (2, 3, 32, 32) and np.array_equal(images[:, 0], images[:, 2])  # replicated gray
    record = export_model(loaded, tmp_path / "export", ExportSettings(samples=2))
    assert record["parity"]["ok"] and record["parity"]["inputs"] == inputs

    elsewhere = replace(loaded, plan=replace(loaded.plan, data="fashion-mnist:/nonexistent/fashion-mnist"))
    samples, inputs = parity_inputs(elsewhere, batch=2, count=1)
    assert inputs == IMAGE_LIKE and not np.array_equal(samples[0]["input"][:, 0], samples[0]["input"][:, 2])
