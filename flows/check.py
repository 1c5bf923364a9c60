"""Can the models of a recipe be merged? Resolve -> headers -> compatibility, and weight space for local models.

``mergeflow check RECIPE`` runs it; nothing is downloaded (Hub models are read by ranged reads of their headers).

    >>> check_models(recipe=Path("recipes/skills-ties.yaml")).compatible
    True
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, unmapped

from merge_ops.compatibility import CompatibilityReport
from tasks.checks import check_compatibility, check_weight_space
from tasks.recipe import load_recipe
from tasks.sources import read_model_headers, resolve_model


@flow(name="check_models", flow_run_name="check-{recipe.stem}")
def check_models(recipe: Path, endpoint: str | None = None, cache_dir: Path | None = None) -> CompatibilityReport:
    """The compatibility report of the recipe's models; with every model local, their weight-space distances too."""
    # Load the recipe; pin every model without downloading
    parsed = load_recipe(recipe)
    sources = resolve_model.map(parsed.referenced_models, unmapped(parsed.base_dir), unmapped(endpoint), unmapped(parsed.base_model)).result()

    # Compare the headers; the weights of local models are compared with the base's too
    headers = read_model_headers.map(sources, unmapped(endpoint), unmapped(cache_dir)).result()
    report = check_compatibility(parsed, headers, stop_on_problems=False)
    if all(s.path is not None for s in sources):
        report = check_weight_space(parsed, report, headers, sources)
    return report
