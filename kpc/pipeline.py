"""`kpc run`: profile -> prune -> distill -> export -> verify, as stages that skip when nothing changed.

Each stage writes into its own directory under the run directory; its outputs are
written atomically by their writers and `stage.json` (the record of the stage's
inputs and outputs) is written last. A stage counts as done only when that record
exists and its inputs fingerprint (the recipe section plus the digests of the
upstream outputs) matches: an interrupted stage is redone, never half-used, and a
stage whose inputs did not change is skipped.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kpc.artifact import LoadedModel, is_artifact, open_model, read_plan, sha256_file
from kpc.atomic import check_writable, output_lock, write_text_atomic
from kpc.data import parse_data_spec
from kpc.errors import KpcError, VerificationFailed
from kpc.recipe import Recipe

STAGES = ("train", "profile", "prune", "distill", "export", "verify")
RECORD = "stage.json"
PENDING = "pending.json"
log = logging.getLogger(__name__)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _artifact_digest(path: Path) -> str:
    """An artifact by content: its plan file (which carries the weights' sha256) hashed whole."""
    plan = read_plan(path)
    return _digest([sha256_file(Path(path) / "plan.json"), plan.weights.get("sha256")])


def _source_digest(text: str | None) -> str | None:
    """A model or weights named by the recipe, by content: an artifact, a file spec's .py, a weights file."""
    if text is None:
        return None
    if is_artifact(text):
        return _artifact_digest(Path(text))
    source = text.rpartition(":")[0] if ":" in text else text
    path = Path(source).expanduser()
    if path.is_file():
        return sha256_file(path)
    return text  # a registry name: the name is the content


def output_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file a stage wrote (its record, checkpoints and hidden files aside)."""
    digests: dict[str, str] = {}
    if not directory.is_dir():
        return digests
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if not path.is_file() or path.name in (RECORD, PENDING) or any(
                part.startswith(".") or part.endswith(".work") for part in relative.parts):
            continue
        digests[str(relative)] = sha256_file(path)
    return digests


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


class StageUI(Protocol):
    """How a long stage shows progress (the CLI renders it; the default shows nothing)."""

    def trainer(self) -> contextlib.AbstractContextManager[Any]: ...

    def counter(self, description: str, total: int | None = None) -> contextlib.AbstractContextManager[Any]: ...


class QuietUI:
    def trainer(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext(None)

    def counter(self, description: str, total: int | None = None) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext(lambda *_args: None)


@dataclass
class StageStatus:
    name: str
    action: str  # "run", "skip" (up to date), "absent" (not in the recipe)
    reason: str


class Pipeline:
    def __init__(self, recipe: Recipe, out: Path, ui: StageUI | None = None) -> None:
        self.recipe = recipe
        self.out = Path(out)
        self.ui: StageUI = ui or QuietUI()
        self.data = parse_data_spec(recipe["data"])
        model = recipe["model"]
        # the recipe names its model: a file spec there is trusted, and artifacts built from it are rebuilt with it
        self.model_file = model if isinstance(model, str) and model.rpartition(":")[0].endswith(".py") else None
        self.check_sections()  # a bad value in any section is refused, with its key and line, before any stage runs

    def check_sections(self) -> None:
        """Build and check every active section's settings now: a `distill: {epochs: -1}` was found only after the
        prune had run, and named the CLI's --epochs rather than the recipe's key."""
        from kpc.latency.profiler import check_profile_settings

        r = self.recipe
        checks: list[tuple[str, Callable[[], Any]]] = [("prune", self.prune_settings)]
        if self.active("train"):
            checks.append(("train", lambda: self.fit_settings(r["train"], teacher=False).check()))
        if self.active("distill"):
            checks.append(("distill", lambda: self.fit_settings(r["distill"], teacher=True).check()))
        if self.active("profile"):
            checks.append(("profile", lambda: check_profile_settings(self.profile_settings())))
        checks.append(("export", lambda: self.export_settings().check()))
        checks.append(("verify", lambda: self.bench_settings().check()))
        for section, check in checks:
            try:
                check()
            except KpcError as exc:
                raise self.recipe_error(section, exc) from exc
        self.check_classes()

    def check_classes(self) -> None:
        """A teacher the run does not train must have one output per class of the data distill and verify read.

        Without `num_classes:`, torchvision:resnet18 has 1000 outputs; the run pruned it and
        failed at distillation on Fashion-MNIST's 10 classes.
        """
        from kpc.data import dataset_num_classes

        if self.active("train") or self.data.kind == "synthetic":
            return
        classes = dataset_num_classes(self.data)
        if classes is None:
            return
        from kpc.train.loop import model_outputs

        teacher = self.open_teacher()
        outputs = model_outputs(teacher.model, teacher.example_input())
        if outputs != classes:
            line = self.recipe.lines.get("num_classes", self.recipe.lines.get("model"))
            raise KpcError(f"{self.source}{f' line {line}' if line else ''}: the model has {outputs} outputs but "
                           f"{self.data.label()} has {classes} classes: set num_classes: {classes} (and weights: "
                           "trained for them), or add a train: section")

    def recipe_error(self, section: str, exc: KpcError) -> KpcError:
        """A settings error in the recipe's words: `recipe.yaml line 9: distill.epochs must be ...`."""
        text = str(exc)
        source = self.source
        flag = re.search(r"--([a-z][a-z0-9-]*)", text)
        key = flag.group(1).replace("-", "_") if flag else None
        for where in ((section,) if key is None else (section, "target", "prune")):
            if key is not None and f"{where}.{key}" in self.recipe.lines:
                line = self.recipe.lines[f"{where}.{key}"]
                return type(exc)(f"{source} line {line}: {text.replace(flag.group(0), f'{where}.{key}', 1)}")
        line = self.recipe.lines.get(section)
        place = f"{source} line {line}" if line is not None else source
        if flag is not None:
            text = text.replace(flag.group(0), f"{section}.{key}", 1)
        return type(exc)(f"{place}: {text}" if flag is not None else f"{place}: {section}: {text}")

    @property
    def source(self) -> str:
        """How errors name the recipe: its file, where it came from one."""
        return str(self.recipe.path) if self.recipe.path is not None else "the recipe"

    def profile_settings(self) -> Any:
        """The profile stage's settings: the target's runtime, the prune's width grid, `profile:`'s iterations."""
        from kpc.latency.profiler import ProfileSettings

        r = self.recipe
        t, p = r["target"], r["prune"]
        return ProfileSettings(runtime=t["runtime"], batch=t["batch"], threads=t["threads"], precision=t["precision"],
                               round_to=p["round_to"], min_channels=p["min_channels"], ignore=tuple(p["ignore"]),
                               iters=r["profile"]["iters"])

    def export_settings(self) -> Any:
        """The export stage's settings: `export:` at the target's batch."""
        from kpc.export import ExportSettings

        e = self.recipe["export"]
        return ExportSettings(onnx=e["onnx"], trt=e["trt"], fp16=e["fp16"], opset=e["opset"],
                              dynamic_batch=e["dynamic_batch"], batch=self.recipe["target"]["batch"])

    def bench_settings(self) -> Any:
        """The verify stage's bench: the target, `verify:`'s warm-up and iterations."""
        from kpc.benchmark import BenchSettings

        t, v = self.recipe["target"], self.recipe["verify"]
        return BenchSettings(runtime=t["runtime"], batch=t["batch"], threads=t["threads"], precision=t["precision"],
                             warmup=v["warmup"], iters=v["iters"])

    def fit_settings(self, section: dict[str, Any], *, teacher: bool) -> Any:
        """The TrainSettings of a `train:` or `distill:` section, on the recipe's data, seed and target threads."""
        from dataclasses import replace

        from kpc.train.loop import DISTILL_DEFAULTS, TRAIN_DEFAULTS

        defaults = DISTILL_DEFAULTS if teacher else TRAIN_DEFAULTS
        values = {"threads": self.recipe["target"]["threads"], **{k: v for k, v in section.items() if v is not None}}
        values["adaptive_threads"] = section.get("threads") is None  # the target's count may drop under load
        return replace(defaults, data=self.data, seed=self.recipe["seed"], **values)

    def prune_settings(self) -> Any:
        """The recipe's `prune:` section as checked PruneSettings."""
        from kpc.pruning import PruneSettings

        r = self.recipe
        p = r["prune"]
        settings = PruneSettings(calib_batches=p["calib_batches"], calib_batch_size=p["calib_batch_size"],
                                 importance=p["importance"], solver=p["solver"], round_to=p["round_to"],
                                 min_channels=p["min_channels"], ignore=tuple(p["ignore"]), seed=r["seed"],
                                 bn_recalibrate=p["bn_recalibrate"],
                                 importance_precision=p["importance_precision"], sensitivity=p["sensitivity"])
        settings.check()
        return settings

    # ------------------------------------------------------------ layout

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def active(self, stage: str) -> bool:
        if stage == "train":
            return self.recipe.section("train") is not None
        if stage == "profile":
            return self.recipe.needs_profile
        if stage == "distill":
            return self.recipe.section("distill") is not None
        return True

    def teacher_path(self) -> str:
        return str(self.stage_dir("train") / "artifact") if self.active("train") else self.recipe["model"]

    def lut_path(self) -> Path | None:
        if self.active("profile"):
            return self.stage_dir("profile") / "lut.json"
        return Path(self.recipe["lut"]) if self.recipe["lut"] else None

    def child_path(self) -> Path:
        return self.stage_dir("prune") / "artifact"

    def final_path(self) -> Path:
        return self.stage_dir("distill") / "artifact" if self.active("distill") else self.child_path()

    def open_teacher(self) -> LoadedModel:
        text = self.teacher_path()
        if self.active("train"):
            return open_model(text, model_file=self.model_file)
        from kpc.specs import parse_input_size

        return open_model(text, weights=self.recipe["weights"], num_classes=self.recipe["num_classes"],
                          input_size=parse_input_size(self.recipe["input_size"]), model_file=self.model_file)

    def open_artifact(self, path: Path) -> LoadedModel:
        return open_model(str(path), model_file=self.model_file)

    # ------------------------------------------------------------ fingerprints

    def inputs(self, stage: str) -> dict[str, Any]:
        r = self.recipe
        upstream: dict[str, str] = {}
        if stage != "train":
            upstream["teacher"] = (_artifact_digest(Path(self.teacher_path())) if self.active("train")
                                   else _digest([_source_digest(r["model"]), _source_digest(r["weights"]),
                                                 r["num_classes"], r["input_size"]]))
        lut = self.lut_path()
        if stage in ("prune", "distill", "export", "verify") and lut is not None and (
                r.budget_kind in ("ms", "latency_ratio") or (r.budget_kind == "gflops" and r["lut"])):
            upstream["lut"] = sha256_file(lut)
        if stage in ("distill", "export", "verify"):
            upstream["child"] = _artifact_digest(self.child_path())
        if stage in ("export", "verify"):
            upstream["final"] = _artifact_digest(self.final_path())
        config: dict[str, Any] = {"data": r["data"], "seed": r["seed"]}
        config.update({
            "train": {"model": [_source_digest(r["model"]), _source_digest(r["weights"]), r["num_classes"],
                                r["input_size"]], **(r["train"] or {})},
            "profile": {**r["profile"], "target": r["target"], "prune": r["prune"]},
            "prune": {**r["prune"], "budget": r["budget"], "target": r["target"]},
            "distill": r["distill"] or {},
            "export": {**r["export"], "batch": r["target"]["batch"]},
            "verify": {**r["verify"], "target": r["target"]},
        }[stage])
        return {"stage": stage, "config": config, "upstream": upstream}

    def record(self, stage: str) -> dict[str, Any] | None:
        path = self.stage_dir(stage) / RECORD
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def status(self, start_from: str | None = None) -> list[StageStatus]:
        """What a run would do, stage by stage (upstream stages that would run make the rest run too)."""
        if start_from is not None and start_from not in STAGES:
            raise KpcError(f"unknown stage {start_from!r}: use one of {', '.join(STAGES)}")
        forced = False
        statuses = []
        for stage in STAGES:
            forced = forced or stage == start_from
            if not self.active(stage):
                statuses.append(StageStatus(stage, "absent", "not in the recipe"))
                continue
            if forced:
                statuses.append(StageStatus(stage, "run", f"--from {start_from}"))
                continue
            if any(s.action == "run" for s in statuses):
                statuses.append(StageStatus(stage, "run", "an upstream stage runs"))
                continue
            record = self.record(stage)
            if record is None:
                statuses.append(StageStatus(stage, "run", "no finished output"))
            elif record.get("output_digests") != output_digests(self.stage_dir(stage)):
                statuses.append(StageStatus(stage, "run", "its outputs are missing or changed"))
            elif record.get("inputs_hash") != _digest(self.inputs(stage)):
                statuses.append(StageStatus(stage, "run", "its inputs changed"))
            else:
                statuses.append(StageStatus(stage, "skip", "up to date"))
        return statuses

    # ------------------------------------------------------------ running

    def run(self, start_from: str | None = None) -> dict[str, Any]:
        """Run every stage that is not up to date, then write the report; raise on a failed gate.

        The run directory is locked for the whole run: a second `kpc run` into it is refused.
        """
        check_writable(self.out)
        with output_lock(self.out, what="run directory"):
            self.out.mkdir(parents=True, exist_ok=True)
            return self._run_locked(start_from)

    def _run_locked(self, start_from: str | None) -> dict[str, Any]:
        statuses = self.status(start_from)
        run_started = time.perf_counter()
        for status in statuses:
            if status.action == "absent":
                continue
            if status.action == "skip":
                log.info("[%s] up to date, skipped", status.name)
                continue
            log.info("[%s] running (%s)", status.name, status.reason)
            directory = self.stage_dir(status.name)
            inputs = self.inputs(status.name)  # upstream outputs are final by now: fingerprint once
            self._prepare(directory, _digest(inputs))
            started = _dt.datetime.now(_dt.UTC)
            clock = time.perf_counter()
            outputs = getattr(self, f"_run_{status.name}")(directory)
            seconds = time.perf_counter() - clock
            record = {"stage": status.name, "inputs": inputs, "inputs_hash": _digest(inputs), "outputs": outputs,
                      "output_digests": output_digests(directory), "seconds": round(seconds, 1),
                      "started": started.isoformat(timespec="seconds"),
                      "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
            write_text_atomic(directory / RECORD, json.dumps(record, indent=1, default=str) + "\n")
            (directory / PENDING).unlink(missing_ok=True)
            log.info("[%s] done in %s", status.name, _duration(seconds))
        from kpc.report import build_report, write_report

        report = build_report(self, {s.name: s.action for s in statuses},
                              run_seconds=time.perf_counter() - run_started)
        write_report(self.out, report)
        gate = report["gate"]
        if gate["passed"] is False:
            raise VerificationFailed(f"verification failed: {'; '.join(gate['failures'])} (report: "
                                     f"{self.out / 'report.md'})")
        return report

    def _prepare(self, directory: Path, inputs_hash: str) -> None:
        """Empty the stage directory; keep training checkpoints only if they were made for the same inputs.

        `pending.json` marks a stage that started; an interrupted training stage with unchanged
        inputs resumes from its last checkpoint, anything else starts over.
        """
        pending = directory / PENDING
        resumable = pending.is_file() and pending.read_text().strip() == inputs_hash
        if directory.exists():
            for child in directory.iterdir():
                if resumable and child.is_dir() and child.name.endswith(".work"):
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(pending, inputs_hash + "\n")

    def _fit(self, directory: Path, loaded: LoadedModel, section: dict[str, Any], teacher: LoadedModel | None) -> dict:
        from kpc.train.loop import fit

        settings = self.fit_settings(section, teacher=teacher is not None)
        with self.ui.trainer() as reporter:
            result = fit(loaded, settings, directory / "artifact", teacher=teacher, resume=True, overwrite=True,
                         reporter=reporter)
        metrics = result.plan.metrics or {}
        return {"artifact": str(directory / "artifact"), "metrics": metrics}

    def _run_train(self, directory: Path) -> dict[str, Any]:
        from kpc.data import dataset_num_classes, native_input_size
        from kpc.specs import parse_input_size

        r = self.recipe
        size = parse_input_size(r["input_size"]) or native_input_size(self.data)
        classes = r["num_classes"] if r["num_classes"] is not None else dataset_num_classes(self.data)
        import torch

        torch.manual_seed(r["seed"])  # the seed comes before the model is built: one recipe, one teacher
        loaded = open_model(r["model"], weights=r["weights"], num_classes=classes, input_size=size)
        return self._fit(directory, loaded, r["train"], None)

    def _run_profile(self, directory: Path) -> dict[str, Any]:
        from kpc.latency.profiler import profile

        settings = self.profile_settings()
        teacher = self.open_teacher()
        with self.ui.counter(f"profiling on {settings.runtime}") as tick:
            table = profile(teacher.model, teacher.example_input(), settings, directory / "lut.json",
                            label=teacher.label, progress=tick)
        return {"lut": str(directory / "lut.json"), "full_model_ms": table.header["full_model_ms"]}

    def prune_budget(self) -> Any:
        """The recipe's budget, on its target: a latency budget reads the profiled (or given) table; a FLOPs
        budget keeps the target runtime's channel blocks (`Pruner.flops_width_step`)."""
        from kpc.latency import load_table
        from kpc.workflow import make_budget

        r = self.recipe
        t, b = r["target"], r["budget"]
        kind = r.budget_kind
        target = {k: t[k] for k in ("runtime", "batch", "threads", "precision")}
        if kind in ("ms", "latency_ratio"):
            lut = self.lut_path()
            ms = b["ms"] if kind == "ms" else b["latency_ratio"] * load_table(lut).header["full_model_ms"]
            return make_budget(ms=ms, lut=lut, target=target)
        if kind == "gflops":  # with the recipe's own table, near-ties go to the plan it runs fastest (as --lut)
            return make_budget(gflops=b["gflops"], lut=r["lut"] or None, target=target)
        return make_budget(ratio=b["ratio"], target=target)

    def _run_prune(self, directory: Path) -> dict[str, Any]:
        from kpc.workflow import prune_to_artifact

        teacher = self.open_teacher()
        settings = self.prune_settings()
        budget = self.prune_budget()
        with self.ui.counter("calibrating importance", settings.calib_batches) as tick:
            result = prune_to_artifact(teacher, budget, settings, self.data, directory / "artifact", overwrite=True,
                                       progress=tick)
        landed = result.round.landed
        return {"artifact": str(directory / "artifact"), "budget": budget.describe(), "landed": landed,
                "miss": result.round.miss}

    def _run_distill(self, directory: Path) -> dict[str, Any]:
        return self._fit(directory, self.open_artifact(self.child_path()), self.recipe["distill"], self.open_teacher())

    def _run_export(self, directory: Path) -> dict[str, Any]:
        from kpc.export import export_model

        export_model(self.open_artifact(self.final_path()), directory / "export", self.export_settings(),
                     overwrite=True)
        return {"export": str(directory / "export")}

    def _run_verify(self, directory: Path) -> dict[str, Any]:
        from kpc.benchmark import render_markdown, run_bench
        from kpc.evaluate import evaluate_accuracy

        v = self.recipe["verify"]
        teacher, child, final = (self.open_teacher(), self.open_artifact(self.child_path()),
                                 self.open_artifact(self.final_path()))
        bench = run_bench(teacher, final, self.bench_settings(), min_speedup=v["min_speedup"])
        accuracy = {}
        if self.data.kind != "synthetic":
            for name, loaded in (("teacher", teacher), ("pruned", child), ("final", final)):
                log.info("[verify] top-1 of the %s on %s", name, self.data.label())
                accuracy[name] = evaluate_accuracy(loaded.model, self.data, loaded.spec.input_size,
                                                   subset=v["eval_subset"])
        write_text_atomic(directory / "bench.json", json.dumps(bench, indent=1) + "\n")
        write_text_atomic(directory / "bench.md", render_markdown(bench))
        write_text_atomic(directory / "accuracy.json", json.dumps(accuracy, indent=1) + "\n")
        return {"speedup": bench["speedup"], "accuracy": {k: v["top1"] for k, v in accuracy.items()}}
