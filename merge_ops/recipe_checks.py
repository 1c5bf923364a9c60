"""Checks of a parsed recipe against its merge method's declared parameters (or, with ``output: adapter``, against
PEFT's combination types)."""
from __future__ import annotations

import logging
import math

from pydantic import ValidationError

from merge_ops.adapter_combination import COMBINATIONS, Combination, CombinationOptions
from merge_ops.errors import RecipeError
from merge_ops.methods.declaration import MergeMethod
from merge_ops.methods.registry import METHODS, get_method
from merge_ops.parameters import scalars_in
from merge_ops.recipe import ModelRef, Parameters, Recipe

log = logging.getLogger(__name__)


def _check_settings(method: MergeMethod, params: Parameters, where: str, *, per_model_only: bool) -> list[str]:
    problems = []
    for name, value in params.items():
        param = method.params.get(name)
        if param is None:
            if any(name in m.params for m in METHODS.values()):
                log.warning("%s.%s is not used by %s and is ignored", where, name, method.name)
            else:
                allowed = ", ".join(method.params) or "none"
                problems.append(f"{where}.{name}: unknown parameter for {method.name}; allowed: {allowed}")
            continue
        if per_model_only and not param.per_model:
            problems.append(f"{where}.{name}: {name} is a global parameter of {method.name}; set it under the top-level `parameters`")
            continue
        for scalar in scalars_in(value):
            try:
                param.check(scalar)
            except ValueError as err:
                problems.append(f"{where}.{name}: {err}")
    return problems


def _missing_required(method: MergeMethod, levels: list[Parameters], where: str, *, per_model: bool) -> list[str]:
    return [
        f"{where}: {name} is required by {method.name} ({param.describe()}); set it here or in the top-level `parameters`"
        for name, param in method.params.items()
        if param.required and param.per_model == per_model and not any(name in level for level in levels)
    ]


def method_problems(recipe: Recipe) -> list[str]:
    """Every problem of ``recipe`` with respect to its method, each with its key path."""
    if recipe.output == "adapter":
        return adapter_problems(recipe)
    try:
        method = get_method(recipe.merge_method)
    except RecipeError as err:
        return err.problems
    problems = _check_settings(method, recipe.parameters, "parameters", per_model_only=False)
    if method.base == "required" and recipe.base_model is None:
        problems.append(f"base_model: {method.name} needs a base_model; add `base_model: <the model the others were fine-tuned from>`")
    base = recipe.base_model
    groups: list[tuple[str, list[tuple[ModelRef, Parameters]], Parameters]]
    if recipe.models is not None:
        groups = [("models", [(m.model, m.parameters) for m in recipe.models], {})]
        if base and not method.gets_base and base not in [m.model for m in recipe.models]:  # mergekit adds it to the models
            groups[0][1].append((base, {}))
    else:
        groups = [
            (f"slices[{i}].sources", [(s.model, s.parameters) for s in sl.sources], sl.parameters)
            for i, sl in enumerate(recipe.slices or [])
        ]
    for i, sl in enumerate(recipe.slices or []):
        problems += _check_settings(method, sl.parameters, f"slices[{i}].parameters", per_model_only=False)
        problems += _missing_required(method, [sl.parameters, recipe.parameters], f"slices[{i}]", per_model=False)
    if recipe.models is not None:
        problems += _missing_required(method, [recipe.parameters], "parameters", per_model=False)
    for where, members, slice_params in groups:
        others = [m for m, _ in members if not (method.gets_base and m == base)]
        if len(others) < method.min_models or (method.max_models and len(others) > method.max_models):
            wanted = f"exactly {method.max_models}" if method.min_models == method.max_models else f"at least {method.min_models}"
            problems.append(f"{where}: {method.name} merges {wanted} model(s) besides the base, got {len(others)}")
        for j, (model, params) in enumerate(members):
            problems += _check_settings(method, params, f"{where}[{j}].parameters", per_model_only=True)
            if not (method.gets_base and model == base):
                at = f"{where}[{j}] ({model})" if recipe.slices or j < len(recipe.models or []) else (
                    f"base_model ({model}): {method.name} merges it as one more model, as mergekit does (list it under `models` with its parameters, "
                    "or remove base_model)")
                problems += _missing_required(method, [params, slice_params, recipe.parameters], at, per_model=True)
            elif unread := [name for name in params if name in method.params]:
                log.warning("%s[%d].parameters (%s): the base model's own parameters are not read by %s, which merges the other models "
                            "against the base; they are ignored, as in mergekit", where, j, ", ".join(unread), method.name)
    return problems


