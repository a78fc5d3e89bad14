"""Bad input of every kind: one line on stderr, exit 2, nothing written, never a traceback."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import kpc
from kpc.budget import Budget
from kpc.cli import app
from kpc.plan import digest_of

from .conftest import needs_fashion_mnist, prune_spec, write_tiny

runner = CliRunner()
SPEC = "torchvision:resnet18"
SMALL = ["--num-classes", "10", "--input-size", "3x32x32"]


def one_line_exit_2(result, *fragments: str) -> None:
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in output and len(output.splitlines()) == 1, output
    assert output.startswith("kpc: error:"), output
    for fragment in fragments:
        assert fragment in output, output


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    _loaded, result = prune_spec(SPEC, Budget(ratio=0.5), input_size=(3, 32, 32), calib_batches=1)
    return kpc.save(result, tmp_path_factory.mktemp("artifact") / "child")


def _edited_plan(artifact: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    copy.mkdir()
    for file in artifact.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    plan = json.loads((copy / "plan.json").read_text())
    edit(plan)
    plan["plan_sha256"] = digest_of(plan)  # consistent digest: the schema check itself must refuse it
    (copy / "plan.json").write_text(json.dumps(plan))
    return copy


@pytest.mark.parametrize(("args", "fragment"), [
    (["--budget-ratio", "nan"], "--budget-ratio is nan"),
    (["--budget-gflops", "nan"], "--budget-gflops is nan"),
    (["--budget-ratio", "inf"], "--budget-ratio is inf"),
    (["--budget-ratio", "-0.5"], "must be positive"),
    (["--budget-ratio", "1.5"], "above 1"),
    (["--budget-ratio", "0.5", "--num-classes", "0"], "--num-classes must be a positive integer"),
    (["--budget-ratio", "0.5", "--num-classes", "-5"], "--num-classes must be a positive integer"),
    (["--budget-ratio", "0.5", "--round-to", "0"], "--round-to"),
    (["--budget-ratio", "0.5", "--round-to", "abc"], "--round-to"),
    (["--budget-ratio", "0.5", "--calib-batches", "0"], "--calib-batches"),
    (["--budget-ratio", "0.5", "--calib-batches", str(10**20)], "give fewer or smaller batches"),
    (["--budget-ratio", "0.5", "--calib-batch-size", str(10**8)], "give fewer or smaller batches"),
    (["--budget-ratio", "0.5", "--seed", str(2**70)], "--seed"),
    (["--budget-ratio", "0.5", "--importance", "random"], "unknown importance 'random'"),
    (["--budget-ratio", "0.5", "--importance-precision", "fp64"], "unknown importance precision 'fp64'"),
    (["--budget-ratio", "0.5", "--input-size", "3x9999x9999"], "above kpc's limit"),
    (["--budget-ratio", "0.5", "--ignore", "layer9.*"], "--ignore 'layer9.*' matches no module"),
    (["--budget-ratio", "0.5", "--ignore", " "], "--ignore got an empty pattern"),
])
def test_bad_prune_numbers(args, fragment, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", SPEC, "--input-size", "3x32x32", *args, "--out", str(out)])
    one_line_exit_2(result, fragment)
    assert list(tmp_path.iterdir()) == []


def test_a_weights_file_with_a_non_tensor_and_a_factory_that_raises(tmp_path):
    weights = tmp_path / "w.pt"
    state = dict(torch.nn.Linear(2, 2).state_dict())
    state["note"] = "hello"
    torch.save(state, weights)
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", SPEC, *SMALL, "--budget-ratio", "0.5", "--weights", str(weights),
                                 "--out", str(out)])
    one_line_exit_2(result, "not a tensor")
    factory = tmp_path / "boom.py"
    factory.write_text("def make(num_classes=10):\n    raise RuntimeError('out of memory in the factory')\n")
    result = runner.invoke(app, ["prune", f"{factory}:make", "--budget-ratio", "0.5", "--out", str(out)])
    one_line_exit_2(result, "make() raised RuntimeError: out of memory in the factory")
    assert not out.exists()


def test_a_weights_file_that_is_text(tmp_path):
    """torch.load's own words ('KeyError: 101') said nothing about what the file should be."""
    weights = tmp_path / "weights.txt"
    weights.write_text("conv1.weight: 0.1, 0.2\n")
    result = runner.invoke(app, ["prune", SPEC, *SMALL, "--budget-ratio", "0.5", "--weights", str(weights),
                                 "--out", str(tmp_path / "out")])
    one_line_exit_2(result, "give a state dict saved with torch.save")
    assert not (tmp_path / "out").exists()


