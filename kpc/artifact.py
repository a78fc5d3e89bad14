"""The kpc artifact: a directory with `plan.json` and `model.safetensors`.

The plan is data: the base architecture's spec plus, for every pruning round, the
channel indices each group kept. `load_artifact` rebuilds the unpruned architecture,
replays the rounds with the dependency graph and loads the weights after checking
their sha256, so loading never executes a pickle and a plan cannot silently be paired
with weights it was not written with.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kpc import __version__
from kpc.atomic import atomic_dir
from kpc.errors import KpcError
from kpc.specs import ModelSpec, build_model, load_weights, parse_model_spec

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "kpc-artifact/1"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_artifact(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / PLAN_FILE).is_file()


@dataclass
class LoadedModel:
    """A model ready to prune, train or export, with what is known of its provenance."""

    model: nn.Module
    spec: ModelSpec
    rounds: list[dict[str, Any]] = field(default_factory=list)  # earlier pruning rounds (artifact input)
    source: str = ""  # what the user passed
    plan: dict[str, Any] | None = None  # the artifact's plan, when loaded from one
    path: Path | None = None

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        return example_for(self.spec, batch, seed)


def example_for(spec: ModelSpec, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """The fixed random input graph tracing and checks use (seeded, so every replay traces alike)."""
    return torch.randn((batch, *spec.input_size), generator=torch.Generator().manual_seed(seed))


def replay_rounds(model: nn.Module, spec: ModelSpec, rounds: list[dict[str, Any]]) -> nn.Module:
    """Re-apply recorded pruning rounds to a freshly built architecture."""
    from kpc.groups import apply_kept

    for number, plan_round in enumerate(rounds, 1):
        try:
            kept = {g["root"]: (int(g["width"]), [int(i) for i in g["kept"]])
                    for g in plan_round["groups"] if int(g["kept_width"]) < int(g["width"])}
        except (KeyError, TypeError, ValueError) as exc:
            raise KpcError(f"pruning round {number} in the plan is malformed ({exc})") from exc
        try:
            apply_kept(model, example_for(spec), kept)
        except KpcError:
            raise
        except Exception as exc:
            raise KpcError(f"replaying pruning round {number} failed ({type(exc).__name__}: {exc}): "
                           "the plan belongs to another model") from exc
    return model


def read_plan(path: Path) -> dict[str, Any]:
    plan_path = Path(path) / PLAN_FILE
    if not plan_path.is_file():
        raise KpcError(f"{path} is not a kpc artifact: {PLAN_FILE} is missing")
    try:
        plan = json.loads(plan_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KpcError(f"{plan_path} is not valid JSON ({exc}): the artifact is corrupt") from exc
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise KpcError(f"{plan_path} is not a {FORMAT} plan")
    return plan


def load_artifact(path: str | Path) -> LoadedModel:
    """Rebuild an artifact's module and load its weights (after checking their sha256)."""
    path = Path(path)
    plan = read_plan(path)
    weights = path / plan.get("weights", {}).get("file", WEIGHTS_FILE)
    if not weights.is_file():
        raise KpcError(f"{path} is incomplete: {weights.name} is missing")
    expected = plan.get("weights", {}).get("sha256")
    actual = sha256_file(weights)
    if expected != actual:
        raise KpcError(f"{weights} does not match its plan (sha256 {actual[:12]}..., plan says "
                       f"{str(expected)[:12]}...): the weights were edited or belong to another plan")
    spec = ModelSpec.from_json(plan.get("model", {}))
    rounds = list(plan.get("rounds", []))
    model = replay_rounds(build_model(spec), spec, rounds)
    try:
        from safetensors.torch import load_model

        load_model(model, str(weights), strict=True)
    except Exception as exc:
        raise KpcError(f"weights in {path} do not fit the model the plan rebuilds ({str(exc).splitlines()[0]}): "
                       "the plan belongs to another model") from exc
    return LoadedModel(model.eval(), spec, rounds, str(path), plan, path)


def open_model(text: str, *, weights: str | Path | None = None, num_classes: int | None = None,
               input_size: tuple[int, int, int] | None = None) -> LoadedModel:
    """A model spec string or an artifact directory -> a module ready for work."""
    if is_artifact(text):
        if weights is not None or num_classes is not None or input_size is not None:
            raise KpcError("--weights, --num-classes and --input-size cannot be used with an artifact: "
                           "the artifact records them")
        return load_artifact(text)
    if Path(text).is_dir():
        raise KpcError(f"{text} is a directory but not a kpc artifact ({PLAN_FILE} is missing)")
    spec = parse_model_spec(text, num_classes=num_classes, input_size=input_size)
    model = build_model(spec)
    if weights is not None:
        load_weights(model, weights)
    return LoadedModel(model, spec, [], text)


def save_artifact(out: str | Path, model: nn.Module, plan: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write plan + weights to a temporary directory and rename it to `out` when complete."""
    from safetensors.torch import save_model

    out = Path(out)
    plan = dict(plan)
    plan.setdefault("format", FORMAT)
    plan.setdefault("created", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    plan.setdefault("versions", {"kpc": __version__, "torch": torch.__version__})
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_model(model, str(tmp / WEIGHTS_FILE))
        plan["weights"] = {"file": WEIGHTS_FILE, "sha256": sha256_file(tmp / WEIGHTS_FILE)}
        (tmp / PLAN_FILE).write_text(json.dumps(plan, indent=1) + "\n")
    return out


def base_plan(loaded: LoadedModel, kind: str) -> dict[str, Any]:
    """The provenance fields every artifact derived from `loaded` carries forward."""
    plan: dict[str, Any] = {
        "format": FORMAT,
        "kind": kind,
        "model": loaded.spec.to_json(),
        "rounds": list(loaded.rounds),
        "parent": {"source": loaded.source},
    }
    if loaded.plan is not None:
        plan["parent"]["weights_sha256"] = loaded.plan.get("weights", {}).get("sha256")
        for key in ("normalization", "data"):
            if key in loaded.plan:
                plan[key] = loaded.plan[key]
    return plan
