"""Merge-method cases derived from the registry, for tests parametrized over every registered method.

Nothing here names a method: a method added to the registry is covered at once by every test parametrized
over ``NAMES`` (self-merge, dtype, determinism), with arguments read from its declaration: required parameters
get a value, methods that use a base get one, the number of models respects ``min_models``/``max_models``,
per-model parameters get one value per model, random methods a seeded generator.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from merge_ops.methods.registry import METHODS

NAMES = list(METHODS)
"""Every registered method, in registry order: the parametrization of the registry-wide tests."""

REQUIRED_VALUE = 0.4
"""The value a required parameter gets; valid for every scalar type declared so far (float, fraction, non-negative).
``recipe_values`` checks it against each declaration, so a method whose required parameter refuses it fails loudly."""

SPARSE = {"density": 0.5}
"""Set where a method declares them (``sparse=True``): half of each task vector is trimmed or dropped."""


def names_where(declared: Callable[[Any], bool]) -> list[str]:
    """The registered methods whose declaration satisfies ``declared``, e.g. ``names_where(lambda m: m.random)``."""
    return [name for name in NAMES if declared(METHODS[name])]


def model_count(name: str, preferred: int = 2) -> int:
    """``preferred`` models (not counting the base), within the method's declared range."""
    m = METHODS[name]
    n = max(preferred, m.min_models)
    return n if m.max_models is None else min(n, m.max_models)


def uses_base(name: str) -> bool:
    return METHODS[name].gets_base


def recipe_values(name: str, *, sparse: bool = False, **where_declared: Any) -> dict[str, Any]:
    """Scalar values, by recipe name, for the parameters that need one: the required ones, the ``SPARSE`` ones
    when ``sparse``, and those of ``where_declared`` that the method declares (the others are ignored)."""
    values: dict[str, Any] = {}
    for pname, p in METHODS[name].params.items():
        if pname in where_declared and isinstance(where_declared[pname], list):  # one value per model
            values[pname] = [p.check(v) for v in where_declared[pname]]
        elif pname in where_declared:
            values[pname] = p.check(where_declared[pname])
        elif sparse and pname in SPARSE:
            values[pname] = p.check(SPARSE[pname])
        elif p.required:
            values[pname] = p.check(REQUIRED_VALUE)
    return values


def call_kwargs(name: str, n_models: int, *, seed: int = 0, sparse: bool = False, **where_declared: Any) -> dict[str, Any]:
    """Keyword arguments the way the engine passes them: every parameter (defaults too) under its argument name,
    per-model ones as lists of ``n_models`` values (a list in ``where_declared`` is used as is), and a seeded
    generator for random methods."""
    m = METHODS[name]
    values = recipe_values(name, sparse=sparse, **where_declared)
    kwargs: dict[str, Any] = {}
    for pname, p in m.params.items():
        value = values.get(pname, p.default)
        kwargs[p.arg] = value if not p.per_model or isinstance(value, list) else [value] * n_models
    if m.random:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return kwargs


def recipe_for(name: str, family: dict[str, Path], *, sparse: bool = True, **top_level: Any) -> dict[str, Any]:
    """A recipe of ``name`` over a tiny family (``tiny_family.build_family``): the base when the method uses one,
    up to three fine-tunes, per-model values under each model and global ones under ``parameters``."""
    m = METHODS[name]
    values = recipe_values(name, sparse=sparse)
    per_model = {k: v for k, v in values.items() if m.params[k].per_model}
    global_ = {k: v for k, v in values.items() if not m.params[k].per_model}
    fine_tunes = ("ft_a", "ft_b", "ft_neg")[: model_count(name, 3)]
    recipe: dict[str, Any] = {"merge_method": name, "models": [{"model": str(family[k]), "parameters": dict(per_model)} for k in fine_tunes]}
    if uses_base(name):
        recipe["base_model"] = str(family["base"])
    if global_:
        recipe["parameters"] = global_
    return {**recipe, **top_level}