def test_an_empty_model_spec(tmp_path):
    """'' was read as the current directory: 'kpc: error:  is a directory but not a kpc artifact'."""
    result = runner.invoke(app, ["prune", "", "--budget-ratio", "0.5", "--out", str(tmp_path / "out")])
    one_line_exit_2(result, "the model is empty")
    one_line_exit_2(runner.invoke(app, ["inspect", " "]), "the artifact directory is empty")
    assert not (tmp_path / "out").exists()


def test_weights_holding_nan_are_refused_by_name(tmp_path):
    """A NaN classifier made every group 'unsafe' (13 warnings) and then a misleading budget error."""
    import torchvision

    state = torchvision.models.resnet18(num_classes=10).state_dict()
    state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))
    weights = tmp_path / "nan.pt"
    torch.save(state, weights)
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", SPEC, *SMALL, "--budget-ratio", "0.5", "--weights", str(weights),
                                 "--out", str(out)])
    one_line_exit_2(result, "non-finite values", "'fc.weight'")
    assert not out.exists()


@pytest.mark.parametrize(("body", "fragment"), [
    ("import sys\nsys.exit(3)\n", "importing"),
    ("import sys\ndef make(num_classes=10):\n    sys.exit('bye')\n", "make() raised SystemExit: bye"),
])
def test_a_model_file_that_calls_sys_exit(body, fragment, tmp_path):
    factory = tmp_path / "quits.py"
    factory.write_text(body)
    out = tmp_path / "out"
    one_line_exit_2(runner.invoke(app, ["prune", f"{factory}:make", "--budget-ratio", "0.5", "--out", str(out)]),
                    fragment)
    assert not out.exists()


@pytest.mark.parametrize("command", [
    ["prune", SPEC, *SMALL, "--budget-ratio", "0.5", "--out"],
    ["profile", SPEC, *SMALL, "--out"],
    ["export", SPEC, *SMALL, "--onnx", "--out"],
    ["bench", SPEC, SPEC, *SMALL, "--json"],
])
def test_an_empty_output_path_is_not_the_current_directory(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_exit_2(runner.invoke(app, [*command, ""]), "the path is empty")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["file", "devnull"])
def test_out_naming_a_file_or_a_device(target, tmp_path):
    out = tmp_path / "taken.txt" if target == "file" else Path("/dev/null")
    if target == "file":
        out.write_text("mine")
    result = runner.invoke(app, ["prune", SPEC, *SMALL, "--budget-ratio", "0.5", "--out", str(out)])
    one_line_exit_2(result, str(out))
    if target == "file":
        assert out.read_text() == "mine"


@pytest.mark.parametrize("command", [
    ["prune", SPEC, *SMALL, "--budget-ratio", "0.5", "--out"],
    ["export", SPEC, *SMALL, "--onnx", "--out"],
    ["profile", SPEC, *SMALL, "--out"],
    ["bench", SPEC, SPEC, *SMALL, "--iters", "2", "--json"],
])
def test_an_output_under_an_existing_file(command, tmp_path):
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    one_line_exit_2(runner.invoke(app, [*command, str(taken / "sub" / "out")]), f"{taken} is not a directory")
    assert taken.read_text() == "mine" and list(tmp_path.iterdir()) == [taken]


@pytest.mark.parametrize(("args", "fragment"), [
    (["--atol", "nan"], "--atol must be a finite number >= 0"),
    (["--rtol", "inf"], "--rtol must be a finite number >= 0"),
    (["--min-batch", "0"], "--min-batch must be at least 1"),
    (["--workspace-mb", "-5"], "--workspace-mb must be at least 1"),
    (["--batch", "4", "--max-batch", "2"], "--min-batch <= --batch <= --max-batch"),
    (["--samples", "100000000"], "--samples 100000000 is above kpc's limit"),
    (["--batch", "100000000"], "give a smaller --batch"),
])
def test_bad_export_settings(args, fragment, tmp_path):
    out = tmp_path / "out"
    one_line_exit_2(runner.invoke(app, ["export", SPEC, *SMALL, "--onnx", *args, "--out", str(out)]), fragment)
    assert list(tmp_path.iterdir()) == []


