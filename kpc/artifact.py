"""The kpc artifact: a directory with `plan.json` and `model.safetensors`, and the models kpc works on.

The plan is data (`kpc.plan.Plan`): which architecture to build, and for every pruning
round the channel indices each group kept. `load_artifact` builds the unpruned
architecture, replays the rounds with the dependency graph and loads the weights after
checking their sha256 and the plan's own digest. Loading never executes a pickle and
never imports or runs code the plan names: a model from a registry (torchvision, timm)
is rebuilt by name with checked arguments; any other model is rebuilt only from what the
caller passes (`kpc.load(path, model=MyNet())`, `--model-file file.py:factory`).

`save_artifact` writes into a temporary directory, loads the result back exactly as
`kpc.load` will, compares its output with the in-memory model's, and only then renames
the directory into place: an artifact that does not load is never handed over.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kpc import __version__
from kpc.apply import example_input, replay
from kpc.atomic import atomic_dir
from kpc.errors import KpcError
from kpc.lazy import materialize
from kpc.modelcopy import copy_model
from kpc.plan import Plan, PlanError
from kpc.specs import ModelSpec, build_model, build_model_file, load_weights, parse_model_spec
from kpc.weights import load_weights_file, save_weights

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
ROUND_TRIP_RTOL, ROUND_TRIP_ATOL = 1e-4, 1e-5


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_artifact(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / PLAN_FILE).is_file()


# ---------------------------------------------------------------- provenance of live models


@dataclass
class Provenance:
    """What kpc knows of a live module it built or loaded: its plan, where it came from, how to rebuild it."""

    plan: Plan
    source: str  # the spec text or artifact path the user gave
    factory: Callable[[], nn.Module] | None = None  # a fresh, unpruned instance of the architecture


_PROVENANCE: weakref.WeakKeyDictionary[nn.Module, Provenance] = weakref.WeakKeyDictionary()


def remember(model: nn.Module, provenance: Provenance) -> None:
    _PROVENANCE[model] = provenance


def provenance(model: nn.Module) -> Provenance | None:
    """The provenance of a module kpc loaded or built (None for any other module)."""
    try:
        return _PROVENANCE.get(model)
    except TypeError:  # unhashable module
        return None


def fresh_architecture(plan: Plan, model_file: str | None = None) -> nn.Module:
    """The unpruned architecture a plan names, built without running anything the plan names."""
    source = plan.source
    if source in ("torchvision", "timm"):
        return build_model(ModelSpec.from_plan(plan.model, plan.input_size))
    if source == "file":
        name = f"{plan.model.get('path')}:{plan.model.get('name')}"
        if model_file is None:
            raise KpcError(f"this artifact was built from a Python file ({name}); kpc never runs code an artifact "
                           "names: pass --model-file FILE.py:factory (API: kpc.load(path, model=factory()))")
        return build_model_file(model_file, ModelSpec.from_plan(plan.model, plan.input_size))
    if source == "user":
        raise KpcError(f"this artifact was pruned from a model kpc cannot rebuild by itself "
                       f"({plan.model.get('class', 'a user class')}): pass kpc.load(path, model=<a fresh, unpruned "
                       "instance>) (CLI: --model-file FILE.py:factory)")
    raise PlanError(f"plan.model.source {source!r} is not one of torchvision, timm, file, user")


# ---------------------------------------------------------------- loaded models


@dataclass
class LoadedModel:
    """A model ready to prune, train or export, with what is known of its provenance."""

    model: nn.Module
    plan: Plan
    source: str = ""  # what the user passed
    path: Path | None = None  # the artifact directory, when loaded from one
    spec: ModelSpec | None = None  # None for a user's own module
    factory: Callable[[], nn.Module] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        remember(self.model, Provenance(self.plan, self.source, self.factory))

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.plan.input_size

    @property
    def rounds(self) -> list[Any]:
        return self.plan.rounds

    @property
    def label(self) -> str:
        if self.spec is not None:
            return self.spec.label()
        return str(self.plan.model.get("class") or self.source)

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        return example_input(self.input_size, batch, seed)


def read_plan(path: str | Path) -> Plan:
    plan_path = Path(path) / PLAN_FILE
    if not plan_path.is_file():
        raise KpcError(f"{path} is not a kpc artifact: {PLAN_FILE} is missing")
    try:
        text = plan_path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise KpcError(f"cannot read {plan_path} ({exc}): the artifact is corrupt") from exc
    return Plan.loads(text, str(plan_path))


def weights_path(path: Path, plan: Plan) -> Path:
    """The weights file inside the artifact; a plan naming anything else (a path, a link out) is refused."""
    name = plan.weights.get("file", WEIGHTS_FILE)
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise PlanError(f"{path / PLAN_FILE}: weights.file must be a plain file name inside the artifact, got "
                        f"{name!r}")
    file = path / name
    if file.is_symlink() or (file.exists() and not file.is_file()):
        raise KpcError(f"{file} is not a regular file inside the artifact: refusing to read it")
    if not file.is_file():
        raise KpcError(f"{path} is incomplete: {name} is missing")
    return file


def load_artifact(path: str | Path, *, model: nn.Module | None = None, model_file: str | None = None) -> LoadedModel:
    """Rebuild an artifact's module and load its weights (after checking their sha256 and the plan's digest).

    `model`: a fresh, unpruned instance of the architecture (needed for a user's own
    class); `model_file`: `file.py:factory` the caller trusts (needed for file-built models).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise KpcError(f"an artifact is a directory: give its path (a str or pathlib.Path), not a "
                       f"{type(path).__name__}")
    if not str(path).strip():
        raise KpcError("the artifact directory is empty: give the folder kpc prune, train or distill wrote")
    path = Path(path)
    if not path.is_dir():
        raise KpcError(f"{path} is not a kpc artifact directory")
    plan = read_plan(path)
    weights = weights_path(path, plan)
    expected = plan.weights.get("sha256")
    actual = sha256_file(weights)
    if expected != actual:
        raise KpcError(f"{weights} does not match its plan (sha256 {actual[:12]}..., plan says "
                       f"{str(expected)[:12]}...): the weights were edited or belong to another plan")
    if model is not None and not isinstance(model, nn.Module):
        raise KpcError(f"model should be a fresh torch.nn.Module instance, got {type(model).__name__}")
    spec = ModelSpec.from_plan(plan.model, plan.input_size) if plan.source in ("torchvision", "timm", "file") \
        else None
    template = copy_model(materialize(model, plan.input_size)) if model is not None else None

    def factory() -> nn.Module:
        if template is not None:
            return copy_model(template)
        return fresh_architecture(plan, model_file)

    architecture = factory()  # the caller's instance is copied, never pruned in place
    replayed = replay(architecture, plan.rounds, plan.input_size)
    try:
        load_weights_file(replayed, weights)
    except KpcError:
        raise
    except Exception as exc:  # load_state_dict's mismatch report: one line
        raise KpcError(f"weights in {path} do not fit the model the plan rebuilds "
                       f"({str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__}): "
                       "the plan belongs to another model") from exc
    return LoadedModel(replayed.eval(), plan, str(path), path, spec, factory)


