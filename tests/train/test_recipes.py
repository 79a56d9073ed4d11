"""Every recipe parses, pins the delta it starts from by sha256 (or says its parent is unrecorded) and is listed
in recipes/README.md; a recipe that starts from the shipped delta pins the shipped delta's sha256."""

import re
from pathlib import Path

import pytest

from memsparse.model.delta import delta_sha256
from memsparse.train.trainer import Recipe

ROOT = Path(__file__).parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.toml"))
SHIPPED = "src/memsparse/weights/msa-smollm2"


def test_the_recipes_are_found():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    assert {"smollm2-msa.toml", "smollm2-msa-v9.toml", "history/smollm2-msa-v1.toml",
            "history/smollm2-msa-v8-sft.toml", "ablations/base.toml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_parses_and_pins_its_parent(path):
    recipe = Recipe.load(path)
    text = path.read_text()
    if recipe.init:
        unrecorded = re.search(r"^# parent unrecorded\b", text, re.M)
        assert bool(recipe.init_sha256) != bool(unrecorded), "init needs init_sha256 or '# parent unrecorded'"
        if recipe.init_sha256:
            assert re.fullmatch(r"[0-9a-f]{64}", recipe.init_sha256)
        if recipe.init == SHIPPED:
            assert recipe.init_sha256 == delta_sha256(ROOT / SHIPPED)
    else:
        assert recipe.init_sha256 is None
    assert path.relative_to(ROOT / "recipes").name in (ROOT / "recipes/README.md").read_text()
