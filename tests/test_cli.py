"""The CLI end to end: through CliRunner and through the installed `kpc` command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import kpc
from kpc.cli import app

from .conftest import needs_fashion_mnist

runner = CliRunner()


def _kpc_command() -> list[str]:
    script = Path(sys.executable).with_name("kpc")
    return [str(script)] if script.exists() else [shutil.which("kpc") or "kpc"]


@needs_fashion_mnist
def test_prune_inspect_load_on_fashion_mnist(tmp_path):
    out = tmp_path / "r18"
    result = runner.invoke(app, ["prune", "torchvision:resnet18", "--num-classes", "10", "--input-size", "1x32x32",
                                 "--budget-ratio", "0.5", "--data", "fashion-mnist", "--calib-batches", "2",
                                 "--calib-batch-size", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["rounds"][0]["importance"]["data"].startswith("fashion-mnist")
    assert plan["rounds"][0]["counted_cost"] <= plan["rounds"][0]["limit"]
    shown = runner.invoke(app, ["inspect", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.output)
    assert summary["totals"]["macs"] < 0.51 * summary["totals"]["base_macs"]
    assert any(g["kept_width"] < g["width"] for g in summary["groups"])
    table = runner.invoke(app, ["inspect", str(out)])
    assert table.exit_code == 0 and "layer1.0.conv1" in table.output
    assert "round 1 took" in table.output and "importance" in summary["rounds"][0]["seconds"]
    model = kpc.load(out)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune", "torchvision:resnet5O", "--budget-ratio", "0.5"], "did you mean torchvision:resnet50"),
        (["prune", "torchvision:resnet18", "--budget-ratio", "0.5", "--data", "imagefolder:/nonexistent/x"],
         "does not exist"),
        (["prune", "torchvision:resnet18", "--input-size", "3x32x32", "--budget-gflops", "0.000001"],
         "below the smallest achievable cost"),
        (["prune", "torchvision:resnet18", "--input-size", "3x32x32", "--budget-gflops", "50"],
         "at or above the model's current cost"),
        (["prune", "torchvision:resnet18", "--budget-gflops", "1", "--budget-ratio", "0.5"], "exactly one budget"),
        (["prune", "torchvision:resnet18", "--budget-ratio", "0.5", "--weights", "/nonexistent.pt"],
         "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_installed_command_reports_version_and_errors(tmp_path):
    version = subprocess.run([*_kpc_command(), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"kpc {kpc.__version__}"
    bad = subprocess.run([*_kpc_command(), "inspect", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("kpc: error:") and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr


def test_installed_command_prunes_end_to_end(tmp_path):
    out = tmp_path / "mnv3"
    done = subprocess.run([*_kpc_command(), "prune", "torchvision:mobilenet_v3_large", "--num-classes", "10",
                           "--input-size", "3x64x64", "--budget-ratio", "0.6", "--calib-batches", "1",
                           "--calib-batch-size", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (out / "plan.json").is_file() and (out / "model.safetensors").is_file()
    assert "wrote" in done.stderr