def test_export_timing_cache_naming_a_directory(tmp_path):
    result = runner.invoke(app, ["export", SPEC, *SMALL, "--onnx", "--timing-cache", str(tmp_path), "--out",
                                 str(tmp_path / "out")])
    one_line_exit_2(result, "--timing-cache", "is a directory")
    assert list(tmp_path.iterdir()) == []


def test_a_batch_too_large_for_memory_is_a_user_mistake(tmp_path):
    result = runner.invoke(app, ["bench", SPEC, SPEC, *SMALL, "--iters", "2", "--batch", str(10**8),
                                 "--json", str(tmp_path / "b.json")])
    one_line_exit_2(result, "out of memory", "give a smaller --batch")
    assert list(tmp_path.iterdir()) == []


def test_bench_json_naming_a_directory(artifact, tmp_path):
    result = runner.invoke(app, ["bench", SPEC, str(artifact), *SMALL, "--iters", "4", "--json", str(tmp_path)])
    one_line_exit_2(result, "is a directory")


def test_thread_counts_no_cpu_has_are_refused_before_the_work(artifact, tmp_path):
    """--threads 10000 ran a bench with hundreds of threads for over 10 minutes."""
    result = runner.invoke(app, ["bench", SPEC, str(artifact), *SMALL, "--iters", "4", "--threads", "10000"])
    one_line_exit_2(result, "threads 10000 is more than 1024")
    out = tmp_path / "t.json"
    result = runner.invoke(app, ["profile", SPEC, *SMALL, "--threads", "10000", "--out", str(out)])
    one_line_exit_2(result, "threads 10000 is more than 1024")
    assert not out.exists()


def _table(header: dict | None = None, **fields) -> dict:
    table = {
        "schema": "kpc-latency-table/1",
        "header": {"device": "cpu", "runtime": "ort-cpu", "runtime_version": "onnxruntime 1", "precision": "fp32",
                   "batch": 1, "threads": 1, "date": "2026-11-30", "kpc_version": "0.1.0", "model": "m",
                   "input_size": [3, 32, 32], "full_model_ms": 1.0, "round_to": 16, **(header or {})},
        "remainder": {"entry_scale": 1.0, "fixed_ms": 0.1, "activation_ms": 0.0, "calibration": []},
        "entries": {"conv k1x1 s1x1 p0x0 d1x1 in8x8 g1 c16->16": {"kind": "conv", "c_in": [8, 16], "c_out": [8, 16],
                                                                  "ms": [[0.1, 0.2], [0.2, 0.3]]}},
    }
    table.update(fields)
    return table


@pytest.mark.parametrize(("table", "fragment"), [
    (_table(entries=[]), "entries should be an object"),
    (_table({"full_model_ms": math.nan}), "full_model_ms should be a finite number"),
    (_table({"full_model_ms": -3.0}), "full_model_ms should be positive"),
    (_table({"round_to": 0}), "round_to should be a positive integer"),
    (_table({"round_to": "16"}), "round_to should be a positive integer"),
    (_table({"threads": 0}), "threads should be at least 1"),
])
def test_corrupt_latency_tables(table, fragment, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", SPEC, *SMALL, "--budget-ms", "1", "--lut", str(path), "--out", str(out)])
    one_line_exit_2(result, fragment)
    shown = runner.invoke(app, ["profile", "--show", str(path)])
    one_line_exit_2(shown, fragment)
    assert not out.exists() and not path.with_suffix(".png").exists()


def test_a_plot_into_a_missing_folder_is_made(tmp_path):
    table = tmp_path / "t.json"
    table.write_text(json.dumps(_table()))
    png = tmp_path / "missing_dir" / "x.png"
    result = runner.invoke(app, ["profile", "--show", str(table), "--out", str(png)])
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 1000


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda p: p.update(input_size="3x32x32"), "input_size"),
    (lambda p: p.update(input_size=[3, 10_000, 10_000]), "above kpc's limit"),
    (lambda p: p["model"].update(kwargs={"no_such_argument": 1}), "building torchvision:resnet18 failed"),
    (lambda p: p["model"].update(name="resnet_nineteen"), "unknown torchvision model"),
    (lambda p: p.update(rounds=1), "rounds should be a list"),
    (lambda p: p["rounds"][0]["groups"][0].pop("prunable"), "prunable is missing"),
    (lambda p: p["rounds"][0]["groups"][0].update(kept=[10_000]), "kept should list distinct channel indices"),
    (lambda p: p.update(format="kpc-artifact/99"), "not a kpc plan"),
    (lambda p: p["rounds"][0]["seconds"]["graph"].update(cpu_s=-1), "seconds.graph.cpu_s is -1"),
    (lambda p: p["rounds"][0]["seconds"].update(graph=3), "seconds.graph should be"),
    # a group left whole is not replayed: its layer was read only by inspect, which crashed (exit 3)
    (lambda p: next(g for g in p["rounds"][0]["groups"] if not g["prunable"]).update(root="x"),
     "names a layer 'x' that this model does not have"),
])
def test_malformed_plans(artifact, tmp_path, edit, fragment):
    broken = _edited_plan(artifact, tmp_path, edit)
    for command in (["inspect", str(broken)], ["export", str(broken), "--onnx", "--out", str(tmp_path / "x")]):
        one_line_exit_2(runner.invoke(app, command), fragment)
    assert not (tmp_path / "x").exists()


