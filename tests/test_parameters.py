"""Parameter values (gradients, steps, filter lists, precedence) and recipe validation.

Semantics from ../shared/merge-methods.md, "Recipe format" and "Parameter values".
"""
from __future__ import annotations

import pytest
import yaml

from merge_ops.errors import RecipeError
from merge_ops.parameters import NOT_SET, evaluate, interpolate, layer_position, lookup
from merge_ops.recipe import FilterEntry, Recipe
from merge_ops.recipe_file import parse_recipe

DOC_GRADIENT = [0, 0.5, 0.3, 0.7, 1]


# --- gradients ------------------------------------------------------------------------------------


def test_layer_position() -> None:
    assert layer_position(0, 40) == 0.0
    assert layer_position(39, 40) == 1.0
    assert layer_position(10, 40) == 10 / 39
    assert layer_position(0, 1) == 1.0  # a one-layer slice sits at t = 1


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        # t = 10/39, s = 4t = 40/39: i0 = 1, f = 1/39 -> (38/39)*0.5 + (1/39)*0.3 = 19.3/39 = 0.49487...
        (10, 19.3 / 39),
        # t = 20/39, s = 80/39: i0 = 2, f = 2/39 -> (37/39)*0.3 + (2/39)*0.7 = 12.5/39 = 0.32051...
        (20, 12.5 / 39),
        (39, 1.0),  # t = 1, s = 4: i0 = i1 = 4, f = 0
        (0, 0.0),
    ],
)
def test_doc_gradient_over_40_layers(layer: int, expected: float) -> None:
    value = interpolate(DOC_GRADIENT, layer_position(layer, 40))
    assert value == pytest.approx(expected, abs=1e-12)


def test_doc_gradient_rounded_values_from_the_docs() -> None:
    assert round(interpolate(DOC_GRADIENT, layer_position(10, 40)), 4) == 0.4949
    assert round(interpolate(DOC_GRADIENT, layer_position(20, 40)), 4) == 0.3205
    assert interpolate(DOC_GRADIENT, layer_position(39, 40)) == 1.0


