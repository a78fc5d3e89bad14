"""Recipes: one YAML file from model to verified deployment, validated with messages that name the line.

A recipe says what to compress (model, data), for which target (runtime, batch,
precision, threads), under which budget (ms, GFLOPs, a FLOPs ratio, or a fraction of
the measured latency), how to fine-tune and export, and what the result must prove
(minimum speedup, maximum accuracy drop). Every mistake is reported with its key and
line, before any work starts.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kpc.errors import KpcError


@dataclass(frozen=True)
class Field:
    kind: type | tuple[type, ...]
    required: bool = False
    default: Any = None
    help: str = ""


Schema = dict[str, "Field | Section"]


@dataclass(frozen=True)
class Section:
    fields: Schema
    required: bool = False
    help: str = ""
    stage: bool = False  # an optional stage: absent means "skip it", not "use the defaults"


NUMBER = (int, float)


@functools.cache
def schema() -> Schema:
    """The recipe's keys; every default comes from the settings dataclass the stage runs with.

    (Built on first use: the settings live in modules that import torch.)
    """
    from kpc.benchmark import BenchSettings
    from kpc.export import ExportSettings
    from kpc.latency.profiler import ProfileSettings
    from kpc.pruning import PruneSettings
    from kpc.train.loop import DISTILL_DEFAULTS, TRAIN_DEFAULTS

    prune, profile, bench, export = PruneSettings(), ProfileSettings(), BenchSettings(), ExportSettings()
    train, distill = TRAIN_DEFAULTS, DISTILL_DEFAULTS

    def training(defaults: Any, *extra: str) -> dict[str, Field]:
        fields: dict[str, Field] = {
            "epochs": Field(int, default=defaults.epochs), "batch_size": Field(int, default=defaults.batch_size),
            "lr": Field(NUMBER, default=defaults.lr), "optimizer": Field(str, default=defaults.optimizer),
            "weight_decay": Field(NUMBER, default=defaults.weight_decay),
            "warmup_epochs": Field(NUMBER, default=defaults.warmup_epochs), "subset": Field(int),
            "label_smoothing": Field(NUMBER, default=defaults.label_smoothing),
            "threads": Field(int, help="training threads (default: target.threads)"),
        }
        fields.update({key: Field(NUMBER, default=getattr(defaults, key)) for key in extra})
        return fields

    return {
        "model": Field(str, True, help="model spec or artifact directory"),
        "weights": Field(str, help="state dict for a model spec"),
        "num_classes": Field(int),
        "input_size": Field(str, help="CxHxW"),
        "data": Field(str, True, help="data spec: fashion-mnist[:PATH], cifar10:PATH, imagefolder:PATH"),
        "seed": Field(int, default=prune.seed),
        "train": Section(stage=True, fields=training(train)),  # optional: train the teacher first
        "target": Section({
            "runtime": Field(str, default=profile.runtime), "batch": Field(int, default=profile.batch),
            "precision": Field(str, default=profile.precision), "threads": Field(int, default=profile.threads),
        }),
        "budget": Section({
            "ms": Field(NUMBER, help="latency budget in milliseconds"),
            "latency_ratio": Field(NUMBER, help="fraction of the unpruned model's measured latency"),
            "gflops": Field(NUMBER), "ratio": Field(NUMBER, help="fraction of the unpruned FLOPs"),
        }, required=True),
        "lut": Field(str, help="latency table; absent: the run profiles one"),
        "profile": Section({"iters": Field(int, default=profile.iters)}),
        "prune": Section({
            "calib_batches": Field(int, default=prune.calib_batches),
            "calib_batch_size": Field(int, default=prune.calib_batch_size),
            "importance": Field(str, default=prune.importance), "solver": Field(str, default=prune.solver),
            "round_to": Field(int, default=prune.round_to), "min_channels": Field(int, default=prune.min_channels),
            "ignore": Field(list, default=list(prune.ignore)),
            "importance_precision": Field(str, default=prune.importance_precision,
                                          help="auto (bf16 where native), fp32 or bf16"),
            "bn_recalibrate": Field(int, default=prune.bn_recalibrate,
                                    help="batches re-estimating BatchNorm (default: 20 with real data)"),
            "sensitivity": Field((int, str), default=prune.sensitivity,
                                 help="widths per group measured on the output to value the knapsack (0: off; "
                                      "auto: 5 where it fits a minute)"),
        }),
        "distill": Section(stage=True, fields=training(distill, "ikd_weight", "kd_weight", "temperature")),
        "export": Section({
            "onnx": Field(bool, default=export.onnx), "trt": Field(bool, default=export.trt),
            "fp16": Field(bool, default=export.fp16), "opset": Field(int, default=export.opset),
            "dynamic_batch": Field(bool, default=export.dynamic_batch),
        }),
        "verify": Section({
            "min_speedup": Field(NUMBER), "max_accuracy_drop": Field(NUMBER, help="points of top-1"),
            "iters": Field(int, default=bench.iters), "warmup": Field(int, default=bench.warmup),
            "eval_subset": Field(int),
        }),
    }


BUDGET_KEYS = ("ms", "latency_ratio", "gflops", "ratio")


@dataclass
class Recipe:
    """A validated recipe: every section present, defaults filled in."""

    values: dict[str, Any]
    path: Path | None = None
    lines: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def section(self, name: str) -> dict[str, Any] | None:
        return self.values.get(name)

    @property
    def budget_kind(self) -> str:
        return next(k for k in BUDGET_KEYS if self.values["budget"].get(k) is not None)

    @property
    def needs_profile(self) -> bool:
        return self.budget_kind in ("ms", "latency_ratio") and not self.values.get("lut")


def _where(source: str, line: int | None) -> str:
    return f"{source} line {line}" if line is not None else source


def _build(node: yaml.Node, path: str, lines: dict[str, int]) -> Any:
    """YAML node -> plain Python, remembering each key's line (1-based) by its dotted path."""
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            if key in result:
                raise KpcError(f"line {key_node.start_mark.line + 1}: {child} is given twice")
            lines[child] = key_node.start_mark.line + 1
            result[key] = _build(value_node, child, lines)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, f"{path}[{i}]", lines) for i, item in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node)) if node.value != "" else None


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise KpcError(f"{_where(source, line)}: not valid YAML ({problem})") from exc
    if node is None or not isinstance(node, yaml.MappingNode):
        raise KpcError(f"{source}: a recipe is a YAML mapping of keys (model, data, budget, ...)")
    lines: dict[str, int] = {}
    try:
        raw = _build(node, "", lines)
    except KpcError as exc:
        raise KpcError(f"{source} {exc}") from None
    values = _validate(raw, schema(), "", lines, source)
    budget = values["budget"]
    given = [k for k in BUDGET_KEYS if budget.get(k) is not None]
    if len(given) != 1:
        what = "no budget" if not given else f"a budget in {len(given)} units ({', '.join(given)})"
        raise KpcError(f"{_where(source, lines.get('budget'))}: budget gives {what}: give exactly one of "
                       f"{', '.join(BUDGET_KEYS)}")
    if budget[given[0]] <= 0:
        raise KpcError(f"{_where(source, lines.get('budget.' + given[0]))}: budget.{given[0]} must be positive")
    for key in ("latency_ratio", "ratio"):
        if budget.get(key) is not None and budget[key] >= 1:
            raise KpcError(f"{_where(source, lines.get('budget.' + key))}: budget.{key} is a fraction below 1")
    if given[0] == "ratio" and values.get("lut"):  # silently unused, where the user meant the table to count
        raise KpcError(f"{_where(source, lines.get('lut'))}: lut is not read with budget.ratio (a fraction of the "
                       "FLOPs): use budget.latency_ratio for a fraction of the table's latency, or budget.gflops to "
                       "break FLOPs near-ties toward the table's speed, or drop lut")
    return Recipe(values, lines=lines)


