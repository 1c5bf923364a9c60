"""How a merge method declares itself: the signature of one plain function is the declaration.

A method is ``fn(tensors, base, *, <params>) -> Tensor``. Keyword parameters annotated
``PerModel[T]`` (``list[T]`` to a type checker) take one value per input model, ``each(v)`` is the
default of every model's value; the others are global. Defaults are the
method's defaults, ``Annotated[..., Field(ge=..)]`` ranges are enforced on recipes, a trailing
underscore maps to a recipe name that is a Python keyword (``lambda_`` -> ``lambda``), a
keyword ``generator`` asks the engine for a per-tensor seeded ``torch.Generator``, and a keyword
``dtype`` says the method takes its inputs as stored and computes in ``dtype`` itself (block by
block, so no full-size converted copies exist); without it, inputs arrive converted. A keyword
``out_dtype`` asks for the result in the output dtype, written block by block (no full-size result in
the compute dtype); without it, the engine casts the result.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar, cast, get_args, get_origin

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

BaseUse = Literal["required", "optional", "none"]
REQUIRED: Any = inspect.Parameter.empty
_INJECTED = ("tensors", "base", "generator", "dtype", "out_dtype")

T = TypeVar("T")
_FINITE = ConfigDict(allow_inf_nan=False)
"""Recipe numbers must be finite: ``.nan``, ``.inf`` or ``1e400`` would make every merged value NaN or infinite."""


class _PerModelMarker:
    """Marks a ``PerModel`` annotation."""

    def __repr__(self) -> str:
        return "per-model"


_PER_MODEL = _PerModelMarker()
PerModel = Annotated[list[T], _PER_MODEL]
"""``PerModel[float]``: a parameter with one value for each input model (a ``list[float]``)."""

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]


@dataclass(frozen=True)
class _Each(Generic[T]):
    value: T

    def __repr__(self) -> str:
        return f"each({self.value!r})"


def each(value: T) -> list[T]:
    """The default of a ``PerModel`` parameter: ``value`` for every model (declared as the scalar ``value``).

    An immutable marker that only the decorator reads (ruff's B008 cannot know: ``# noqa: B008``).
    """
    return cast("list[T]", _Each(value))


@dataclass(frozen=True)
class MethodParam:
    """One recipe parameter of a merge method."""

    name: str
    arg: str
    value_type: Any
    default: Any
    per_model: bool

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any) -> Any:
        """Validate one scalar value (numbers must be finite: no NaN or infinity); raises ValueError naming what is allowed."""
        try:
            return TypeAdapter(self.value_type, config=_FINITE).validate_python(value, strict=False)
        except ValidationError as err:
            reason = "; ".join(e["msg"] for e in err.errors())
            raise ValueError(f"{value!r} is not allowed for {self.name} ({self.describe()}): {reason}") from None

    def describe(self) -> str:
        """Human-readable type, range and default, for errors, docs and `mergeflow methods`."""
        base_type = self.value_type
        bounds = []
        if get_origin(base_type) is Annotated:
            base_type, *meta = get_args(base_type)
            for m in meta:
                for item in getattr(m, "metadata", []):
                    for op in ("ge", "gt", "le", "lt"):
                        if hasattr(item, op):
                            bounds.append(f"{op} {getattr(item, op)}")
        text = getattr(base_type, "__name__", str(base_type))
        if bounds:
            text += " " + ", ".join(bounds)
        text += ", per model" if self.per_model else ", global"
        return text + (", required" if self.required else f", default {self.default!r}")


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its function and what it declares."""

    name: str
    fn: Callable[..., Any]
    base: BaseUse
    params: dict[str, MethodParam]
    random: bool
    upcasts: bool
    casts_output: bool
    min_models: int
    max_models: int | None
    elementwise: bool
    summary: str
    normalized_by: str | None = None
    """The bool parameter that, when true, makes the function divide by the sum of ``weight`` (the plan refuses weights
    summing to zero then)."""

    @property
    def gets_base(self) -> bool:
        """The function gets the base model's tensor as ``base``, apart from ``tensors``."""
        return self.base in ("required", "optional")

    def __call__(self, tensors: Any, base: Any, **kwargs: Any) -> Any:
        return self.fn(tensors, base, **kwargs)


def merge_method(
    name: str,
    *,
    base: BaseUse,
    min_models: int = 1,
    max_models: int | None = None,
    elementwise: bool = False,
    summary: str | None = None,
    normalized_by: str | None = None,
) -> Callable[[Callable[..., Any]], MergeMethod]:
    """Turn a plain function into a MergeMethod, reading its parameters from the signature.

    Args:
        name: the recipe's ``merge_method`` value.
        base: whether the method needs ``base_model`` ("required"), can use it ("optional"), or has no base
            ("none": as in mergekit, a recipe's base_model not listed under ``models`` joins them as one more model,
            after the listed ones; the function gets it among ``tensors`` and ``base`` is None).
        min_models, max_models: how many non-base inputs each tensor may have.
        elementwise: each output element depends only on the same element of each input, so the
            engine may merge a large tensor in row blocks (bit-identical, less memory).
        summary: the one-line description; by default the first paragraph of the docstring.
        normalized_by: the bool parameter that makes the function divide by the sum of its ``weight`` values, so that
            the plan refuses, per tensor, weights that sum to (about) zero while it is true.
    """

    def wrap(fn: Callable[..., Any]) -> MergeMethod:
        signature = inspect.signature(fn, eval_str=True)
        params: dict[str, MethodParam] = {}
        for p in signature.parameters.values():
            if p.name in _INJECTED:
                continue
            hint = p.annotation
            per_model = get_origin(hint) is Annotated and _PER_MODEL in get_args(hint)[1:]
            value_type = get_args(get_args(hint)[0])[0] if per_model else hint
            default = p.default.value if isinstance(p.default, _Each) else p.default
            recipe_name = p.name.rstrip("_")
            params[recipe_name] = MethodParam(recipe_name, p.name, value_type, default, per_model)
        if normalized_by is not None and not {normalized_by, "weight"} <= set(params):
            raise TypeError(f"{name}: normalized_by={normalized_by!r} needs a `{normalized_by}` and a `weight` parameter")
        doc = summary or (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
        injected = signature.parameters
        return MergeMethod(
            name, fn, base, params, "generator" in injected, "dtype" in injected, "out_dtype" in injected,
            min_models, max_models, elementwise, doc, normalized_by,
        )

    return wrap
