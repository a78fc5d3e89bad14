"""Safe to load, safe to write: real files, real processes, real signals; no mocks.

An artifact is data (loading never runs code it names); an output never replaces what is
not kpc's; a second writer is refused while the first lives; a killed writer leaves
nothing the next run does not clean; outputs are readable under the usual umask.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import kpc
from kpc.artifact import open_model
from kpc.budget import Budget
from kpc.cli import app
from kpc.data import cifar10_arrays
from kpc.errors import KpcError
from kpc.plan import digest_of

from .conftest import needs_fashion_mnist, prune_spec, write_tiny

runner = CliRunner()
KPC = [sys.executable, "-m", "kpc"]
TINY_ARGS = ["--num-classes", "10", "--input-size", "1x28x28", "--budget-ratio", "0.5", "--calib-batches", "1",
             "--calib-batch-size", "4"]


def _tiny_artifact(root: Path) -> tuple[Path, str]:
    spec = write_tiny(root)
    _loaded, result = prune_spec(spec, Budget(ratio=0.5), input_size=(1, 28, 28), calib_batches=1)
    return kpc.save(result, root / "child"), spec


def test_a_plan_naming_a_python_file_never_runs_it(tmp_path):
    artifact, spec = _tiny_artifact(tmp_path)
    marker = tmp_path / "ran"
    source = Path(spec.rpartition(":")[0])
    source.write_text(f"open({str(marker)!r}, 'w').write('x')\n" + source.read_text())  # would leave a marker
    with pytest.raises(KpcError, match="--model-file"):
        kpc.load(artifact)
    shown = runner.invoke(app, ["inspect", str(artifact)])
    assert shown.exit_code == 2 and "--model-file" in shown.output
    exported = runner.invoke(app, ["export", str(artifact), "--onnx", "--out", str(tmp_path / "onnx")])
    assert exported.exit_code == 2 and "--model-file" in exported.output
    assert not marker.exists(), "loading an artifact ran the file its plan names"


def test_a_plan_may_not_smuggle_files_or_arguments(tmp_path):
    artifact, _spec = _tiny_artifact(tmp_path)
    plan = json.loads((artifact / "plan.json").read_text())

    def write(edited: dict) -> None:
        edited["plan_sha256"] = digest_of(edited)  # a consistent digest: the content itself must be refused
        (artifact / "plan.json").write_text(json.dumps(edited))

    for field, value, message in [
        ("weights", {"file": "/etc/passwd", "sha256": "0"}, "plain file name"),
        ("weights", {"file": "../child/model.safetensors", "sha256": "0"}, "plain file name"),
        ("model", {"source": "timm", "name": "resnet18", "kwargs": {"checkpoint_path": "/tmp/x.pth"}}, "refused"),
        ("model", {"source": "timm", "name": "resnet18", "kwargs": {"drop_rate": [1, 2]}}, "string, number"),
        ("model", {"source": "torchvision", "name": "resnet5O"}, "did you mean"),
        ("input_size", "3x28x28", "input_size"),
        ("rounds", 1, "rounds"),
    ]:
        write({**plan, field: value})
        with pytest.raises(KpcError, match=message):
            kpc.load(artifact)
    tampered = {**plan, "kind": "trained"}  # an edit without a new digest: refused like edited weights
    (artifact / "plan.json").write_text(json.dumps(tampered))
    with pytest.raises(KpcError, match="digest"):
        kpc.load(artifact)


def test_a_crafted_cifar_batch_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    good = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "batch_label": "b", "filenames": ["a", "b"]}
    for index in range(1, 6):
        with open(tmp_path / f"data_batch_{index}", "wb") as handle:
            pickle.dump(good, handle)
    images, labels = cifar10_arrays(tmp_path, "train")
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == [0, 1] * 5
    with open(tmp_path / "data_batch_3", "wb") as handle:
        pickle.dump({"data": Payload(), "labels": [0]}, handle)
    with pytest.raises(KpcError, match="not a readable CIFAR-10 batch"):
        cifar10_arrays(tmp_path, "train")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["symlink", "fifo", "device", "file"])
def test_outputs_never_replace_what_is_not_kpcs(tmp_path, kind):
    spec = write_tiny(tmp_path)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    if kind == "symlink":
        out = tmp_path / "link"
        out.symlink_to(target, target_is_directory=True)
    elif kind == "fifo":
        out = tmp_path / "fifo"
        os.mkfifo(out)
    elif kind == "device":
        out = Path("/dev/null")
    else:
        out = tmp_path / "plain.txt"
        out.write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(app, ["prune", spec, *TINY_ARGS, "--out", str(out), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (target / "keep.txt").read_text() == "mine" and sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    if kind == "fifo":
        assert stat.S_ISFIFO(out.lstat().st_mode)
    if kind == "file":
        assert out.read_text() == "mine"


def test_file_outputs_follow_a_link_to_a_file_and_refuse_anything_else(tmp_path):
    from exporters.atomic import write_text_atomic
    from exporters.errors import OutputError

    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_text_atomic(link, "new")
    assert link.is_symlink() and real.read_text() == "new", "the link stays; its target gets the content"
    folder_link = tmp_path / "folder-link"
    folder_link.symlink_to(tmp_path, target_is_directory=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (folder_link, fifo, Path("/dev/null"), tmp_path):
        with pytest.raises(OutputError):
            write_text_atomic(target, "x")
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and folder_link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "folder-link", "link.json", "real.json"]


def test_overwrite_replaces_only_kpcs_own_directories(tmp_path):
    spec = write_tiny(tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    refused = runner.invoke(app, ["prune", spec, *TINY_ARGS, "--out", str(foreign), "--overwrite"])
    assert refused.exit_code == 2 and "not written by kpc" in refused.output
    assert (foreign / "thesis.tex").read_text() == "years of work"
    out = tmp_path / "child"
    assert runner.invoke(app, ["prune", spec, *TINY_ARGS, "--out", str(out)]).exit_code == 0
    first = (out / "plan.json").read_text()
    again = runner.invoke(app, ["prune", spec, *TINY_ARGS, "--seed", "3", "--out", str(out), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert (out / "plan.json").read_text() != first
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__")
    assert left == sorted(["child", "foreign", "tiny_resnet.py"]), "no temporaries, no parked old output"


def test_outputs_are_readable_under_umask_022(tmp_path):
    previous = os.umask(0o022)
    try:
        artifact, _spec = _tiny_artifact(tmp_path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(artifact.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in artifact.iterdir()} == {0o644}


def _spawn(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*KPC, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)


def test_two_prunes_to_one_output_one_runs_the_other_is_refused(tmp_path):
    out = tmp_path / "out"
    args = ["prune", "torchvision:resnet18", "--num-classes", "10", "--input-size", "3x64x64", "--budget-ratio",
            "0.5", "--calib-batches", "4", "--calib-batch-size", "16", "--out", str(out)]
    first, second = _spawn(args, tmp_path), _spawn(args, tmp_path)
    results = [(p.wait(timeout=600), p.stderr.read()) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "another kpc process" in refused and "pid" in refused and len(refused.strip().splitlines()) == 1
    kpc.load(out)  # the one that ran wrote a whole artifact


def _debris(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".kpc-tmp" in p.name or ".kpc-old" in p.name
                  or p.name.endswith(".kpc-lock"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_killed_write_leaves_nothing_the_next_run_keeps(tmp_path, sig):
    out = tmp_path / "out"
    args = ["prune", "torchvision:resnet50", "--num-classes", "10", "--input-size", "3x32x32", "--budget-ratio",
            "0.5", "--calib-batches", "1", "--calib-batch-size", "2", "--out", str(out)]
    process = _spawn(args, tmp_path)
    deadline = time.monotonic() + 300
    while not any(".kpc-tmp" in p.name for p in tmp_path.iterdir()):  # wait for the artifact's write
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the write never started"
        time.sleep(0.002)
    process.send_signal(sig)
    code = process.wait(timeout=60)
    stderr = process.stderr.read()
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert code == 143 and "terminated" in stderr and "Traceback" not in stderr, stderr
        assert _debris(tmp_path) == []
    else:
        assert code == -signal.SIGKILL
    again = _spawn(args, tmp_path)
    assert again.wait(timeout=600) == 0, again.stderr.read()
    assert _debris(tmp_path) == [], "the next run removed the dead writer's debris"
    kpc.load(out)


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only or tiny tmpfs needs root")
@pytest.mark.parametrize("options", ["ro,size=1m", "size=1m"], ids=["read-only", "full"])
def test_read_only_and_full_targets_fail_before_the_work(tmp_path, options):
    mount = tmp_path / "mnt"
    if not _mount_tmpfs(mount, options):
        pytest.skip("this machine does not allow mounting a tmpfs (a container without the capability)")
    try:
        started = time.perf_counter()
        result = runner.invoke(app, ["prune", "torchvision:resnet18", "--num-classes", "10", "--input-size",
                                     "3x32x32", "--budget-ratio", "0.5", "--calib-batches", "1", "--out",
                                     str(mount / "out")])
        assert result.exit_code == 2, result.output
        assert ("not writable" in result.output or "fails" in result.output) if options.startswith("ro") else \
            "MB free" in result.output
        assert time.perf_counter() - started < 30, "refused before pruning, not after"
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_kpc_run_decides_from_content(tmp_path):
    teacher = tmp_path / "teacher"
    loaded = open_model("torchvision:resnet18", num_classes=10, input_size=(3, 32, 32))
    from kpc.artifact import derived_plan, save_artifact

    save_artifact(teacher, loaded.model, derived_plan(loaded, "trained"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {teacher}\ndata: synthetic\nbudget: {{ratio: 0.5}}\n"
                      "prune: {calib_batches: 1, calib_batch_size: 4}\nverify: {iters: 4, warmup: 1}\n")
    run = tmp_path / "run"
    assert runner.invoke(app, ["run", str(recipe), "--out", str(run)]).exit_code == 0

    from kpc.pipeline import Pipeline
    from kpc.recipe import load_recipe

    def actions() -> dict[str, str]:
        return {s.name: s.action for s in Pipeline(load_recipe(recipe), run).status()}

    assert set(actions().values()) <= {"skip", "absent"}
    (run / "export" / "export" / "model.onnx").unlink()  # a deleted output: that stage and the ones after it run
    assert actions() == {"train": "absent", "profile": "absent", "prune": "skip", "distill": "absent",
                         "export": "run", "verify": "run"}
    assert runner.invoke(app, ["run", str(recipe), "--out", str(run)]).exit_code == 0
    assert (run / "export" / "export" / "model.onnx").is_file()
    shutil.rmtree(teacher)  # the teacher replaced at the same path: everything after it runs again
    other = open_model("torchvision:resnet18", num_classes=10, input_size=(3, 32, 32))
    with torch.no_grad():
        other.model.fc.weight.mul_(2)
    save_artifact(teacher, other.model, derived_plan(other, "trained"))
    assert actions()["prune"] == "run" and actions()["verify"] == "run"


@needs_fashion_mnist
def test_two_runs_of_one_recipe_give_identical_artifacts(tmp_path):
    """With the training threads pinned: the default drops to one thread under load, which changes the sums."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {write_tiny(tmp_path)}\ndata: fashion-mnist\nseed: 7\n"
                      "train: {epochs: 1, subset: 256, batch_size: 64, lr: 0.1, threads: 1}\nbudget: {ratio: 0.5}\n"
                      "prune: {calib_batches: 1, calib_batch_size: 8}\n"
                      "verify: {iters: 4, warmup: 1, eval_subset: 64}\n")
    digests = []
    for name in ("a", "b"):
        result = runner.invoke(app, ["run", str(recipe), "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        digests.append([json.loads((tmp_path / name / stage / "artifact" / "plan.json").read_text())["weights"]
                        ["sha256"] for stage in ("train", "prune")])
    assert digests[0] == digests[1]


def test_a_second_kpc_run_into_one_directory_is_refused(tmp_path):
    from exporters.atomic import output_lock

    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: torchvision:resnet18\ndata: synthetic\nbudget: {ratio: 0.5}\n")
    probe = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom exporters.atomic import output_lock\n"
                              f"with output_lock({str(run)!r}):\n    print('held', flush=True)\n    time.sleep(30)\n"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert probe.stdout.readline().strip() == "held"
        result = runner.invoke(app, ["run", str(recipe), "--out", str(run)])
        assert result.exit_code == 2 and "another kpc process" in result.output, result.output
    finally:
        probe.kill()
        probe.wait()
    with output_lock(run):  # a lock whose owner died is taken over
        pass
