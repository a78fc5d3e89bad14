"""Per-epoch checkpoints in the run's working directory, written so a kill never corrupts them.

Layout of `<out>.work/`: `epoch-NNNN/` (student.safetensors with the projections,
optimizer.safetensors, state.json with epoch, history, optimizer scalars and sha256s),
`LATEST` naming the newest complete one (replaced atomically after the directory is
complete), `best.safetensors` and `metrics.jsonl`. No pickle anywhere: tensors go to
safetensors, everything else to JSON, so resuming never executes code from disk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kpc.artifact import sha256_file
from kpc.atomic import append_line, atomic_dir, write_bytes_atomic, write_text_atomic
from kpc.errors import KpcError

FORMAT = "kpc-train-checkpoint/1"
LATEST = "LATEST"


def work_dir_for(out: Path) -> Path:
    return out.with_name(out.name + ".work")


def has_checkpoint(work: Path) -> bool:
    return (work / LATEST).is_file()


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(work: Path, epoch: int, student: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Write epoch `epoch` (completed epochs) and point LATEST at it; older checkpoints are removed."""
    from safetensors.torch import save_file

    from kpc.weights import save_weights

    work.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{epoch:04d}"
    with atomic_dir(work / name, overwrite=True) as tmp:
        save_weights(student, tmp / "student.safetensors")
        tensors, meta = _split_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        record = {"format": FORMAT, "epoch": epoch, **state, "optimizer": meta,
                  "sha256": {f: sha256_file(tmp / f) for f in ("student.safetensors", "optimizer.safetensors")}}
        (tmp / "state.json").write_text(json.dumps(record, indent=1) + "\n")
    write_text_atomic(work / LATEST, name + "\n")
    for old in work.glob("epoch-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return work / name


def load_checkpoint(work: Path, student: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the newest checkpoint into `student` and `optimizer`; return its state record."""
    from safetensors.torch import load_file

    from kpc.weights import load_weights_file

    hint = f"delete {work} to start over"
    try:
        name = (work / LATEST).read_text().strip()
        folder = work / name
        record = json.loads((folder / "state.json").read_text())
        if record.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} checkpoint")
        for file, digest in record["sha256"].items():
            if sha256_file(folder / file) != digest:
                raise ValueError(f"{file} does not match its sha256")
        load_weights_file(student, folder / "student.safetensors")
        optimizer.load_state_dict(_join_optimizer(load_file(str(folder / "optimizer.safetensors")),
                                                  record["optimizer"]))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KpcError(f"the checkpoint in {work} is corrupt or does not fit this run ({message}): {hint}") from exc
    return record


def save_best(work: Path, model: nn.Module) -> None:
    """The best-so-far weights of the plain model, replaced atomically."""
    from kpc.weights import weights_bytes

    write_bytes_atomic(work / "best.safetensors", weights_bytes(model))


def append_metrics(work: Path, row: dict[str, Any]) -> None:
    append_line(work / "metrics.jsonl", json.dumps(row))


def rewrite_metrics(work: Path, rows: list[dict[str, Any]]) -> None:
    """After a resume, the metrics file holds exactly the epochs the checkpoint covers."""
    write_text_atomic(work / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def finish(work: Path) -> None:
    """A completed run keeps only metrics.jsonl and best.safetensors in its working directory."""
    (work / LATEST).unlink(missing_ok=True)
    for old in work.glob("epoch-*"):
        shutil.rmtree(old, ignore_errors=True)


def remove_without_checkpoint(work: Path) -> None:
    """A failed run that never completed an epoch leaves no working directory behind.

    Before its first checkpoint it holds at most the starting weights (`best.safetensors`, the
    weights kept unless an epoch does better): nothing `--resume` could continue from.
    """
    try:
        if work.is_dir() and not has_checkpoint(work):
            shutil.rmtree(work, ignore_errors=True)
    except OSError:
        pass
