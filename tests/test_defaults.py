"""One source for every default: the settings dataclasses; the CLI options and the recipe schema agree with them."""

from __future__ import annotations

from dataclasses import fields
from enum import Enum

import pytest
import typer

from kpc.benchmark import BenchSettings
from kpc.cli import app
from kpc.export import ExportSettings
from kpc.latency.profiler import ProfileSettings
from kpc.pruning import PruneSettings
from kpc.recipe import Section, schema
from kpc.train.loop import DISTILL_DEFAULTS, TRAIN_DEFAULTS

COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]
# (command, settings object, options that are the command's own, not the settings')
CASES = [
    ("prune", PruneSettings(), {"ignore"}),
    ("profile", ProfileSettings(), {"ignore"}),
    ("bench", BenchSettings(), set()),
    ("train", TRAIN_DEFAULTS, {"lr", "data"}),  # data: the CLI names the embedded default, fashion-mnist
    ("distill", DISTILL_DEFAULTS, {"lr", "data"}),
    ("export", ExportSettings(), {"onnx"}),
]


def _cli_defaults(command: str) -> dict[str, object]:
    defaults = {}
    for param in COMMANDS[command].params:
        value = param.default
        defaults[param.name] = value.value if isinstance(value, Enum) else value
    return defaults


@pytest.mark.parametrize(("command", "settings", "own"), CASES, ids=[c for c, _, _ in CASES])
def test_cli_defaults_are_the_settings_defaults(command, settings, own):
    cli = _cli_defaults(command)
    shared = [f.name for f in fields(settings) if f.name in cli and f.name not in own]
    assert shared, f"kpc {command} shares no option with {type(settings).__name__}"
    for name in shared:
        assert cli[name] == getattr(settings, name), f"kpc {command} --{name.replace('_', '-')}"


def _recipe_defaults(section: str) -> dict[str, object]:
    entry = schema()[section]
    assert isinstance(entry, Section)
    return {key: field.default for key, field in entry.fields.items() if not isinstance(field, Section)}


@pytest.mark.parametrize(("section", "settings"), [
    ("prune", PruneSettings()), ("train", TRAIN_DEFAULTS), ("distill", DISTILL_DEFAULTS), ("export", ExportSettings()),
], ids=["prune", "train", "distill", "export"])
def test_recipe_defaults_are_the_settings_defaults(section, settings):
    recipe = _recipe_defaults(section)
    names = {f.name for f in fields(settings)}
    compared = [key for key in recipe if key in names and recipe[key] is not None and key != "threads"]
    assert compared
    for key in compared:
        expected = getattr(settings, key)
        assert recipe[key] == (list(expected) if isinstance(expected, tuple) else expected), f"{section}.{key}"


def test_recipe_target_and_verify_defaults():
    profile, bench = ProfileSettings(), BenchSettings()
    target = _recipe_defaults("target")
    assert target == {"runtime": profile.runtime, "batch": profile.batch, "precision": profile.precision,
                      "threads": profile.threads}
    assert bench.threads == profile.threads, "kpc bench and kpc profile pin the same threads by default"
    verify = _recipe_defaults("verify")
    assert (verify["iters"], verify["warmup"]) == (bench.iters, bench.warmup)


def _squash(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_that_renders_whole(command):
    """Rich reads square brackets as markup: a help text must come out of --help as it was written."""
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "2000", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    rendered = _squash(result.output)
    for param in COMMANDS[command].params:
        if getattr(param, "hidden", False):
            continue
        text = getattr(param, "help", None)
        if param.param_type_name == "option":
            assert text, f"kpc {command} {param.opts[0]} has no help"
        if text:
            written = _squash(text.replace("\\[", "["))  # \[ is rich's escape for a literal bracket
            assert written in rendered, f"kpc {command} {param.opts[0]}: help text garbled in --help"