def open_model(text: str, *, weights: str | Path | None = None, num_classes: int | None = None,
               input_size: tuple[int, int, int] | None = None, pretrained: bool = False,
               model_file: str | None = None) -> LoadedModel:
    """A model spec string or an artifact directory -> a module ready for work."""
    if not text.strip():  # Path("") is the current directory: the error would name a directory the user never typed
        raise KpcError("the model is empty: give torchvision:NAME, timm:NAME, FILE.py:FACTORY or a kpc artifact "
                       "directory")
    if is_artifact(text):
        if weights is not None or num_classes is not None or input_size is not None or pretrained:
            raise KpcError("--weights, --num-classes, --input-size and --pretrained cannot be used with an artifact: "
                           "the artifact records them")
        return load_artifact(text, model_file=model_file)
    if Path(text).is_dir():
        raise KpcError(f"{text} is a directory but not a kpc artifact ({PLAN_FILE} is missing)")
    spec = parse_model_spec(text, num_classes=num_classes, input_size=input_size, pretrained=pretrained)
    base = spec.without_pretrained()

    def factory() -> nn.Module:  # the user named this spec: a file spec is trusted here
        return build_model(base)

    model = build_model(spec)
    if weights is not None:
        load_weights(model, weights)
    plan = Plan(kind="model", model=spec.to_json(), input_size=spec.input_size)
    return LoadedModel(model, plan, text, None, spec, factory)


