"""nuslerp, multislerp and karcher against small reference computations in float64, their properties, and how
recipes give them their base and models.

The references below follow the formulas of ../shared/merge-methods.md ("Interpolation methods") written out per
vector in float64 (math.acos, explicit loops), independently of the methods' tensor code; bit-equality with
mergekit 0.1.5 is measured by bench/compare_mergekit.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_ops.engine import merge_model
from merge_ops.errors import RecipeError
from merge_ops.methods.registry import METHODS
from merge_ops.plan import plan_merge
from merge_ops.recipe_file import parse_recipe

T = torch.tensor


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def nuslerp(xs, base=None, weight=(1.0, 1.0), flatten=True, row_wise=False):
    return METHODS["nuslerp"](xs, base, weight=list(weight), nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)


def multislerp(xs, base=None, weight=None, normalize_weights=True, eps=1e-8):
    return METHODS["multislerp"](xs, base, weight=weight or [1.0] * len(xs), normalize_weights=normalize_weights, eps=eps)


def karcher(xs, max_iter=10, tol=1e-5):
    return METHODS["karcher"](xs, None, max_iter=max_iter, tol=tol)


# --- float64 references, one vector at a time -------------------------------------------------------


def slerp_reference(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Slerp of the un-normalised vectors a -> b (1-D, float64), lerp when parallel."""
    a, b = a.double(), b.double()
    cos = max(-1.0, min(1.0, float(a @ b) / (float(a.norm()) * float(b.norm()))))
    theta = math.acos(cos)
    if abs(math.sin(theta)) < 1e-8:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def multislerp_reference(xs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    vectors = [x.double().flatten() for x in xs]
    w = [wi / sum(weights) for wi in weights]
    units = [v / v.norm() for v in vectors]
    m = sum(wi * u for wi, u in zip(w, units, strict=True))
    m = m / m.norm()
    tangent = sum(wi * (u - float(u @ m) * m) for wi, u in zip(w, units, strict=True))
    length = float(tangent.norm())
    direction = m * math.cos(length) + tangent * (math.sin(length) / length)
    return (direction * sum(wi * float(v.norm()) for wi, v in zip(w, vectors, strict=True))).view_as(xs[0])


def karcher_gradient(direction: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    """Mean of the log maps log_u(u_i) at ``direction`` (float64): zero exactly at the Karcher mean."""
    u = direction.double().flatten() / direction.double().norm()
    total = torch.zeros_like(u)
    for x in xs:
        ui = x.double().flatten() / x.double().norm()
        cos = max(-1.0, min(1.0, float(u @ ui)))
        theta = math.acos(cos)
        if theta > 1e-12:
            total += theta / math.sin(theta) * (ui - cos * u)
    return total / len(xs)


# --- nuslerp ----------------------------------------------------------------------------------------


def test_nuslerp_matches_the_reference_slerp_at_t_from_the_weights() -> None:
    a, b = randn(4, 6, seed=0), randn(4, 6, seed=1)
    for weight in [(1.0, 1.0), (1.0, 0.5), (0.3, 0.7), (2.0, -0.5)]:
        t = weight[1] / sum(weight)
        expected = slerp_reference(t, a.flatten(), b.flatten()).view(4, 6)
        torch.testing.assert_close(nuslerp([a, b], weight=weight).double(), expected, rtol=1e-5, atol=1e-6)


def test_nuslerp_weights_set_only_the_ratio_and_cancelling_weights_give_the_midpoint() -> None:
    a, b = randn(3, 5, seed=2), randn(3, 5, seed=3)
    assert torch.equal(nuslerp([a, b], weight=(1.0, 3.0)), nuslerp([a, b], weight=(0.25, 0.75)))
    assert torch.equal(nuslerp([a, b], weight=(1.0, -1.0)), nuslerp([a, b], weight=(1.0, 1.0)))  # |w1 + w2| < 1e-6: t = 0.5


def test_nuslerp_endpoints_are_the_two_models() -> None:
    a, b = randn(3, 5, seed=4), randn(3, 5, seed=5)
    torch.testing.assert_close(nuslerp([a, b], weight=(1.0, 0.0)), a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nuslerp([a, b], weight=(0.0, 1.0)), b, rtol=1e-6, atol=1e-6)


def test_nuslerp_of_orthogonal_vectors_at_half_is_on_the_arc() -> None:
    out = nuslerp([T([2.0, 0.0]), T([0.0, 2.0])])
    torch.testing.assert_close(out, T([math.sqrt(2.0), math.sqrt(2.0)]))


def test_nuslerp_lerps_parallel_and_antiparallel_vectors() -> None:
    # parallel means |sin theta| <= 1e-8: in float32, a cosine that rounds to +-1
    a = T([1.0, -2.0, 0.5])
    assert torch.equal(nuslerp([a, 3 * a], weight=(0.75, 0.25)), 0.75 * a + 0.25 * (3 * a))
    e = T([0.0, -2.0, 0.0])
    assert torch.equal(nuslerp([e, -e], weight=(0.75, 0.25)), 0.75 * e + 0.25 * -e)


def test_nuslerp_flatten_row_and_column_vectors() -> None:
    a, b = randn(4, 6, seed=6), randn(4, 6, seed=7)
    rows = nuslerp([a, b], weight=(1.0, 0.5), flatten=False)
    columns = nuslerp([a, b], weight=(1.0, 0.5), flatten=False, row_wise=True)
    t = 0.5 / 1.5
    for i in range(4):  # default: one vector per row (the last dim)
        torch.testing.assert_close(rows[i].double(), slerp_reference(t, a[i], b[i]), rtol=1e-5, atol=1e-6)
    for j in range(6):  # nuslerp_row_wise (mergekit's name): vectors along dim 0, one per column
        torch.testing.assert_close(columns[:, j].double(), slerp_reference(t, a[:, j], b[:, j]), rtol=1e-5, atol=1e-6)
    flat = nuslerp([a, b], weight=(1.0, 0.5))
    assert not torch.allclose(rows, flat) and not torch.allclose(columns, flat)
    assert columns.is_contiguous()
    # a vector (norm weights, biases) is one vector whichever way
    v0, v1 = randn(7, seed=8), randn(7, seed=9)
    assert torch.equal(nuslerp([v0, v1], flatten=False), nuslerp([v0, v1], flatten=False, row_wise=True))


def test_nuslerp_with_a_base_slerps_the_task_vectors() -> None:
    base, a, b = randn(3, 4, seed=10), randn(3, 4, seed=11), randn(3, 4, seed=12)
    out = nuslerp([a, b], base, weight=(0.3, 0.7))
    expected = base.double() + slerp_reference(0.7, (a - base).flatten(), (b - base).flatten()).view(3, 4)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out, base + nuslerp([a - base, b - base], weight=(0.3, 0.7)))


# --- multislerp -------------------------------------------------------------------------------------


def test_multislerp_matches_the_reference() -> None:
    xs = [randn(5, 4, seed=s) for s in (20, 21, 22)]
    weights = [1.0, 0.5, 0.7]
    torch.testing.assert_close(multislerp(xs, weight=weights).double(), multislerp_reference(xs, weights), rtol=1e-5, atol=1e-6)


def test_multislerp_of_orthogonal_unit_vectors_is_the_normalised_mean() -> None:
    out = multislerp([T([1.0, 0.0, 0.0]), T([0.0, 1.0, 0.0])])
    torch.testing.assert_close(out, T([1.0, 1.0, 0.0]) / math.sqrt(2.0))


def test_multislerp_of_copies_is_the_copy_and_without_normalizing_scales_by_the_weight_sum() -> None:
    x = randn(3, 4, seed=23)
    torch.testing.assert_close(multislerp([x.clone(), x.clone(), x.clone()], weight=[0.2, 0.5, 0.3]), x)
    torch.testing.assert_close(multislerp([x.clone(), x.clone()], weight=[1.0, 1.0], normalize_weights=False), 2 * x)


def test_multislerp_one_model_is_returned_as_it_is() -> None:
    x, base = randn(2, 3, seed=24), randn(2, 3, seed=25)
    assert multislerp([x], base) is x


def test_multislerp_with_a_base_works_on_the_task_vectors() -> None:
    base = randn(4, 4, seed=26)
    xs = [base + randn(4, 4, seed=s) for s in (27, 28)]
    expected = base.double() + multislerp_reference([x - base for x in xs], [0.4, 0.6])
    torch.testing.assert_close(multislerp(xs, base, weight=[0.4, 0.6]).double(), expected, rtol=1e-5, atol=1e-6)


def test_multislerp_cancelling_directions_lerp_two_models_and_refuse_more() -> None:
    x = T([1.0, -2.0, 3.0])
    torch.testing.assert_close(multislerp([x, -x], weight=[1.0, 1.0]), torch.zeros(3))
    torch.testing.assert_close(multislerp([x, -x], weight=[1.0, 1.0], normalize_weights=False), torch.zeros(3))
    with pytest.raises(ValueError, match="cancel out"):
        multislerp([x, -x, torch.zeros(3)])


# --- karcher ----------------------------------------------------------------------------------------


def test_karcher_of_copies_is_the_copy_and_one_model_is_itself() -> None:
    x = randn(4, 5, seed=30)
    torch.testing.assert_close(karcher([x.clone() for _ in range(3)]), x)
    assert karcher([x]) is x


def test_karcher_of_two_is_the_slerp_midpoint_scaled_to_the_mean_norm() -> None:
    a, b = randn(6, seed=31), 3 * randn(6, seed=32)
    direction = slerp_reference(0.5, a / a.norm(), b / b.norm())
    expected = direction / direction.norm() * (a.double().norm() + b.double().norm()) / 2
    torch.testing.assert_close(karcher([a, b]).double(), expected, rtol=1e-5, atol=1e-6)


def test_karcher_converges_to_the_point_where_the_mean_log_map_vanishes() -> None:
    xs = [randn(8, seed=s) * (s - 32) for s in (33, 34, 35, 36)]
    out = karcher(xs, max_iter=50, tol=1e-7)
    start = karcher(xs, max_iter=0)  # the normalised mean of the directions, before any step
    assert karcher_gradient(out, xs).norm() < 1e-5 < karcher_gradient(start, xs).norm()
    mean_norm = sum(x.double().norm() for x in xs) / len(xs)
    torch.testing.assert_close(out.double().norm(), mean_norm, rtol=1e-5, atol=0)


def test_karcher_zero_vectors_count_in_the_norm_only() -> None:
    x = T([3.0, 4.0])
    torch.testing.assert_close(karcher([x, torch.zeros(2)]), x / 2)
    assert torch.equal(karcher([torch.zeros(2), torch.full((2,), 1e-7)]), torch.zeros(2))


# --- recipes: base handling and model counts --------------------------------------------------------


def model(family: dict[str, Path], key: str, weight: float | None = None) -> dict:
    return {"model": str(family[key]), **({"parameters": {"weight": weight}} if weight is not None else {})}


def test_nuslerp_needs_exactly_two_models_besides_the_base(family: dict[str, Path]) -> None:
    three = {"merge_method": "nuslerp", "models": [model(family, k, 1.0) for k in ("ft_a", "ft_b", "ft_neg")]}
    with pytest.raises(RecipeError, match=r"models: nuslerp merges exactly 2 model\(s\) besides the base, got 3"):
        parse_recipe(three)
    base_listed = {"merge_method": "nuslerp", "base_model": str(family["base"]), "models": [model(family, k, 1.0) for k in ("base", "ft_a")]}
    with pytest.raises(RecipeError, match=r"besides the base, got 1"):
        parse_recipe(base_listed)
    with pytest.raises(RecipeError, match="weight is required by nuslerp"):
        parse_recipe({"merge_method": "nuslerp", "models": [model(family, "ft_a"), model(family, "ft_b")]})
    with pytest.raises(RecipeError, match="max_iter"):
        parse_recipe({"merge_method": "karcher", "models": [model(family, "ft_a")], "parameters": {"max_iter": -1}})


def test_optional_base_is_passed_apart_and_karcher_merges_the_base_as_a_model_in_recipe_order(family: dict[str, Path]) -> None:
    def first_job(recipe: dict):
        return plan_merge(parse_recipe(recipe)).shards[0].tensors[0]

    base, a, b = (str(family[k]) for k in ("base", "ft_a", "ft_b"))
    nu = first_job({"merge_method": "multislerp", "base_model": base, "models": [model(family, "ft_a", 1.0), model(family, "ft_b", 0.5)]})
    assert (nu.base.model if nu.base else None, [s.model for s in nu.inputs], nu.params["weight"]) == (base, [a, b], [1.0, 0.5])
    unlisted = first_job({"merge_method": "karcher", "base_model": base, "models": [model(family, "ft_a"), model(family, "ft_b")]})
    assert unlisted.base is None and [s.model for s in unlisted.inputs] == [a, b, base]  # appended, as mergekit does
    listed = first_job({"merge_method": "karcher", "base_model": base, "models": [model(family, k) for k in ("ft_b", "base", "ft_a")]})
    assert listed.base is None and [s.model for s in listed.inputs] == [b, base, a]


@pytest.mark.parametrize(
    ("method", "with_base", "members", "params"),
    [
        ("nuslerp", False, [("ft_a", 1.0), ("ft_b", 0.5)], {"nuslerp_flatten": False}),
        ("nuslerp", True, [("ft_a", 0.3), ("ft_b", 0.7)], {}),
        ("multislerp", True, [("ft_a", 1.0), ("ft_b", 0.5), ("ft_neg", 0.7)], {}),
        ("karcher", True, [("ft_a", None), ("ft_b", None)], {"max_iter": 3}),
    ],
    ids=["nuslerp-rows", "nuslerp-base", "multislerp-base", "karcher-base"],
)
def test_merged_model_is_the_method_applied_to_each_tensor(
    method: str, with_base: bool, members: list, params: dict, family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = {"merge_method": method, "models": [model(family, k, w) for k, w in members], "parameters": params}
    merge_model(plan_merge(parse_recipe({**recipe, "base_model": str(family["base"])} if with_base else recipe)), tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    state = {k: load_file(family[k] / "model.safetensors") for k in ("base", "ft_a", "ft_b", "ft_neg")}
    m = METHODS[method]
    inputs = [k for k, _ in members] + (["base"] if with_base and not m.gets_base else [])  # karcher: the base is a model
    kwargs = {p.arg: p.default for p in m.params.values() if not p.required} | params
    if "weight" in m.params:
        kwargs["weight"] = [w for _, w in members]
    for name, tensor in out.items():
        expected = m([state[k][name] for k in inputs], state["base"][name] if with_base and m.gets_base else None, **kwargs)
        assert torch.equal(tensor, expected), name
