"""Reading the recipe, as the flow's first task (its errors list every problem with its key path)."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from merge_ops.recipe import Recipe, load_recipe


@task(name="load_recipe", cache_policy=NO_CACHE, persist_result=False)
def read_recipe(recipe_path: Path) -> Recipe:
    """Load and validate a mergekit-format YAML recipe."""
    return load_recipe(Path(recipe_path))
