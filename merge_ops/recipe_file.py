"""Reading a recipe: YAML -> a validated ``Recipe``, checked against the schema and then against its method.

``load_recipe`` accepts any mergekit recipe unchanged and raises one RecipeError that lists every problem
with its key path, the bad value and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from merge_ops.errors import RecipeError
from merge_ops.recipe import Recipe, validation_problems
from merge_ops.recipe_checks import method_problems


def parse_recipe(data: Any, *, source: str = "recipe") -> Recipe:
    """Validate recipe data (parsed YAML); RecipeError lists every problem."""
    if not isinstance(data, dict):
        raise RecipeError([f"(top level): expected a mapping with merge_method and models/slices, got {type(data).__name__}"], source=source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems = validation_problems(err)
        bad_keys = {e["loc"][0] for e in err.errors() if e["loc"]}
        try:  # without the broken top-level keys, the rest can still be checked against the method
            problems += method_problems(Recipe.model_validate({k: v for k, v in data.items() if k not in bad_keys}))
        except ValidationError:
            pass
        raise RecipeError(problems, source=source) from None
    problems = method_problems(recipe)
    if problems:
        raise RecipeError(problems, source=source)
    return recipe


def load_recipe(path: Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    try:
        text = Path(path).read_text()
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise RecipeError([f"file not found: {path}"], source=str(path)) from None
    except yaml.YAMLError as err:
        raise RecipeError([f"not valid YAML: {err}"], source=str(path)) from None
    return parse_recipe(data, source=str(path)).with_source(text, Path(path).absolute())