def test_evaluate_scalars_and_gradients() -> None:
    assert evaluate(0.3, "model.layers.0.mlp.up_proj.weight", 0.7) == 0.3
    assert evaluate([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate([2.0], "x", 0.8) == 2.0  # a one-point gradient is a constant


def test_bool_and_string_lists_are_steps() -> None:
    # v[int(t * (len - 1))]: no interpolation between steps.
    assert interpolate([True, False], 0.0) is True
    assert interpolate([True, False], 0.99) is True  # int(0.99) = 0
    assert interpolate([True, False], 1.0) is False
    assert interpolate(["a", "b", "c"], 0.49) == "a"  # int(0.98) = 0
    assert interpolate(["a", "b", "c"], 0.5) == "b"  # int(1.0) = 1
    assert interpolate(["a", "b", "c"], 1.0) == "c"


# --- filter lists ---------------------------------------------------------------------------------

MLP = "model.layers.3.mlp.up_proj.weight"
ATTN = "model.layers.3.self_attn.q_proj.weight"
NORM = "model.norm.weight"


def entries(*pairs: tuple[str | None, object]) -> list[FilterEntry]:
    return [FilterEntry(filter=f, value=v) for f, v in pairs]


def test_filter_first_match_wins() -> None:
    value = entries(("layers", 1.0), ("mlp", 2.0), (None, 3.0))
    assert evaluate(value, MLP, 0.0) == 1.0  # "layers" matches first, although "mlp" matches too
    assert evaluate(value, NORM, 0.0) == 3.0


def test_filter_substring_star_and_missing_filter_match() -> None:
    assert evaluate(entries(("self_attn", 0.5), ("mlp", 0.2)), MLP, 0.0) == 0.2
    assert evaluate(entries(("self_attn", 0.5), ("*", 0.9)), MLP, 0.0) == 0.9
    assert evaluate(entries(("self_attn", 0.5), (None, 0.8)), MLP, 0.0) == 0.8
    assert evaluate(entries(("*", 0.9)), NORM, 0.0) == 0.9


def test_filter_value_can_be_a_gradient() -> None:
    assert evaluate(entries(("mlp", [0.0, 1.0]), (None, 5.0)), MLP, 0.25) == pytest.approx(0.25)


def test_filter_without_match_is_not_set() -> None:
    assert evaluate(entries(("self_attn", 0.5), ("mlp", 0.2)), NORM, 0.0) is NOT_SET


# --- precedence -----------------------------------------------------------------------------------


def test_precedence_source_over_slice_over_top_level() -> None:
    source, slice_, top = {"weight": 1.0}, {"weight": 2.0}, {"weight": 3.0}
    assert lookup("weight", [source, slice_, top], MLP, 0.0) == 1.0
    assert lookup("weight", [{}, slice_, top], MLP, 0.0) == 2.0
    assert lookup("weight", [{}, {}, top], MLP, 0.0) == 3.0
    assert lookup("weight", [{}, {}, {}], MLP, 0.0) is NOT_SET


def test_unmatched_filter_falls_through_to_the_next_level() -> None:
    source = {"density": entries(("self_attn", 0.1))}
    slice_ = {"density": entries(("mlp", 0.2))}
    top = {"density": [0.0, 1.0]}
    assert lookup("density", [source, slice_, top], ATTN, 0.5) == 0.1
    assert lookup("density", [source, slice_, top], MLP, 0.5) == 0.2
    assert lookup("density", [source, slice_, top], NORM, 0.5) == pytest.approx(0.5)  # the top-level gradient
    assert lookup("density", [source, slice_], NORM, 0.5) is NOT_SET


def test_parsed_recipe_values_evaluate() -> None:
    recipe = parse_recipe(
        {
            "merge_method": "linear",
            "models": [
                {"model": "org/a", "parameters": {"weight": [0, 0.3, 1]}},
                {"model": "org/b", "parameters": {"weight": [{"filter": "mlp", "value": [1, 0]}, {"value": 0.5}]}},
            ],
            "parameters": {"normalize": [True, False]},
        }
    )
    a, b = (m.parameters for m in recipe.models)
    assert lookup("weight", [a, {}, recipe.parameters], MLP, 0.5) == pytest.approx(0.3)
    assert lookup("weight", [b, {}, recipe.parameters], MLP, 0.25) == pytest.approx(0.75)
    assert lookup("weight", [b, {}, recipe.parameters], ATTN, 0.25) == 0.5
    assert lookup("normalize", [{}, recipe.parameters], MLP, 0.0) is True
    assert lookup("normalize", [{}, recipe.parameters], MLP, 1.0) is False


# --- recipe validation ----------------------------------------------------------------------------

# mergekit's own TIES example (docs), unchanged.
MERGEKIT_TIES = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def ties_recipe(**changes: object) -> dict:
    recipe = {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [
            {"model": "org/base"},
            {"model": "org/a", "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": "org/b", "parameters": {"weight": 0.5, "density": 0.7}},
        ],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }
    recipe.update(changes)
    return {k: v for k, v in recipe.items() if v is not None}


def problems_of(data: object) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    assert isinstance(info.value, ValueError)
    problems = info.value.problems  # the message lists every problem; a single one on one line
    assert str(info.value).count("\n  - ") == len(problems) if len(problems) > 1 else str(info.value) == f"recipe: {problems[0]}"
    return info.value.problems


def test_mergekit_ties_recipe_parses() -> None:
    recipe = parse_recipe(yaml.safe_load(MERGEKIT_TIES))
    assert isinstance(recipe, Recipe)
    assert recipe.merge_method == "ties" and recipe.dtype == "float16"
    assert str(recipe.base_model) == "TheBloke/Llama-2-13B-fp16"
    assert [str(m.model) for m in recipe.models] == [
        "psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B", "WizardLM/WizardMath-13B-V1.0"
    ]
    assert recipe.models[0].parameters["density"] == [1, 0.7, 0.1]
    assert isinstance(recipe.models[2].parameters["weight"][0], FilterEntry)


def test_base_model_listed_without_weight_is_fine() -> None:
    assert parse_recipe(ties_recipe()).models[0].parameters == {}


def test_density_out_of_range() -> None:
    [problem] = problems_of(ties_recipe(models=[{"model": "org/a", "parameters": {"weight": 1.0, "density": 1.5}}]))
    assert problem.startswith("models[0].parameters.density:")
    assert "1.5" in problem and "le 1.0" in problem


def test_density_out_of_range_inside_gradient_and_filter() -> None:
    [problem] = problems_of(ties_recipe(parameters={"density": [0.5, 1.5]}))
    assert problem.startswith("parameters.density:") and "1.5" in problem
    [problem] = problems_of(ties_recipe(parameters={"density": [{"filter": "mlp", "value": -0.5}, {"value": 0.5}]}))
    assert problem.startswith("parameters.density:") and "-0.5" in problem and "ge 0.0" in problem


def test_unknown_method_lists_the_known_ones() -> None:
    [problem] = problems_of(ties_recipe(merge_method="tiez"))
    assert problem.startswith("merge_method:") and "'tiez'" in problem
    assert "ties" in problem and "dare_ties" in problem and "slerp" in problem


def test_unknown_key() -> None:
    [problem] = problems_of(ties_recipe(merge_metod="ties"))
    assert problem.startswith("merge_metod:") and "unknown key" in problem


def test_unknown_key_names_the_allowed_keys() -> None:
    [problem] = problems_of(ties_recipe(merge_metod="ties"))
    assert "merge_method" in problem.removeprefix("merge_metod:")


def test_unknown_parameter_lists_the_allowed_ones() -> None:
    [problem] = problems_of(ties_recipe(parameters={"normalise": True}))
    assert problem.startswith("parameters.normalise:")
    assert "weight" in problem and "density" in problem and "normalize" in problem


def test_global_parameter_set_per_model() -> None:
    slerp = {
        "merge_method": "slerp",
        "base_model": "org/base",
        "models": [{"model": "org/base"}, {"model": "org/a", "parameters": {"t": 0.5}}],
    }
    problems = problems_of(slerp)
    # Both problems at once: t under a model, and t missing where it belongs.
    assert any(p.startswith("models[1].parameters.t:") and "global" in p and "top-level `parameters`" in p for p in problems)
    assert any(p.startswith("parameters:") and "t is required by slerp" in p for p in problems)
    assert len(problems) == 2


def test_missing_weight_for_ties() -> None:
    [problem] = problems_of(ties_recipe(models=[{"model": "org/base"}, {"model": "org/a", "parameters": {"density": 0.5}}]))
    assert problem.startswith("models[1] (org/a):") and "weight is required by ties" in problem


def test_weight_set_globally_is_enough() -> None:
    recipe = ties_recipe(models=[{"model": "org/a"}, {"model": "org/b"}], parameters={"weight": 0.5})
    assert parse_recipe(recipe).parameters["weight"] == 0.5


def test_missing_base_model_for_ties() -> None:
    models = [{"model": "org/a", "parameters": {"weight": 0.5}}, {"model": "org/b", "parameters": {"weight": 0.5}}]
    [problem] = problems_of(ties_recipe(base_model=None, models=models))
    assert problem.startswith("base_model:") and "ties needs a base_model" in problem


def test_bad_dtype() -> None:
    [problem] = problems_of(ties_recipe(dtype="float64"))
    assert problem.startswith("dtype:") and "'float64'" in problem
    assert "float32" in problem and "bfloat16" in problem and "float16" in problem


def test_slice_sources_of_different_lengths() -> None:
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "org/a", "layer_range": [0, 2]}, {"model": "org/b", "layer_range": [0, 3]}]}],
    }
    [problem] = problems_of(recipe)
    assert problem.startswith("slices[0]:") and "same number of layers" in problem and "[2, 3]" in problem


