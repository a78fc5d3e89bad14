"""The plan: what an artifact is, as typed data (no torch), read and written as plan.json.

A plan says which architecture to build (a registry name, or "bring your own module"),
which channels every pruning round kept, and where the weights and figures came from.
It is the only thing `kpc.load` needs besides the weights, so it is validated key by key
on read: a wrong type, a missing field or an edited file is one line naming the key,
never a traceback and never code run on the plan's say-so.

Format history: `kpc-artifact/1` (a plain dict, rounds without `landed`, no digest) is
read and migrated; `kpc-artifact/2` adds the digest of the plan itself, the landing
verdict of each round and the pooled timings of the kept plan; `kpc-artifact/3` is written
only by a plan that cuts GroupNorm groups (`norm_groups`) or baked parametrized weights
(`baked_weights`), which a reader of /2 would replay without lowering `num_groups` or
without baking: it must refuse such a plan rather than compute something else.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from kpc.errors import KpcError

FORMAT = "kpc-artifact/2"
FORMAT_NEEDING_KPC_3 = "kpc-artifact/3"  # written only where an older reader would replay the plan wrongly
LEGACY_FORMATS = ("kpc-artifact/1",)
DIGEST_KEY = "plan_sha256"
KINDS = ("pruned", "trained", "distilled", "model")


# ---------------------------------------------------------------- validation helpers


class PlanError(KpcError):
    """A plan.json that does not follow the schema: names the key that is wrong."""


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
          dict: "an object"}


def _take(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, *, required: bool = True,
          default: Any = None) -> Any:
    if key not in data or data[key] is None:
        if required:
            raise PlanError(f"{where}.{key} is missing")
        return default
    return _check(data[key], kind, f"{where}.{key}")


def _check(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and int not in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds:
        raise PlanError(f"{where} should be {_NAMES.get(kinds[0], kinds[0].__name__)}, got {value!r}")
    if not isinstance(value, kinds):
        raise PlanError(f"{where} should be {_NAMES.get(kinds[0], kinds[0].__name__)}, got {_short(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise PlanError(f"{where} is {value}, not a finite number")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int_list(value: Any, where: str) -> list[int]:
    _check(value, list, where)
    for index, item in enumerate(value):
        if not isinstance(item, int) or isinstance(item, bool):
            raise PlanError(f"{where}[{index}] should be an integer, got {_short(item)}")
    return list(value)


MAX_INPUT_ELEMENTS = 3 * 4096 * 4096  # one image of this size already takes 200 MB in fp32, before activations


def input_size_of(value: Any, where: str) -> tuple[int, int, int]:
    """A CxHxW triple of positive integers, as a plan records it."""
    sizes = _int_list(value, where)
    if len(sizes) != 3 or min(sizes) < 1:
        raise PlanError(f"{where} should be [C, H, W] with positive sizes, got {_short(value)}")
    if sizes[0] * sizes[1] * sizes[2] > MAX_INPUT_ELEMENTS:
        raise PlanError(f"{where} {_short(value)} is above kpc's limit of {MAX_INPUT_ELEMENTS:,} values per image")
    return sizes[0], sizes[1], sizes[2]


def _extra(data: dict[str, Any], cls: type) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k not in known}


# ---------------------------------------------------------------- the typed plan


@dataclass
class GroupDecision:
    """What one coupled group kept in one round."""

    root: str  # module whose output channels define the group
    width: int  # channels before the round
    kept: list[int]  # kept channel indices (sorted), all of them for a group left whole
    prunable: bool
    layers: list[str] = field(default_factory=list)  # members: "name" output side, "name<" input side
    reason: str | None = None  # why it was left whole
    conv_groups: int | None = None  # grouped convs: conv groups at full width
    tied_to: int | None = None  # index of the group whose blocks it follows
    heads: int | None = None  # attention heads at full width: the group is cut by whole heads
    norm_groups: int | None = None  # GroupNorm groups at full width: the group is cut by whole ones

    @property
    def kept_width(self) -> int:
        return len(self.kept)

    @property
    def pruned(self) -> bool:
        return self.prunable and self.kept_width < self.width

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"root": self.root, "layers": self.layers, "width": self.width,
                                  "kept_width": self.kept_width, "kept": self.kept, "prunable": self.prunable,
                                  "reason": self.reason}
        if self.conv_groups is not None:
            record["conv_groups"] = self.conv_groups
            record["tied_to"] = self.tied_to
        if self.heads is not None:
            record["heads"] = self.heads
        if self.norm_groups is not None:
            record["norm_groups"] = self.norm_groups
        return record

    @classmethod
    def from_json(cls, data: Any, where: str) -> GroupDecision:
        _check(data, dict, where)
        width = _take(data, "width", int, where)
        kept = _int_list(_take(data, "kept", list, where), f"{where}.kept")
        if width < 1 or any(not 0 <= i < width for i in kept) or len(set(kept)) != len(kept) or not kept:
            raise PlanError(f"{where}.kept should list distinct channel indices in 0..{width - 1}")
        if "kept_width" in data and _take(data, "kept_width", int, where) != len(kept):
            raise PlanError(f"{where}.kept_width is {data['kept_width']} but {where}.kept lists {len(kept)} channels")
        layers = _take(data, "layers", list, where, required=False, default=[])
        heads = _take(data, "heads", int, where, required=False)
        if heads is not None and (heads < 1 or width % heads or len(kept) % (width // heads)):
            raise PlanError(f"{where}.heads is {heads}, which does not split {where}.width ({width}) and the "
                            f"{len(kept)} kept channels into whole heads")
        norm_groups = _take(data, "norm_groups", int, where, required=False)
        if norm_groups is not None and (norm_groups < 1 or width % norm_groups or len(kept) % (width // norm_groups)):
            raise PlanError(f"{where}.norm_groups is {norm_groups}, which does not split {where}.width ({width}) and "
                            f"the {len(kept)} kept channels into whole GroupNorm groups")
        return cls(root=_take(data, "root", str, where), width=width, kept=sorted(kept),
                   prunable=_take(data, "prunable", bool, where), layers=[str(x) for x in layers],
                   reason=_take(data, "reason", str, where, required=False),
                   conv_groups=_take(data, "conv_groups", int, where, required=False),
                   tied_to=_take(data, "tied_to", int, where, required=False),
                   heads=heads, norm_groups=norm_groups)


@dataclass
class Attempt:
    """One solve of the closed loop: the internal target, the prediction, what was counted or timed."""

    target: float
    predicted: float
    counted: float | None = None  # None: the plan failed its forward check (see `error`)
    error: str | None = None
    repeat_of: int | None = None  # the attempt (1-based) whose plan this solve reproduced (or is within noise of)
    # with repeat_of: that plan was timed again here and `counted` pools all its timings so far (else not measured)
    timed_again: bool = False

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"target": self.target, "predicted": self.predicted}
        for key in ("counted", "error", "repeat_of"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        if self.timed_again:
            record["timed_again"] = True
        return record

    @classmethod
    def from_json(cls, data: Any, where: str) -> Attempt:
        _check(data, dict, where)
        return cls(_take(data, "target", float, where), _take(data, "predicted", float, where),
                   _take(data, "counted", float, where, required=False),
                   _take(data, "error", str, where, required=False),
                   _take(data, "repeat_of", int, where, required=False),
                   _take(data, "timed_again", bool, where, required=False, default=False))


@dataclass
class PruneRound:
    """One pruning round: the budget, how the closed loop landed it, and every group's decision."""

    budget: dict[str, Any]  # {"asked": text, and the one given of gflops / ratio / ms}
    cost_unit: str  # "GFLOPs" or "ms"
    full_cost: float
    limit: float  # the budget in cost units
    predicted_cost: float
    counted_cost: float  # the kept plan, counted (FLOPs) or the median of its timings (ms)
    groups: list[GroupDecision]
    input_size: tuple[int, int, int]
    min_cost: float | None = None
    kept_importance: float | None = None
    total_importance: float | None = None
    attempts: list[Attempt] = field(default_factory=list)
    importance: dict[str, Any] = field(default_factory=dict)  # method, data, batches, batch size, seed
    solver: str = "exact"
    round_to: int = 1
    min_channels: int = 1
    ignore: list[str] = field(default_factory=list)
    landed: bool | None = None  # None for rounds written before kpc-artifact/2
    baked_weights: list[str] = field(default_factory=list)  # parametrized weights baked before the cut
    # latency: every timing of the kept plan, one figure per runtime session
    counted_samples: list[float] = field(default_factory=list)
    latency_table: dict[str, Any] | None = None
    bn_recalibration: dict[str, Any] | None = None
    seconds: dict[str, dict[str, float]] | None = None  # each step's {"wall_s", "cpu_s"} (kpc.stopwatch)
    extra: dict[str, Any] = field(default_factory=dict)  # keys of newer or older writers, kept as they were

    @property
    def miss(self) -> float:
        """Counted cost relative to the budget: -0.02 is 2% under, +0.05 is 5% over."""
        return self.counted_cost / self.limit - 1 if self.limit > 0 else math.inf

    def kept_by_root(self) -> dict[str, tuple[int, list[int]]]:
        """Groups that lost channels: root -> (width before, kept indices)."""
        return {g.root: (g.width, g.kept) for g in self.groups if g.kept_width < g.width}

    def head_roots(self) -> set[str]:
        """Roots of the attention projections this round cuts by whole heads."""
        return {g.root for g in self.groups if g.heads and g.kept_width < g.width}

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "budget": self.budget, "cost_unit": self.cost_unit, "full_cost": self.full_cost,
            "min_cost": self.min_cost, "limit": self.limit, "predicted_cost": self.predicted_cost,
            "counted_cost": self.counted_cost, "landed": self.landed, "counted_samples": self.counted_samples,
            "kept_importance": self.kept_importance, "total_importance": self.total_importance,
            "attempts": [a.to_json() for a in self.attempts], "importance": self.importance, "solver": self.solver,
            "round_to": self.round_to, "min_channels": self.min_channels, "ignore": self.ignore,
            "input_size": list(self.input_size), "groups": [g.to_json() for g in self.groups],
        }
        if self.latency_table is not None:
            record["latency_table"] = self.latency_table
        if self.bn_recalibration is not None:
            record["bn_recalibration"] = self.bn_recalibration
        if self.seconds is not None:
            record["seconds"] = self.seconds
        if self.baked_weights:
            record["baked_weights"] = self.baked_weights
        return {**self.extra, **record}

    @property
    def needs_kpc_3(self) -> bool:
        """Whether a reader of kpc-artifact/2 would replay this round wrongly (see the format history)."""
        return bool(self.baked_weights) or any(g.norm_groups for g in self.groups)

    @classmethod
    def from_json(cls, data: Any, where: str) -> PruneRound:
        _check(data, dict, where)
        groups = _take(data, "groups", list, where)
        attempts = _take(data, "attempts", list, where, required=False, default=[])
        unit = _take(data, "cost_unit", str, where)
        if unit not in ("GFLOPs", "ms"):
            raise PlanError(f"{where}.cost_unit should be GFLOPs or ms, got {unit!r}")
        extra = _extra(data, cls)
        for legacy in ("measured_ms", "predicted_ms"):  # kpc-artifact/1 repeated the costs under these names
            extra.pop(legacy, None)
        samples = _take(data, "counted_samples", list, where, required=False, default=[])
        return cls(
            budget=_take(data, "budget", dict, where), cost_unit=unit,
            full_cost=_take(data, "full_cost", float, where), limit=_take(data, "limit", float, where),
            predicted_cost=_take(data, "predicted_cost", float, where),
            counted_cost=_take(data, "counted_cost", float, where),
            groups=[GroupDecision.from_json(g, f"{where}.groups[{i}]") for i, g in enumerate(groups)],
            input_size=input_size_of(_take(data, "input_size", list, where), f"{where}.input_size"),
            min_cost=_take(data, "min_cost", float, where, required=False),
            kept_importance=_take(data, "kept_importance", float, where, required=False),
            total_importance=_take(data, "total_importance", float, where, required=False),
            attempts=[Attempt.from_json(a, f"{where}.attempts[{i}]") for i, a in enumerate(attempts)],
            importance=_take(data, "importance", dict, where, required=False, default={}),
            solver=_take(data, "solver", str, where, required=False, default="exact"),
            round_to=_take(data, "round_to", int, where, required=False, default=1),
            min_channels=_take(data, "min_channels", int, where, required=False, default=1),
            ignore=[str(x) for x in _take(data, "ignore", list, where, required=False, default=[])],
            landed=_take(data, "landed", bool, where, required=False),
            counted_samples=[float(_check(x, float, f"{where}.counted_samples[{i}]")) for i, x in enumerate(samples)],
            latency_table=_take(data, "latency_table", dict, where, required=False),
            bn_recalibration=_take(data, "bn_recalibration", dict, where, required=False),
            seconds=_step_seconds(_take(data, "seconds", dict, where, required=False), f"{where}.seconds"),
            baked_weights=[str(x) for x in _take(data, "baked_weights", list, where, required=False, default=[])],
            extra=extra,
        )


