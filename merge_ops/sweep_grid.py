"""A sweep's grid: ``--grid KEY=V1,V2,...`` options, and the recipe variants (candidates) they span.

    >>> grid = parse_grid(["method=ties,task_arithmetic", "density=0.3,0.5"])
    >>> [c.name for c in expand_grid(yaml.safe_load(text), grid)]
    ['ties-density_0.3', 'ties-density_0.5', 'task_arithmetic']

``method`` names merge methods; every other key is a recipe parameter, set globally on each candidate (see
``vary_recipe``). A candidate leaves out the grid's parameters its method does not declare, so combinations
that differ only in those collapse into one candidate (task_arithmetic has no density).
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from merge_ops.errors import RecipeError
from merge_ops.methods.registry import METHODS
from merge_ops.recipe_variants import RecipeVariant, vary_recipe

METHOD = "method"
_UNSAFE = re.compile(r"[^\w.+-]")

Grid = dict[str, list[Any]]
"""Key -> the values to try, in the order given."""


@dataclass(frozen=True)
class Candidate:
    """One point of the grid: its name (also its folder's), method, parameters and the varied recipe."""

    name: str
    method: str
    parameters: dict[str, Any]
    variant: RecipeVariant


def _scalar(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            return value
    return value


def parse_grid(options: Sequence[str]) -> Grid:
    """``["method=ties,dare_ties", "density=0.3,0.5"]`` -> ``{"method": ["ties", "dare_ties"], "density": [0.3, 0.5]}``.

    Values are YAML scalars (numbers, booleans); method names stay strings.

    Raises:
        RecipeError: an option without ``=``, a key given twice, an empty value, a value that is not a scalar
            (every problem listed).
    """
    grid: Grid = {}
    problems = []
    for option in options:
        key, sep, text = (part.strip() for part in option.partition("="))
        if not sep or not key:
            problems.append(f"{option!r}: write KEY=V1,V2,..., e.g. --grid density=0.3,0.5")
            continue
        if key in grid:
            problems.append(f"{key}: given twice; list all its values in one --grid {key}=V1,V2,...")
        items = [v.strip() for v in text.split(",")]
        if not all(items):
            problems.append(f"{key}={text}: empty value; write --grid {key}=V1,V2,... with no empty item")
            continue
        values = items if key == METHOD else [_scalar(v) for v in items]
        odd = [v for v in values if isinstance(v, (dict, list))]
        if odd:
            problems.append(f"{key}={text}: {odd[0]!r} is not a number, boolean or name")
        grid[key] = values
    if problems:
        raise RecipeError(problems, source="--grid")
    return grid


def value_text(value: Any) -> str:
    """A grid value as written on the command line: ``0.5``, ``true``."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def candidate_name(method: str, parameters: Mapping[str, Any]) -> str:
    """``ties``, ``{"density": 0.5}`` -> ``ties-density_0.5``; safe as a folder name."""
    return "-".join([method, *(_UNSAFE.sub("_", f"{k}_{value_text(v)}") for k, v in parameters.items())])


def _check(methods: list[str], grid: Mapping[str, Sequence[Any]]) -> None:
    problems = [f"{METHOD}={m}: not a known method; use one of {', '.join(METHODS)}" for m in methods if m not in METHODS]
    known = [METHODS[m] for m in methods if m in METHODS]
    for key, values in grid.items():
        shown = ",".join(value_text(v) for v in values)
        if not values:
            problems.append(f"{key}: no values; give at least one, e.g. --grid {key}=V1,V2")
        elif key != METHOD and known and not any(key in m.params for m in known):
            declared = "; ".join(f"{m.name}: {', '.join(m.params) or 'none'}" for m in known)
            problems.append(f"{key}={shown}: no candidate method has this parameter ({declared})")
    if problems:
        raise RecipeError(problems, source="--grid")


def expand_grid(data: Mapping[str, Any], grid: Mapping[str, Sequence[Any]], *, source: str = "recipe") -> list[Candidate]:
    """The candidates of ``grid`` over the recipe ``data``: the cartesian product in the order given, duplicates removed.

    Args:
        data: the recipe as loaded from YAML (mergekit schema).
        grid: from ``parse_grid``; without a ``method`` key every candidate keeps the recipe's method.
        source: the recipe's name in error messages.

    Raises:
        RecipeError: an unknown method, a key no candidate method declares, an empty value list, or candidates
            that are not valid recipes (every problem listed).
    """
    methods = [str(m) for m in grid.get(METHOD, [data.get("merge_method")])]
    _check(methods, grid)
    keys, axes = list(grid) or [METHOD], {**grid, METHOD: methods}
    candidates: dict[str, Candidate] = {}
    problems = []
    for combination in itertools.product(*(axes[k] for k in keys)):
        point = dict(zip(keys, combination, strict=False))
        method = point.pop(METHOD, methods[0])
        parameters = {k: v for k, v in point.items() if k in METHODS[method].params}
        name = candidate_name(method, parameters)
        if name in candidates:
            continue
        try:
            variant = vary_recipe(data, method=method, parameters=parameters, source=f"{source} as {name}")
        except RecipeError as err:
            problems += [f"{name}: {p}" for p in err.problems]
            continue
        candidates[name] = Candidate(name=name, method=method, parameters=parameters, variant=variant)
    if problems:
        raise RecipeError(problems, source=source)
    return list(candidates.values())