def test_a_plan_that_is_not_json(artifact, tmp_path):
    broken = _edited_plan(artifact, tmp_path, lambda p: None)
    (broken / "plan.json").write_text('{"format": "kpc-artifact/2", "model": ')
    one_line_exit_2(runner.invoke(app, ["inspect", str(broken)]), "not valid JSON")


@pytest.mark.parametrize(("partial", "fragment"), [
    ({"schema": "kpc-latency-partial/2", "target": None, "points": []}, "another target"),
    ("[1, 2, 3]", "another kpc version"),
])
def test_resume_of_a_malformed_partial_profile(partial, fragment, tmp_path):
    from exporters.device import cpu_name

    out = tmp_path / "t.json"
    if isinstance(partial, dict):
        partial["target"] = None
    (tmp_path / "t.json.partial").write_text(json.dumps(partial) if isinstance(partial, dict) else partial)
    result = runner.invoke(app, ["profile", SPEC, *SMALL, "--out", str(out), "--resume", "--iters", "3"])
    one_line_exit_2(result, fragment)
    assert not out.exists()
    good_target = {"device": cpu_name(), "runtime": "ort-cpu", "precision": "fp32", "batch": 1, "threads": 2}
    (tmp_path / "t.json.partial").write_text(json.dumps({"schema": "kpc-latency-partial/2", "target": good_target,
                                                         "points": {"x": [1, 2]}, "reference_ms": []}))
    result = runner.invoke(app, ["profile", SPEC, *SMALL, "--out", str(out), "--resume", "--iters", "3"])
    one_line_exit_2(result, "malformed")