def _validate(raw: Any, schema: Schema, prefix: str, lines: dict[str, int], source: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise KpcError(f"{_where(source, lines.get(prefix))}: {prefix or 'the recipe'} should be a mapping of keys")
    for key in raw:
        if key not in schema:
            path = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(schema)})"
            raise KpcError(f"{_where(source, lines.get(path))}: unknown key {path!r}{hint}")
    values: dict[str, Any] = {}
    for key, spec in schema.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(spec, Section):
            if key not in raw or raw[key] is None:
                if spec.required:
                    raise KpcError(f"{source}: missing required section {path!r}")
                values[key] = None if spec.stage else _validate({}, spec.fields, path, lines, source)
                continue
            values[key] = _validate(raw[key], spec.fields, path, lines, source)
            continue
        if key not in raw or raw[key] is None:
            if spec.required:
                raise KpcError(f"{source}: missing required field {path!r} ({spec.help})")
            values[key] = list(spec.default) if isinstance(spec.default, list) else spec.default
            continue
        value = raw[key]
        kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = {int: "an integer", str: "a string", bool: "true or false", list: "a list"}
            expected = "a number" if kinds == NUMBER else names.get(kinds[0], kinds[0].__name__)
            raise KpcError(f"{_where(source, lines.get(path))}: {path} should be {expected}, got {value!r}")
        values[key] = float(value) if kinds == NUMBER else value
    return values


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "is not a file" if path.exists() else "does not exist"
        raise KpcError(f"recipe {path} {what}: give a YAML file (see kpc/recipes/demo.yaml)")
    recipe = parse_recipe(path.read_text(), str(path))
    recipe.path = path
    return recipe


def demo_recipe_path() -> Path:
    return Path(__file__).resolve().parent / "recipes" / "demo.yaml"
