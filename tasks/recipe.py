"""Loading the recipe, as a flow's first task: parsed and validated once, then passed to every task that needs it."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from merge_ops.recipe import Recipe
from merge_ops.recipe_file import load_recipe as read_recipe_file


@task(name="load_recipe", cache_policy=NO_CACHE, persist_result=False)
def load_recipe(recipe_path: Path) -> Recipe:
    """Load and validate a mergekit-format YAML recipe (its errors list every problem with its key path)."""
    return read_recipe_file(Path(recipe_path))