@needs_fashion_mnist
@pytest.mark.parametrize(("args", "fragment"), [
    (["--label-smoothing", "1.5"], "--label-smoothing must be a finite number in [0, 1)"),
    (["--workers", "-1"], "--workers must be an integer at least 0"),
    (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number"),
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--seed", str(2**70)], "--seed"),
    (["--subset", "1"], "--subset must be an integer at least 2"),
    (["--threads", "0"], "--threads must be an integer between 1 and 1024"),
    (["--threads", "-2"], "--threads must be an integer between 1 and 1024"),
    (["--threads", "10000"], "--threads must be an integer between 1 and 1024"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--batch-size", "1"], "--batch-size"),
])
def test_bad_training_settings(args, fragment, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", write_tiny(tmp_path), "--subset", "64", "--epochs", "1", *args,
                                 "--out", str(out)])
    one_line_exit_2(result, fragment)
    assert not out.exists() and not (tmp_path / "out.work").exists()


@needs_fashion_mnist
def test_training_a_model_that_fails_on_its_input_or_returns_no_logits(tmp_path):
    """The run's first forward pass: a grayscale model given three channels, a model returning a pair."""
    out = tmp_path / "out"
    common = ["--subset", "64", "--epochs", "1", "--out", str(out)]
    result = runner.invoke(app, ["train", write_tiny(tmp_path), "--input-size", "3x28x28", *common])
    one_line_exit_2(result, "the model fails on an input of shape (1, 3, 28, 28)", "--input-size")
    pair = tmp_path / "pair.py"
    pair.write_text("from torch import nn\n\n\nclass Pair(nn.Module):\n    def __init__(self, num_classes=10):\n"
                    "        super().__init__()\n        self.conv = nn.Conv2d(1, 8, 3)\n"
                    "        self.fc = nn.Linear(8, num_classes)\n\n    def forward(self, x):\n"
                    "        features = self.conv(x).mean((2, 3))\n        return self.fc(features), features\n")
    one_line_exit_2(runner.invoke(app, ["train", f"{pair}:Pair", *common]), "the model returns a tuple")
    assert not out.exists() and not (tmp_path / "out.work").exists()


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_threads_must_be_positive_everywhere(threads, tmp_path):
    for command in (["bench", SPEC, SPEC, *SMALL, "--threads", threads],
                    ["profile", SPEC, *SMALL, "--threads", threads, "--out", str(tmp_path / "t.json")]):
        one_line_exit_2(runner.invoke(app, command), "--threads")


@pytest.mark.parametrize(("args", "fragment"), [
    (["--bn-recalibrate", "-3"], "--bn-recalibrate"),
    (["--bn-recalibrate", "5", "--data", "synthetic"], "--bn-recalibrate needs real data"),
])
def test_bad_bn_recalibration(args, fragment, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", SPEC, *SMALL, "--budget-ratio", "0.5", *args, "--out", str(out)])
    one_line_exit_2(result, fragment)
    assert not out.exists()


def test_torchscript_modules_are_refused_by_name_before_any_work():
    """Before: "internal error: register_forward_pre_hook is not supported on ScriptModules"."""
    from torch import nn

    def block() -> nn.Module:
        return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    model = nn.Sequential(nn.Conv2d(3, 8, 3), torch.jit.script(block().eval()), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    example = torch.randn(1, 3, 16, 16)
    with pytest.raises(kpc.KpcError, match=r"^1 is a TorchScript module, which kpc cannot trace or cut: build"):
        kpc.prune(model, example, Budget(ratio=0.5))
    with pytest.raises(kpc.KpcError, match=r"^1 is a TorchScript module"):
        kpc.profile(model, example, iters=2)
    scripted = torch.jit.script(nn.Sequential(block(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval())
    with pytest.raises(kpc.KpcError, match=r"^the model is a TorchScript module"):
        kpc.prune(scripted, torch.randn(1, 8, 16, 16), Budget(ratio=0.5))


def test_a_model_no_input_size_fits_is_told_why():
    """"Give an --input-size the model accepts" could not be followed by a two-input or a 1-D model."""
    from torch import nn

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.conv(image * mask).mean((2, 3))

    audio = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4))
    example = torch.randn(1, 3, 16, 16)
    with pytest.raises(kpc.KpcError, match=r"this forward takes 2 inputs \(image, mask\): wrap it in a module"):
        kpc.prune(TwoInputs().eval(), example, Budget(ratio=0.5))
    with pytest.raises(kpc.KpcError, match=r"image models that take \(N, C, H, W\) batches, and this one is built "
                                           r"of Conv1d layers"):
        kpc.prune(audio.eval(), example, Budget(ratio=0.5))


def test_calibration_images_of_another_size_are_refused():
    """They ran silently: importance and BatchNorm statistics of another resolution than the one pruned for."""
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 4)).eval()
    larger = [(torch.randn(4, 3, 64, 64), torch.randint(0, 4, (4,)))]
    with pytest.raises(kpc.KpcError, match=r"calibration batch 0 holds images of shape \(3, 64, 64\), but "
                                           r"example_inputs are \(3, 32, 32\)"):
        kpc.prune(model, torch.randn(1, 3, 32, 32), Budget(ratio=0.5), calibration=larger)
    fitting = (batch for batch in [(torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,)))] * 2)  # a one-shot iterator
    assert kpc.prune(model, torch.randn(1, 3, 32, 32), Budget(ratio=0.6), calibration=fitting).round.landed


def test_a_finished_table_is_neither_replaced_nor_resumed_without_overwrite(tmp_path):
    """kpc profile replaced an existing table without a word, and --resume on a finished one measured it all again."""
    table = tmp_path / "t.json"
    table.write_text("{}")
    result = runner.invoke(app, ["profile", SPEC, *SMALL, "--out", str(table), "--iters", "3"])
    one_line_exit_2(result, "t.json exists: pass --overwrite to measure it again")
    result = runner.invoke(app, ["profile", SPEC, *SMALL, "--out", str(table), "--iters", "3", "--resume"])
    one_line_exit_2(result, "is a finished table, with no interrupted profile to resume")
    assert table.read_text() == "{}"
    png = tmp_path / "plot.txt"
    one_line_exit_2(runner.invoke(app, ["profile", "--show", str(table), "--out", str(png)]), "give --out a .png path")
    one_line_exit_2(runner.invoke(app, ["profile", SPEC, "--show", str(table)]), "give the table alone")