def _combination_options_problems(params: Parameters, combination: Combination | None, name: str) -> list[str]:
    problems = []
    fields = CombinationOptions.model_fields
    try:
        CombinationOptions.model_validate(params)
    except ValidationError as err:
        for e in err.errors():
            where = f"parameters.{e['loc'][0]}"
            if e["type"] == "extra_forbidden":
                problems.append(f"{where}: unknown parameter of adapter merges; allowed: {', '.join(fields)}")
            else:
                problems.append(f"{where}: {e['input']!r} -> {e['msg']}")
    if combination is None:
        return problems
    for param in params:
        if param in fields and param not in combination.parameters:
            users = [n for n, c in COMBINATIONS.items() if param in c.parameters]
            problems.append(f"parameters.{param}: not used by {name}; remove it (it is read by {', '.join(users)})")
    problems += [f"parameters: {param} is required by {name} ({fields[param].description})" for param in combination.required if param not in params]
    return problems


def _adapter_model_problems(recipe: Recipe) -> list[str]:
    """Every model an adapter of one base (``BASE+ADAPTER``, or listed alone under ``base_model``), with one number as its weight."""
    models = recipe.models or []
    problems = [] if models or recipe.models is None else ["models: give at least one adapter"]
    base = recipe.base_model
    if base is not None and base.adapter:
        problems.append(f"base_model: {base} is an adapter; name the base model the adapters were trained on")
    for j, m in enumerate(models):
        ref = m.model
        if ref.adapter is None and recipe.base_model is None:
            problems.append(f"models[{j}].model: {ref} is not an adapter; with `output: adapter` write BASE+ADAPTER (the base model, then the adapter), "
                            "or set base_model and list the adapters alone")
        elif ref.adapter is not None:
            base = base or ModelRef(path=ref.path, revision=ref.revision)
            if (ref.path, ref.revision) != (base.path, base.revision):
                problems.append(f"models[{j}].model: its base {ref.key.partition('+')[0]} is not {base}; adapter merges need adapters of one base")
        for name in m.parameters:
            if name != "weight":
                problems.append(f"models[{j}].parameters.{name}: adapters take only `weight`; set {name} in the top-level `parameters`")
        weight = m.parameters.get("weight")
        if weight is None:
            problems.append(f"models[{j}].parameters.weight: required: a number, the adapter's share (negative subtracts it)")
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)):
            problems.append(f"models[{j}].parameters.weight: {weight!r} -> one number (gradients and filters do not apply to adapter merges)")
        elif not math.isfinite(weight):
            problems.append(f"models[{j}].parameters.weight: {weight!r} -> a finite number (not NaN or infinite), the adapter's share")
    return problems


def adapter_problems(recipe: Recipe) -> list[str]:
    """Every problem of an ``output: adapter`` recipe, each with its key path."""
    combination = COMBINATIONS.get(recipe.merge_method)
    problems = [] if combination else [
        f"merge_method: {recipe.merge_method!r} is not one of PEFT's combination types, which `output: adapter` uses: {', '.join(COMBINATIONS)}"
    ]
    for key in ("slices", "tokenizer_source", "tokenizer", "chat_template"):
        if getattr(recipe, key) is not None:
            problems.append(f"{key}: not used with `output: adapter`, which combines whole adapters (no layers, no tokenizer); remove it")
    if recipe.unsafe_truncate_embeddings:
        problems.append("unsafe_truncate_embeddings: not used with `output: adapter`, which combines whole adapters (no embeddings); remove it")
    return problems + _adapter_model_problems(recipe) + _combination_options_problems(recipe.parameters, combination, recipe.merge_method)
