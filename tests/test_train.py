"""Training: real Fashion-MNIST, a tiny file-spec ResNet, the real CLI; resume after a real SIGKILL; bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import kpc
from kpc.artifact import open_model
from kpc.cli import app

from .conftest import needs_fashion_mnist, write_tiny

runner = CliRunner()

def kpc_subprocess(*args: str) -> list[str]:
    return [sys.executable, "-m", "kpc", *args]


@needs_fashion_mnist
def test_train_beats_chance_and_writes_a_prunable_artifact(tmp_path):
    out = tmp_path / "teacher"
    result = runner.invoke(app, ["train", write_tiny(tmp_path), "--data", "fashion-mnist", "--subset", "2048",
                                 "--epochs", "2", "--batch-size", "64", "--warmup-epochs", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["kind"] == "trained" and plan["data"].startswith("fashion-mnist")
    assert plan["model"]["input_size"] == [1, 28, 28] and plan["model"]["num_classes"] == 10  # dataset's native
    assert plan["normalization"] == {"mean": [0.286], "std": [0.353]}
    assert plan["metrics"]["epochs"] == 2 and plan["training"]["batch_size"] == 64
    assert plan["metrics"]["last_val_acc"] > 0.5, plan["metrics"]  # chance is 0.1: 64 SGD steps are plenty
    rows = [json.loads(line) for line in (tmp_path / "teacher.work" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_ce", "train_acc", "val_acc", "val_loss", "lr", "images_per_s"} <= set(rows[0])
    assert not (tmp_path / "teacher.work" / "LATEST").exists()  # a finished run keeps no resumable state
    spec = write_tiny(tmp_path)
    model = kpc.load(out, model=open_model(spec, num_classes=10, input_size=(1, 28, 28)).model)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert open_model(str(out), model_file=spec).plan.kind == "trained"  # what kpc prune / distill open


@needs_fashion_mnist
def test_resume_after_sigkill_continues_from_last_checkpoint(tmp_path):
    spec = write_tiny(tmp_path)
    out = tmp_path / "run"
    work = tmp_path / "run.work"
    args = ["train", spec, "--data", "fashion-mnist", "--subset", "6144", "--epochs", "3", "--batch-size", "64",
            "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    process = subprocess.Popen(kpc_subprocess(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (work / "LATEST").is_file():
            assert process.poll() is None, process.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.2)
        time.sleep(1.0)  # well into epoch 2
        assert process.poll() is None, "the run finished before it could be killed: raise --subset"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not out.exists()  # the artifact only appears at the very end
    assert (work / "LATEST").read_text().strip() == "epoch-0001"
    resumed = subprocess.run(kpc_subprocess(*args, "--resume"), capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "after epoch 1" in resumed.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["metrics"]["epochs"] == 3
    assert [r["epoch"] for r in plan["history"]] == [1, 2, 3]
    lines = (work / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    kpc.load(out, model=open_model(spec, num_classes=10, input_size=(1, 28, 28)).model)


def _one_line_exit_2(result, out: Path, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


@needs_fashion_mnist
def test_corrupt_checkpoint_on_resume_is_refused(tmp_path):
    out = tmp_path / "run"
    folder = tmp_path / "run.work" / "epoch-0001"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text("{ not json")
    (tmp_path / "run.work" / "LATEST").write_text("epoch-0001\n")
    args = ["train", write_tiny(tmp_path), "--subset", "256", "--epochs", "2", "--batch-size", "64",
            "--out", str(out)]
    _one_line_exit_2(runner.invoke(app, [*args, "--resume"]), out, "is corrupt")
    _one_line_exit_2(runner.invoke(app, args), out, "pass --resume")  # an unfinished run is never clobbered


def _bad_fashion_mnist(tmp_path: Path) -> str:
    broken = tmp_path / "fm"
    broken.mkdir()
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (broken / stem).write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x05garbage")
    return f"fashion-mnist:{broken}"


def _imagefolder_without_val(tmp_path: Path) -> str:
    (tmp_path / "imgs" / "train" / "cat").mkdir(parents=True)
    return f"imagefolder:{tmp_path / 'imgs'}"


@needs_fashion_mnist
@pytest.mark.parametrize(
    ("make_data", "extra", "message"),
    [
        (lambda p: "fashion-mnist:/nonexistent/fm", [], "does not exist"),
        (_bad_fashion_mnist, [], "not a readable IDX file"),
        (_imagefolder_without_val, [], "no val/ subfolder"),
        (lambda p: "synthetic", [], "training needs labelled data"),
        (lambda p: "fashion-mnist", ["--num-classes", "5"], "has 5 outputs but"),
        (lambda p: "fashion-mnist", ["--optimizer", "lion"], "unknown optimizer"),
    ],
    ids=["missing", "malformed", "imagefolder-no-val", "unlabelled", "num-classes", "optimizer"],
)
def test_bad_training_input_is_one_line_exit_2(tmp_path, make_data, extra, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", write_tiny(tmp_path), "--data", make_data(tmp_path), "--subset", "128",
                                 "--epochs", "1", "--batch-size", "32", *extra, "--out", str(out)])
    _one_line_exit_2(result, out, message)
    assert not (tmp_path / "out.work").exists() or not any((tmp_path / "out.work").glob("epoch-*"))


def test_a_non_finite_loss_names_its_term_and_the_advice_that_fits():
    """A distillation term that overflows on a half-trained teacher was blamed on the learning rate."""
    from kpc.train.loop import non_finite_loss

    finite, inf, nan = torch.tensor(2.3), torch.tensor(float("inf")), torch.tensor(float("nan"))
    ikd = non_finite_loss({"ce": finite, "ikd": inf, "kd": finite}, 0)
    assert ikd.startswith("the inner-distillation loss became inf in epoch 1 while the cross-entropy is 2.3")
    assert "lower --ikd-weight" in ikd and "--lr" not in ikd
    assert "lower --kd-weight" in non_finite_loss({"ce": finite, "kd": nan}, 2)
    assert non_finite_loss({"ce": nan, "ikd": finite}, 0) == "the loss became nan in epoch 1: lower --lr"
    # the cross-entropy broke after a step an enormous distillation term drove: that term is named
    after = non_finite_loss({"ce": nan, "ikd": nan}, 0, previous={"ce": 2.0, "ikd": 1e19, "kd": 3.0})
    assert after.startswith("the inner-distillation loss became 1e+19 in epoch 1 while the cross-entropy is 2"), after
    assert non_finite_loss({"ce": nan}, 0, previous={"ce": 2.0, "ikd": 5.0}).endswith("lower --lr")