def test_bad_layer_range() -> None:
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": "org/a", "layer_range": [3, 2]}]}]}
    [problem] = problems_of(recipe)
    assert problem.startswith("slices[0].sources[0].layer_range:") and "[3, 2]" in problem and "start < end" in problem


def test_both_models_and_slices() -> None:
    [problem] = problems_of(ties_recipe(slices=[{"sources": [{"model": "org/a", "layer_range": [0, 2]}]}]))
    assert "exactly one of `models` or `slices`" in problem


def test_neither_models_nor_slices() -> None:
    [problem] = problems_of(ties_recipe(models=None))
    assert "exactly one of `models` or `slices`" in problem


@pytest.mark.parametrize(
    "model", ["org/a+org/lora", {"model": {"path": "org/a"}, "lora": {"path": "org/lora"}}], ids=["plus", "dict"]
)
def test_lora_references_parse_in_both_spellings(model: object) -> None:
    recipe = parse_recipe(ties_recipe(models=[{"model": model, "parameters": {"weight": 1.0}}]))
    ref = recipe.models[0].model  # type: ignore[index]
    assert (ref.key, ref.path, ref.adapter) == ("org/a+org/lora", "org/a", "org/lora")


def test_not_a_mapping() -> None:
    [problem] = problems_of(["merge_method", "ties"])
    assert "expected a mapping" in problem


def test_several_method_problems_are_reported_at_once() -> None:
    recipe = ties_recipe(
        base_model=None,
        models=[
            {"model": "org/a", "parameters": {"density": 1.5}},  # bad density and no weight
            {"model": "org/b", "parameters": {"weight": 1.0, "densty": 0.5}},  # unknown parameter
        ],
    )
    problems = problems_of(recipe)
    assert len(problems) == 4
    assert any(p.startswith("base_model:") for p in problems)
    assert any(p.startswith("models[0].parameters.density:") for p in problems)
    assert any(p.startswith("models[0] (org/a):") and "weight" in p for p in problems)
    assert any(p.startswith("models[1].parameters.densty:") for p in problems)


def test_several_schema_problems_are_reported_at_once() -> None:
    problems = problems_of(ties_recipe(dtype="float64", merge_metod="ties"))
    assert len(problems) == 2
    assert {p.split(":")[0] for p in problems} == {"dtype", "merge_metod"}


def test_schema_and_method_problems_are_reported_together() -> None:
    recipe = ties_recipe(dtype="float64", models=[{"model": "org/a", "parameters": {"weight": 1.0, "density": 1.5}}])
    problems = problems_of(recipe)
    assert any(p.startswith("dtype:") for p in problems)
    assert any(p.startswith("models[0].parameters.density:") for p in problems)