def _step_seconds(data: dict[str, Any] | None, where: str) -> dict[str, dict[str, float]] | None:
    """A round's step times: {step: {"wall_s": s, "cpu_s": s}}, every figure finite and not negative."""
    if data is None:
        return None
    steps = {}
    for step, record in data.items():
        _check(record, dict, f"{where}.{step}")
        figures = {}
        for key in ("wall_s", "cpu_s"):
            value = _take(record, key, float, f"{where}.{step}")
            if value < 0:
                raise PlanError(f"{where}.{step}.{key} is {value:g}: seconds cannot be negative")
            figures[key] = value
        steps[str(step)] = figures
    return steps


@dataclass
class Plan:
    """Everything an artifact is besides its weights."""

    kind: str  # pruned, trained, distilled, or model (saved as it was)
    model: dict[str, Any]  # a ModelSpec as JSON (see kpc.specs), or {"source": "user", "class": ...}
    input_size: tuple[int, int, int]
    rounds: list[PruneRound] = field(default_factory=list)
    parent: dict[str, Any] = field(default_factory=dict)
    normalization: dict[str, Any] | None = None
    data: str | None = None
    metrics: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    teacher: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    weights: dict[str, Any] = field(default_factory=dict)  # {"file": name inside the artifact, "sha256": ...}
    created: str | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return str(self.model.get("source", ""))

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            **self.extra, "format": FORMAT_NEEDING_KPC_3 if any(r.needs_kpc_3 for r in self.rounds) else FORMAT,
            "kind": self.kind, "model": self.model,
            "input_size": list(self.input_size), "rounds": [r.to_json() for r in self.rounds],
            "parent": self.parent, "weights": self.weights, "created": self.created, "versions": self.versions,
        }
        for key in ("normalization", "data", "metrics", "training", "teacher"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        if self.history:
            record["history"] = self.history
        record = _plain(record)
        record[DIGEST_KEY] = digest_of(record)
        return record

    @classmethod
    def from_json(cls, data: Any, where: str = "plan") -> Plan:
        """Read and validate a plan (any format written so far); migrate older formats."""
        _check(data, dict, where)
        fmt = data.get("format")
        if fmt not in (FORMAT, FORMAT_NEEDING_KPC_3, *LEGACY_FORMATS):
            raise PlanError(f"{where} is not a kpc plan (format {_short(fmt)}; this kpc reads {FORMAT_NEEDING_KPC_3}, "
                            f"{FORMAT} and {', '.join(LEGACY_FORMATS)})")
        if fmt in (FORMAT, FORMAT_NEEDING_KPC_3):
            recorded = data.get(DIGEST_KEY)
            if recorded != digest_of(data):
                raise PlanError(f"{where} does not match its digest ({DIGEST_KEY}): it was edited or is corrupt")
        model = _take(data, "model", dict, where)
        _take(model, "source", str, f"{where}.model")
        rounds = _take(data, "rounds", list, where, required=False, default=[])
        parsed = [PruneRound.from_json(r, f"{where}.rounds[{i}]") for i, r in enumerate(rounds)]
        size = data.get("input_size", model.get("input_size"))
        if size is None and parsed:
            size = list(parsed[-1].input_size)
        if size is None:
            raise PlanError(f"{where}.input_size is missing")
        kind = _take(data, "kind", str, where, required=False, default="pruned" if parsed else "model")
        if kind not in KINDS:
            raise PlanError(f"{where}.kind should be one of {', '.join(KINDS)}, got {kind!r}")
        history = _take(data, "history", list, where, required=False, default=[])
        extra = {k: v for k, v in _extra(data, cls).items() if k not in ("format", DIGEST_KEY)}
        return cls(
            kind=kind, model=model, input_size=input_size_of(size, f"{where}.input_size"), rounds=parsed,
            parent=_take(data, "parent", dict, where, required=False, default={}),
            normalization=_take(data, "normalization", dict, where, required=False),
            data=_take(data, "data", str, where, required=False),
            metrics=_take(data, "metrics", dict, where, required=False),
            training=_take(data, "training", dict, where, required=False),
            teacher=_take(data, "teacher", dict, where, required=False),
            history=list(history),
            weights=_take(data, "weights", dict, where, required=False, default={}),
            created=_take(data, "created", str, where, required=False),
            versions=_take(data, "versions", dict, where, required=False, default={}),
            extra=extra,
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1) + "\n"

    @classmethod
    def loads(cls, text: str, where: str = "plan") -> Plan:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{where} is not valid JSON ({exc}): the artifact is corrupt") from None
        return cls.from_json(data, where)


def _plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars (a landed flag, a kept importance) become Python numbers and booleans."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        return _plain(item())
    raise PlanError(f"plan value {value!r} ({type(value).__name__}) cannot be written as JSON")


def digest_of(record: dict[str, Any]) -> str:
    """sha256 of the plan's canonical JSON without its own digest."""
    body = {k: v for k, v in record.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