# ---------------------------------------------------------------- saving


def save_artifact(out: str | Path, model: nn.Module, plan: Plan, *, overwrite: bool = False,
                  factory: Callable[[], nn.Module] | None = None, verify: bool = True) -> Path:
    """Write plan + weights, load them back as `kpc.load` will and compare outputs, then rename into place.

    `factory` gives a fresh unpruned instance for architectures kpc cannot rebuild by
    name (a user's class, a file); registry models are rebuilt from the plan alone.
    """
    out = Path(out)
    plan = copy.deepcopy(plan)
    plan.created = plan.created or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    plan.versions = {"kpc": __version__, "torch": torch.__version__, **plan.versions}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_weights(model, tmp / WEIGHTS_FILE)
        plan.weights = {"file": WEIGHTS_FILE, "sha256": sha256_file(tmp / WEIGHTS_FILE)}
        (tmp / PLAN_FILE).write_text(plan.dumps())
        if verify:
            check_round_trip(tmp, model, plan, factory)
    return out


def check_round_trip(directory: Path, model: nn.Module, plan: Plan,
                     factory: Callable[[], nn.Module] | None) -> None:
    """Load `directory` back as `kpc.load` would and require the same output as `model` on the example input."""
    try:
        fresh = factory() if factory is not None and plan.source not in ("torchvision", "timm") else None
        reloaded = load_artifact(directory, model=fresh).model
    except KpcError as exc:
        raise KpcError(f"the artifact would not load back ({exc}); nothing was written") from exc
    example = example_input(plan.input_size, batch=2)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected, got = model(example), reloaded(example)
    finally:
        model.train(was_training)
    if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor) or expected.shape != got.shape:
        raise KpcError("the reloaded artifact computes an output of another shape than the model saved; "
                       "nothing was written")
    if not torch.equal(expected, got) and not torch.allclose(expected, got, rtol=ROUND_TRIP_RTOL,
                                                             atol=ROUND_TRIP_ATOL):
        worst = float((expected - got).abs().max())
        raise KpcError(f"the reloaded artifact computes other outputs than the model saved (max difference "
                       f"{worst:.3g}); nothing was written")


def save(result: Any, out: str | Path, *, overwrite: bool = False) -> Path:
    """`kpc.save`: write a `PruneResult` (or a model kpc loaded) as an artifact, verified by reloading it."""
    from kpc.pruning import PruneResult

    if isinstance(result, PruneResult):
        model, plan = result.model, result.plan
        origin = provenance(result.parent) if result.parent is not None else None
        if origin is not None and origin.factory is not None:
            factory = origin.factory
        elif result.parent is not None:
            template = copy_model(result.parent)
            factory = lambda: copy_model(template)  # noqa: E731 - a fresh unpruned instance per call
        else:
            factory = None
    elif isinstance(result, nn.Module):
        origin = provenance(result)
        if origin is None:
            raise KpcError("kpc.save takes a kpc.prune result or a model kpc loaded; save other modules with "
                           "torch or safetensors")
        model, plan, factory = result, origin.plan, origin.factory
    else:
        raise KpcError(f"kpc.save takes a kpc.prune result, got {type(result).__name__}")
    return save_artifact(out, model, plan, overwrite=overwrite, factory=factory)


def derived_plan(loaded: LoadedModel, kind: str) -> Plan:
    """The provenance fields every artifact derived from `loaded` carries forward."""
    base = loaded.plan
    return Plan(kind=kind, model=dict(base.model), input_size=base.input_size, rounds=list(base.rounds),
                parent={"source": loaded.source, "weights_sha256": base.weights.get("sha256")},
                normalization=base.normalization, data=base.data)
