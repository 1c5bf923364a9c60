"""Recipe variants (params.yaml `merge:` overrides) and the DVC stages' params sections."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from merge_ops.errors import RecipeError
from merge_ops.recipe_variants import vary_recipe
from mergeflow.errors import ParamsError
from mergeflow.params import HubParams, MergeParams, PublishParams

REPO = Path(__file__).resolve().parents[1]
TIES = yaml.safe_load((REPO / "recipes" / "skills-ties.yaml").read_text())


def test_a_parameter_override_replaces_every_per_model_value() -> None:
    variant = vary_recipe(TIES, parameters={"density": 0.3})
    assert variant.data["parameters"] == {"lambda": 1.2, "density": 0.3}
    assert all("density" not in m["parameters"] and m["parameters"]["weight"] == 1.0 for m in variant.data["models"])
    assert variant.recipe.parameters["density"] == 0.3
    assert TIES["models"][0]["parameters"]["density"] == 0.5  # the input is not modified


def test_switching_method_drops_what_the_new_method_does_not_take() -> None:
    variant = vary_recipe(TIES, method="task_arithmetic")
    assert variant.data["merge_method"] == "task_arithmetic" and variant.dropped == ["density"]
    assert variant.recipe.merge_method == "task_arithmetic"
    assert yaml.safe_load(variant.yaml()) == variant.data


def test_bad_overrides_say_what_is_wrong() -> None:
    with pytest.raises(RecipeError, match="density: not a parameter of task_arithmetic; its parameters: weight, lambda"):
        vary_recipe(TIES, method="task_arithmetic", parameters={"density": 0.5})
    with pytest.raises(RecipeError, match="nope"):
        vary_recipe(TIES, method="nope")
    with pytest.raises(RecipeError, match="density"):
        vary_recipe(TIES, parameters={"density": 1.5})  # outside [0, 1]


def test_params_sections(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "merge": {"recipe": "recipes/skills-ties.yaml", "method": "dare_ties", "parameters": {"density": 0.7}, "shard_size": "2GiB"},
        "hub": {"endpoint": "local"},
        "publish": {"repo": None},
    }))
    merge = MergeParams.from_params(params)
    assert merge.shard_size == 2 * 2**30 and merge.method == "dare_ties" and merge.parameters == {"density": 0.7}
    assert HubParams.from_params(params).is_local and PublishParams.from_params(params).repo is None

    params.write_text(yaml.safe_dump({"merge": {"recipe": "r.yaml", "shard_size": "big", "extra": 1}}))
    with pytest.raises(ParamsError) as err:
        MergeParams.from_params(params)
    assert "merge.shard_size" in str(err.value) and "'big' is not a size" in str(err.value) and "merge.extra" in str(err.value)


def test_project_params_are_valid() -> None:
    merge = MergeParams.from_params(REPO / "params.yaml")
    assert (REPO / merge.recipe).is_file()
    vary_recipe(yaml.safe_load((REPO / merge.recipe).read_text()), method=merge.method, parameters=merge.parameters)
