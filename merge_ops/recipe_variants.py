"""Variants of a recipe: another merge method and/or other parameter values, for DVC params and sweeps.

    >>> variant = vary_recipe(yaml.safe_load(text), method="ties", parameters={"density": 0.5})
    >>> variant.data["merge_method"], variant.dropped
    ('ties', [])

A parameter override replaces the value everywhere the recipe sets it (globally, per model, per slice) with
one global value. Switching the method drops the parameters the new method does not declare (listed in
``dropped``). The result is validated like any recipe.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from merge_ops.errors import RecipeError
from merge_ops.methods.registry import get_method
from merge_ops.recipe import Recipe
from merge_ops.recipe_file import parse_recipe


@dataclass(frozen=True)
class RecipeVariant:
    """A varied recipe: its data (mergekit YAML schema), the validated recipe, and what was dropped."""

    data: dict[str, Any]
    recipe: Recipe
    dropped: list[str] = field(default_factory=list)

    def yaml(self) -> str:
        return yaml.safe_dump(self.data, sort_keys=False)


def _parameter_tables(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ``parameters`` mapping of the recipe: global, per model, per slice and per slice source."""
    data["parameters"] = data.get("parameters") or {}
    holders = list(data.get("models") or [])
    for sl in data.get("slices") or []:
        holders += [sl, *(sl.get("sources") or [])]
    return [data["parameters"], *(h["parameters"] for h in holders if isinstance(h, dict) and isinstance(h.get("parameters"), dict))]


def vary_recipe(data: Mapping[str, Any], *, method: str | None = None, parameters: Mapping[str, Any] | None = None, source: str = "recipe") -> RecipeVariant:
    """``data`` with ``merge_method`` set to ``method`` and each of ``parameters`` set globally.

    Raises:
        RecipeError: an unknown method, a parameter the method does not declare, or a variant that is not a
            valid recipe (every problem listed).
    """
    varied = copy.deepcopy(dict(data))
    if method is not None:
        varied["merge_method"] = method
    declared = get_method(str(varied.get("merge_method"))).params
    unknown = [name for name in parameters or {} if name not in declared]
    if unknown:
        allowed = ", ".join(declared) or "none"
        raise RecipeError([f"{name}: not a parameter of {varied['merge_method']}; its parameters: {allowed}" for name in unknown], source=source)
    dropped: set[str] = set()
    tables = _parameter_tables(varied)
    for table in tables:
        for name in [n for n in table if n not in declared]:
            dropped.add(name)
            del table[name]
        for name in parameters or {}:
            table.pop(name, None)
    tables[0].update(parameters or {})
    return RecipeVariant(data=varied, recipe=parse_recipe(varied, source=source), dropped=sorted(dropped))
