"""Evaluating recipe parameter values for one tensor: scalars, gradients and filter lists.

Semantics follow mergekit (see merge-methods.md): a gradient is interpolated at ``t``, the
tensor's layer position within its slice in [0, 1] (0 for non-layer tensors); a filter list
takes the first entry whose filter is absent, ``*`` or a substring of the tensor name, and
falls through (``NOT_SET``) when none matches.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from merge_ops.recipe import FilterEntry, Parameters, ParamValue

NOT_SET: Any = object()


def layer_position(index: int, count: int) -> float:
    """``t`` for the layer at ``index`` of a slice with ``count`` layers."""
    return index / (count - 1) if count > 1 else 1.0


def interpolate(values: list[Any], t: float) -> Any:
    """A gradient at ``t``: linear between numbers, steps for bools and strings."""
    if any(isinstance(v, (bool, str)) for v in values):
        return values[int(t * (len(values) - 1))]
    position = t * (len(values) - 1)
    lower = int(position)
    upper = min(len(values) - 1, lower + 1)
    fraction = position - lower
    return (1 - fraction) * values[lower] + fraction * values[upper]


def evaluate(value: ParamValue, tensor_name: str, t: float) -> Any:
    """The value of one parameter setting for one tensor, or NOT_SET if a filter list has no match."""
    if isinstance(value, list) and value and isinstance(value[0], FilterEntry):
        for entry in value:
            if entry.filter in (None, "*") or entry.filter in tensor_name:
                return evaluate(entry.value, tensor_name, t)
        return NOT_SET
    if isinstance(value, list):
        return interpolate(value, t)
    return value


def lookup(name: str, levels: list[Parameters], tensor_name: str, t: float) -> Any:
    """The first level (highest precedence first) that sets ``name`` for this tensor, or NOT_SET."""
    for params in levels:
        if name in params:
            found = evaluate(params[name], tensor_name, t)
            if found is not NOT_SET:
                return found
    return NOT_SET


def scalars_in(value: ParamValue) -> Iterator[Any]:
    """Every scalar a setting can produce (gradient points and filter values), for validation."""
    if isinstance(value, list):
        for item in value:
            yield from scalars_in(item.value) if isinstance(item, FilterEntry) else [item]
    else:
        yield value
