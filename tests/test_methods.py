"""Unit tests of every merge method on small tensors, against values computed by hand.

Expected numbers follow ../shared/merge-methods.md (mergekit semantics). Each method is called
through the registry the way the engine calls it: per-model parameters as lists aligned with
``tensors``, the recipe's ``lambda`` as ``lambda_``, random methods with a seeded generator.
Most hand examples use small integers or dyadic fractions, so float32 arithmetic is exact and the
comparisons can be exact too.
"""
from __future__ import annotations

import math

import pytest
import torch
from method_cases import NAMES, call_kwargs, model_count, names_where, uses_base

from merge_ops.methods import sparsify
from merge_ops.methods.registry import METHODS

T = torch.tensor


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Thin wrappers that spell out every parameter, with the spec's defaults (merge-methods.md table).
def linear(xs, weight, normalize=True):
    return METHODS["linear"](xs, None, weight=weight, normalize=normalize)


def slerp(base, other, t):
    return METHODS["slerp"]([other], base, t=t)


def task_arithmetic(xs, base, weight, lambda_=1.0, normalize=False):
    return METHODS["task_arithmetic"](xs, base, weight=weight, lambda_=lambda_, normalize=normalize, int8_mask=False)


def ties(xs, base, weight, density=None, lambda_=1.0, normalize=True, rescale=False):
    density = density or [1.0] * len(xs)
    return METHODS["ties"](
        xs, base, weight=weight, density=density, lambda_=lambda_, normalize=normalize, rescale=rescale, int8_mask=False
    )


def dare(name, xs, base, weight, density=None, seed=0, lambda_=1.0, normalize=False, rescale=True):
    density = density or [1.0] * len(xs)
    return METHODS[name](
        xs, base, generator=gen(seed), weight=weight, density=density, lambda_=lambda_,
        normalize=normalize, rescale=rescale, int8_mask=False,
    )


def breadcrumbs(name, xs, base, weight, density, gamma, lambda_=1.0, normalize=False, rescale=False):
    extra = {"int8_mask": False} if name == "breadcrumbs_ties" else {}
    return METHODS[name](
        xs, base, weight=weight, density=density, gamma=gamma, lambda_=lambda_, normalize=normalize, rescale=rescale, **extra
    )


def della(name, xs, base, weight, density, epsilon, seed=0, lambda_=1.0, normalize=None, rescale=True):
    normalize = (name == "della") if normalize is None else normalize
    extra = {"int8_mask": False} if name == "della" else {}
    return METHODS[name](
        xs, base, generator=gen(seed), weight=weight, density=density, epsilon=epsilon, lambda_=lambda_,
        normalize=normalize, rescale=rescale, **extra,
    )


# --- declarations ---------------------------------------------------------------------------------

SPEC_DEFAULTS = {  # merge-methods.md, task-arithmetic family table: (normalize, rescale)
    "task_arithmetic": (False, None),
    "ties": (True, False),
    "dare_ties": (False, True),
    "dare_linear": (False, True),
    "breadcrumbs": (False, False),
    "breadcrumbs_ties": (False, False),
    "della": (True, True),
    "della_linear": (False, True),
}


@pytest.mark.parametrize("name", sorted(SPEC_DEFAULTS))
def test_task_arithmetic_family_declares_the_spec_defaults(name: str) -> None:
    params = METHODS[name].params
    normalize, rescale = SPEC_DEFAULTS[name]
    assert params["normalize"].default is normalize
    if rescale is not None:
        assert params["rescale"].default is rescale
    assert params["lambda"].arg == "lambda_" and params["lambda"].default == 1.0
    assert params["weight"].per_model and params["weight"].required
    assert METHODS[name].base == "required"


# --- linear ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_one_hot_weights_return_that_source_exactly(normalize: bool) -> None:
    a, b = T([1.5, -2.0, 3.25]), T([7.0, 8.0, -9.0])
    # 1*a + 0*b (divided by 1 when normalizing) is a, bit for bit.
    assert torch.equal(linear([a, b], [1.0, 0.0], normalize), a)
    assert torch.equal(linear([a, b], [0.0, 1.0], normalize), b)


def test_linear_normalize_on_and_off() -> None:
    a, b = T([1.0, 2.0]), T([3.0, 6.0])
    # 1*[1, 2] + 3*[3, 6] = [10, 20]; normalized by 1 + 3 = 4 -> [2.5, 5].
    assert torch.equal(linear([a, b], [1.0, 3.0], normalize=False), T([10.0, 20.0]))
    assert torch.equal(linear([a, b], [1.0, 3.0], normalize=True), T([2.5, 5.0]))


# --- slerp ----------------------------------------------------------------------------------------


def test_slerp_t0_is_the_base_exactly_and_t1_the_other() -> None:
    g = gen(1)
    base, other = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    assert torch.equal(slerp(base, other, 0.0), base)
    torch.testing.assert_close(slerp(base, other, 1.0), other, atol=1e-6, rtol=0)


def test_slerp_of_orthogonal_vectors_at_half() -> None:
    # v0 = (2, 0), v1 = (0, 1): theta = pi/2, sin(theta) = 1, s0 = s1 = sin(pi/4) = sqrt(2)/2, applied to the
    # un-normalised vectors: (2 * sqrt(2)/2, 1 * sqrt(2)/2) = (sqrt 2, sqrt(2)/2).
    out = slerp(T([2.0, 0.0]), T([0.0, 1.0]), 0.5)
    torch.testing.assert_close(out, T([math.sqrt(2), math.sqrt(2) / 2]))
    # t = 1/3: s0 = sin(pi/3) = sqrt(3)/2, s1 = sin(pi/6) = 1/2 -> (sqrt 3, 1/2).
    out = slerp(T([2.0, 0.0]), T([0.0, 1.0]), 1 / 3)
    torch.testing.assert_close(out, T([math.sqrt(3), 0.5]))


def test_slerp_treats_the_whole_tensor_as_one_vector() -> None:
    # Flattened, [1, 0, 0, 0] and [0, 0, 0, 1] are orthogonal: both get sqrt(2)/2 at t = 0.5.
    # (Row-wise slerp would see a zero row and give something else.)
    out = slerp(T([[1.0, 0.0], [0.0, 0.0]]), T([[0.0, 0.0], [0.0, 1.0]]), 0.5)
    h = math.sqrt(2) / 2
    torch.testing.assert_close(out, T([[h, 0.0], [0.0, h]]))


def test_slerp_falls_back_to_lerp_for_parallel_vectors() -> None:
    # dot of the unit vectors = 1 > 0.9995 -> (1 - t) v0 + t v1 = 0.75 (1, 2) + 0.25 (2, 4) = (1.25, 2.5).
    assert torch.equal(slerp(T([1.0, 2.0]), T([2.0, 4.0]), 0.25), T([1.25, 2.5]))


def test_slerp_antiparallel_vectors_lerp_without_flipping() -> None:
    # dot = -1: |dot| > 0.9995 -> lerp with no antipodal flip: 0.75 (1, 0) + 0.25 (-2, 0) = (0.25, 0).
    assert torch.equal(slerp(T([1.0, 0.0]), T([-2.0, 0.0]), 0.25), T([0.25, 0.0]))


# --- task arithmetic ------------------------------------------------------------------------------

BASE3 = T([1.0, 1.0, 1.0])
X3 = [T([2.0, 0.0, 1.0]), T([1.0, 3.0, -1.0])]  # deltas d1 = [1, -1, 0], d2 = [0, 2, -2]


def test_task_arithmetic_small_example() -> None:
    # 0.5 d1 + 2 d2 = [0.5, -0.5, 0] + [0, 4, -4] = [0.5, 3.5, -4]; base + that = [1.5, 4.5, -3].
    assert torch.equal(task_arithmetic(X3, BASE3, [0.5, 2.0]), T([1.5, 4.5, -3.0]))
    # lambda 0.5 halves the mix: base + [0.25, 1.75, -2] = [1.25, 2.75, -1].
    assert torch.equal(task_arithmetic(X3, BASE3, [0.5, 2.0], lambda_=0.5), T([1.25, 2.75, -1.0]))
    # normalize divides by 0.5 + 2 = 2.5: [0.2, 1.4, -1.6] -> [1.2, 2.4, -0.6].
    torch.testing.assert_close(task_arithmetic(X3, BASE3, [0.5, 2.0], normalize=True), T([1.2, 2.4, -0.6]))


def test_task_arithmetic_without_models_returns_the_base() -> None:
    assert torch.equal(task_arithmetic([], BASE3, []), BASE3)


# --- ties -----------------------------------------------------------------------------------------

# Two models with no sign conflict; model 1 has a zero delta in the last element.
BASE4 = T([1.0, -1.0, 0.5, 2.0])
D_AGREE = [T([2.0, -1.0, 0.5, 4.0]), T([1.0, -3.0, 1.5, 0.0])]
X_AGREE = [BASE4 + d for d in D_AGREE]


def test_ties_density_1_without_conflicts_and_normalize_false_is_task_arithmetic() -> None:
    # No conflicts: every nonzero w_i d_i agrees with the vote, so sum_i w_i d_i mask_i = sum_i w_i d_i,
    # zero deltas included (they add 0 either way).
    w = [0.5, 2.0]
    assert torch.equal(ties(X_AGREE, BASE4, w, normalize=False), task_arithmetic(X_AGREE, BASE4, w))


def test_ties_normalize_divides_by_the_agreeing_weights_only() -> None:
    w = [0.5, 2.0]
    # Elements 0-2: both deltas nonzero and agree -> divisor 2.5, same as task_arithmetic(normalize=True).
    # Element 3: only model 0 (delta 4, weight 0.5) is nonzero -> ties gives 0.5*4/0.5 = 4, task arithmetic
    # gives 0.5*4/2.5 = 0.8.
    got = ties(X_AGREE, BASE4, w)
    ta = task_arithmetic(X_AGREE, BASE4, w, normalize=True)
    torch.testing.assert_close(got[:3], ta[:3])
    assert got[3].item() == pytest.approx(2.0 + 4.0)
    assert ta[3].item() == pytest.approx(2.0 + 0.8)


def test_ties_equals_normalized_task_arithmetic_when_all_deltas_are_nonzero_and_agree() -> None:
    d = [T([2.0, -1.0, 0.5, 4.0]), T([1.0, -3.0, 1.5, 0.5])]
    xs = [BASE4 + x for x in d]
    torch.testing.assert_close(ties(xs, BASE4, [0.5, 2.0]), task_arithmetic(xs, BASE4, [0.5, 2.0], normalize=True))


# Sign election with conflicts. base = [1, 2, 3, 4, 5], weights [1, 3]:
#   d1  = [ 2, -1,  3, 0,  4]        w1 d1 = [ 2, -1,  3, 0,  4]
#   d2  = [-1,  1, -1, 2, -2]        w2 d2 = [-3,  3, -3, 6, -6]
#   sum of weighted deltas             = [-1,  2,  0, 6, -2]  -> majority [-, +, + (zero sum), +, -]
# Element 0: the UNweighted sum 2 - 1 = +1 would elect +; weighted elects -: only model 2 agrees.
# Element 2: zero sum counts as +: only model 1 (3) agrees.
# Element 3: model 1's delta is 0 (sign 0), it is not in the mask nor in the divisor.
# Element 4: unweighted 4 - 2 = +2 would elect +; weighted elects -: only model 2 agrees.
#   mixed   = [-3, 3, 3, 6, -6];  divisor = [3, 3, 1, 3, 3]
#   normalize:  mixed / divisor = [-1, 1, 3, 2, -2] -> base + = [0, 3, 6, 6, 3]
#   no normalize:                                    -> base + mixed = [-2, 5, 6, 10, -1]
BASE5 = T([1.0, 2.0, 3.0, 4.0, 5.0])
X_CONFLICT = [BASE5 + T([2.0, -1.0, 3.0, 0.0, 4.0]), BASE5 + T([-1.0, 1.0, -1.0, 2.0, -2.0])]
W_CONFLICT = [1.0, 3.0]


def test_ties_sign_election_weights_votes_and_drops_zeros() -> None:
    assert torch.equal(ties(X_CONFLICT, BASE5, W_CONFLICT), T([0.0, 3.0, 6.0, 6.0, 3.0]))
    assert torch.equal(ties(X_CONFLICT, BASE5, W_CONFLICT, normalize=False), T([-2.0, 5.0, 6.0, 10.0, -1.0]))
    # lambda scales the merged delta: base + 0.5 * [-1, 1, 3, 2, -2].
    assert torch.equal(ties(X_CONFLICT, BASE5, W_CONFLICT, lambda_=0.5), T([0.5, 2.5, 4.5, 5.0, 4.0]))


def test_ties_trimmed_entries_leave_vote_and_divisor() -> None:
    # density 0.5 of 4 elements keeps k = 2 per model:
    #   d1 = [4, 0.5, -3, 1]   -> keeps 4, -3            -> [4, 0, -3, 0]
    #   d2 = [1, 2, -1, -0.25] -> keeps 2, then one of the tied |1| at 0 and 2: the lower index -> [1, 2, 0, 0]
    # weights [1, 1]: sums [5, 2, -3, 0] -> majority [+, +, -, + (zero)]
    #   element 0: both agree, (4 + 1)/2 = 2.5;  element 1: only model 2 (model 1 pruned): 2/1 = 2
    #   element 2: only model 1: -3/1 = -3;      element 3: nobody, divisor 0 -> 1, mixed 0
    base = T([0.0, 1.0, 2.0, 3.0])
    xs = [base + T([4.0, 0.5, -3.0, 1.0]), base + T([1.0, 2.0, -1.0, -0.25])]
    got = ties(xs, base, [1.0, 1.0], density=[0.5, 0.5])
    assert torch.equal(got, base + T([2.5, 2.0, -3.0, 0.0]))


def test_ties_rescale_restores_the_l1_norm_of_the_trimmed_delta() -> None:
    # d = [4, -2, 1, 1]; density 0.5 keeps [4, -2, 0, 0] (L1 6), rescaled by 8/6 -> [16/3, -8/3, 0, 0].
    base = T([0.0, 0.0, 0.0, 0.0])
    got = ties([T([4.0, -2.0, 1.0, 1.0])], base, [1.0], density=[0.5], rescale=True)
    torch.testing.assert_close(got, T([16 / 3, -8 / 3, 0.0, 0.0]))


# --- magnitude trimming ---------------------------------------------------------------------------


def test_magnitude_keeps_exactly_k_with_ties_broken_toward_the_lower_index() -> None:
    # k = int(0.5 * 6) = 3: |-3| first, then two of the three |2| at flat indices 0, 3, 4 -> 0 and 3.
    d = T([2.0, -3.0, 1.0, 2.0, -2.0, 0.5])
    assert torch.equal(sparsify.sparsified(sparsify.Magnitude(0.5), d), T([2.0, -3.0, 0.0, 2.0, 0.0, 0.0]))
    # The same on a 2-D tensor: the order is the flat (row-major) index.
    assert torch.equal(sparsify.sparsified(sparsify.Magnitude(0.5), d.view(2, 3)), T([[2.0, -3.0, 0.0], [2.0, 0.0, 0.0]]))


def test_magnitude_k_is_the_floor_of_density_times_numel() -> None:
    d = T([6.0, -5.0, 4.0, -3.0, 2.0, -1.0])
    # int(0.34 * 6) = int(2.04) = 2 -> the two largest.
    assert torch.equal(sparsify.sparsified(sparsify.Magnitude(0.34), d), T([6.0, -5.0, 0.0, 0.0, 0.0, 0.0]))
    # int(0.99 * 6) = 5 -> everything but the smallest.
    assert torch.equal(sparsify.sparsified(sparsify.Magnitude(0.99), d), T([6.0, -5.0, 4.0, -3.0, 2.0, 0.0]))
    assert torch.equal(sparsify.sparsified(sparsify.Magnitude(1.0), d), d)


def test_magnitude_keeps_at_least_one_entry_and_none_at_density_zero() -> None:
    # int(0.1 * 6) = 0: mergekit keeps max(1, k) entries, so the largest one; density 0 keeps nothing.
    x = T([1.0, -6.0, 3.0, 4.0, 5.0, 2.0])
    assert torch.equal(sparsify.sparsified(sparsify.Magnitude(0.1), x), T([0.0, -6.0, 0.0, 0.0, 0.0, 0.0]))
    assert torch.equal(sparsify.sparsified(sparsify.Magnitude(0.0), x), torch.zeros(6))


# --- DARE -----------------------------------------------------------------------------------------


def test_dare_linear_at_density_1_is_task_arithmetic() -> None:
    # density 1 keeps every entry; the L1 rescale ratio is then exactly 1.
    assert torch.equal(dare("dare_linear", X_CONFLICT, BASE5, W_CONFLICT), task_arithmetic(X_CONFLICT, BASE5, W_CONFLICT))


def test_dare_ties_at_density_1_is_ties_consensus_without_normalize() -> None:
    got = dare("dare_ties", X_CONFLICT, BASE5, W_CONFLICT)
    # dare_ties defaults to normalize=False: base + mixed from the sign-election example.
    assert torch.equal(got, T([-2.0, 5.0, 6.0, 10.0, -1.0]))
    assert torch.equal(got, ties(X_CONFLICT, BASE5, W_CONFLICT, normalize=False))
    # Without conflicts the consensus changes nothing: plain task arithmetic.
    assert torch.equal(dare("dare_ties", X_AGREE, BASE4, [0.5, 2.0]), task_arithmetic(X_AGREE, BASE4, [0.5, 2.0]))


def test_dare_keeps_about_density_of_the_entries() -> None:
    # 20,000 Bernoulli(0.3) draws: std of the kept fraction = sqrt(0.3 * 0.7 / 20000) ~ 0.0032; allow 0.02 (> 6 sd).
    delta = torch.ones(100, 200)
    kept = sparsify.sparsified(sparsify.RandomDrop(0.3, 3), delta)
    assert abs((kept != 0).float().mean().item() - 0.3) < 0.02
    base = torch.zeros(100, 200)
    out = dare("dare_linear", [base + delta], base, [1.0], density=[0.3], seed=3, rescale=False)
    assert abs((out != 0).float().mean().item() - 0.3) < 0.02


def test_dare_masks_are_a_function_of_seed_and_entry_index() -> None:
    blocks = 1 << 20
    whole = sparsify.hashed_uniform(11, blocks, blocks)
    # The second block of a stream is the same whether or not the first one was drawn, and any range is a slice.
    assert torch.equal(sparsify.hashed_uniform(11, blocks, 1000), whole[:1000])
    assert torch.equal(sparsify.hashed_uniform(11, blocks + 7, 99), whole[7:106])
    assert torch.equal(sparsify.hashed_uniform(11, blocks - 5, 10)[5:], whole[:5])
    assert sparsify.hashed_uniform(11, 3, 0).numel() == 0
    assert not torch.equal(sparsify.hashed_uniform(12, blocks, blocks), whole)
    assert not torch.equal(sparsify.hashed_uniform(11, 0, blocks), whole)
    # Uniform over int32: each of 16 equal ranges holds 1/16 of the values (std ~ 0.0003 here; allow 0.003).
    bins = torch.histc(whole.double(), bins=16, min=-(2.0**31), max=2.0**31 - 1) / blocks
    assert (bins - 1 / 16).abs().max() < 0.003
    # Masks of two models (two seeds) are independent: P(both kept) ~ 0.5 * 0.5.
    a, b = sparsify.hashed_uniform(1, 0, blocks) < 0, sparsify.hashed_uniform(2, 0, blocks) < 0
    assert abs((a & b).double().mean().item() - 0.25) < 0.003


def test_dare_rescale_preserves_the_l1_norm_of_each_delta() -> None:
    g = gen(5)
    base = torch.randn(40, 50, generator=g)
    deltas = [torch.randn(40, 50, generator=g), 3 * torch.randn(40, 50, generator=g)]
    for i, d in enumerate(deltas):
        out = dare("dare_linear", [base + d], base, [1.0], density=[0.4], seed=i)
        merged = out - base
        torch.testing.assert_close(merged.abs().sum(), d.abs().sum(), rtol=1e-4, atol=0)
        # Kept entries are all scaled by the same factor ||d||_1 / ||masked||_1, not by 1/density.
        mask = merged != 0
        masked_l1 = d[mask].abs().sum()
        torch.testing.assert_close(merged[mask], d[mask] * (d.abs().sum() / masked_l1), rtol=1e-4, atol=1e-5)


SAMPLES_ONLY_LARGE = {"arcee_fusion"}
"""Random only above a size (its quartiles come from a sample of tensors over 1e6 entries; test_fusion_methods.py)."""


@pytest.mark.parametrize("name", NAMES)
def test_reruns_are_bit_identical_and_random_methods_follow_the_seed(name: str) -> None:
    g = gen(9)
    base = torch.randn(8, 16, generator=g)
    xs = [base + torch.randn(8, 16, generator=g) for _ in range(model_count(name))]

    def run(seed: int) -> torch.Tensor:
        inputs, base_in = [x.clone() for x in xs], base.clone() if uses_base(name) else None
        return METHODS[name](inputs, base_in, **call_kwargs(name, len(xs), seed=seed, sparse=True))

    assert torch.equal(run(7), run(7))
    if METHODS[name].random and name not in SAMPLES_ONLY_LARGE:  # the generator seed decides the masks
        assert not torch.equal(run(7), run(8))


# --- breadcrumbs ----------------------------------------------------------------------------------

# |d| sorted ascending: 1 2 3 4 5 6 7 8 9 10 (each at a distinct position).
BASE10 = torch.arange(10, dtype=torch.float32)
D10 = T([5.0, -1.0, 10.0, -7.0, 3.0, -2.0, 8.0, -4.0, 6.0, -9.0])


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_drops_the_smallest_and_the_largest(name: str) -> None:
    # n = 10, density 0.5 -> target 5, gamma 0.1 -> n_top = 1, n_bot = 10 - 5 - 1 = 4:
    # drop |1|..|4| and |10|, keep |5|..|9|.
    got = breadcrumbs(name, [BASE10 + D10], BASE10, [1.0], density=[0.5], gamma=[0.1])
    assert torch.equal(got - BASE10, T([5.0, 0.0, 0.0, -7.0, 0.0, 0.0, 8.0, 0.0, 6.0, -9.0]))


def test_breadcrumbs_with_no_top_outliers_keeps_up_to_the_largest() -> None:
    # gamma 0.05: int(0.05 * 10) = 0 -> n_top 0, n_bot 5: keep |6|..|10| (mergekit's [n_bot:-0] would keep nothing).
    got = breadcrumbs("breadcrumbs", [BASE10 + D10], BASE10, [1.0], density=[0.5], gamma=[0.05])
    assert torch.equal(got - BASE10, T([0.0, 0.0, 10.0, -7.0, 0.0, 0.0, 8.0, 0.0, 6.0, -9.0]))
    assert torch.equal(sparsify.sparsified(sparsify.WholeTensor(sparsify.magnitude_outliers(0.5, 0.0)), D10), got - BASE10)


def test_breadcrumbs_gives_back_top_outliers_to_reach_the_density() -> None:
    # density 0.95 -> target 9, gamma 0.2 -> n_top 2, n_bot = 10 - 9 - 2 = -1 -> n_top 1, n_bot 0:
    # only the largest (|10|) is dropped.
    assert torch.equal(sparsify.sparsified(sparsify.WholeTensor(sparsify.magnitude_outliers(0.95, 0.2)), D10), D10 * (D10.abs() != 10))


def test_breadcrumbs_at_density_1_keeps_everything() -> None:
    assert torch.equal(sparsify.sparsified(sparsify.WholeTensor(sparsify.magnitude_outliers(1.0, 0.1)), D10), D10)


# --- DELLA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("density", "epsilon"), [(0.1, 0.15), (0.15, 0.15), (0.9, 0.15), (0.5, 0.5)])
@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_refuses_density_epsilon_outside_the_unit_interval(name: str, density: float, epsilon: float) -> None:
    base = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="epsilon"):
        della(name, [base + 1], base, [1.0], density=[density], epsilon=[epsilon])


def test_della_at_density_1_does_not_prune() -> None:
    # density 1: no pruning, L1 rescale ratio 1, then TIES consensus with normalize -> same as ties at density 1.
    got = della("della", X_CONFLICT, BASE5, W_CONFLICT, density=[1.0, 1.0], epsilon=[0.15, 0.15])
    assert torch.equal(got, T([0.0, 3.0, 6.0, 6.0, 3.0]))


def test_della_keeps_larger_magnitudes_more_often() -> None:
    # One row of |d| = 1..1000 (shuffled): keep probability p = 0.1 + 0.8 * rank/999, so the bottom quarter
    # keeps ~0.2 and the top quarter ~0.8 (sd ~0.025 each), and the whole row ~0.5 (sd ~0.015).
    d = torch.arange(1, 1001, dtype=torch.float32)[torch.randperm(1000, generator=gen(0))]
    kept = sparsify.sparsified(sparsify.WholeTensor(sparsify.della_magprune(0.5, 0.4, 1)), d) != 0
    small, large = kept[d <= 250].float().mean().item(), kept[d > 750].float().mean().item()
    assert small < 0.35 and large > 0.65
    assert abs(kept.float().mean().item() - 0.5) < 0.08


def test_della_ranks_within_each_row() -> None:
    # Row 0 holds tiny values, row 1 huge ones. Ranked per row, each row keeps ~density (sd ~0.02);
    # ranked over the whole tensor, row 0 would keep ~0.3 and row 1 ~0.7.
    values = torch.arange(1, 501, dtype=torch.float32)
    d = torch.stack([values * 1e-3, values * 1e3])
    kept = sparsify.sparsified(sparsify.WholeTensor(sparsify.della_magprune(0.5, 0.4, 2)), d) != 0
    for row in kept:
        assert abs(row.float().mean().item() - 0.5) < 0.1


# --- model_stock ----------------------------------------------------------------------------------


def test_model_stock_with_identical_offsets_takes_the_mean_of_the_models() -> None:
    # Identical offsets: cos = 1, t = 2*1/(1 + 1) = 1 -> output = mean of the models.
    base = T([1.0, 1.0, 1.0])
    x = T([2.0, 3.0, 5.0])
    torch.testing.assert_close(METHODS["model_stock"]([x, x.clone()], base, filter_wise=False), x)


def test_model_stock_hand_example() -> None:
    # base 0; offsets (2, 0) and (1, sqrt 3) at 60 degrees: cos = 2/(2*2) = 0.5, t = 2*0.5/(1 + 0.5) = 2/3;
    # mean = (1.5, sqrt(3)/2) -> output 2/3 * mean = (1, sqrt(3)/3).
    base = T([0.0, 0.0])
    out = METHODS["model_stock"]([T([2.0, 0.0]), T([1.0, math.sqrt(3)])], base, filter_wise=False)
    torch.testing.assert_close(out, T([1.0, math.sqrt(3) / 3]))
    # Orthogonal offsets: cos = 0 -> t = 0 -> the base.
    out = METHODS["model_stock"]([T([1.0, 2.0]), T([-2.0, 1.0])], base, filter_wise=False)
    torch.testing.assert_close(out, base)


def test_model_stock_filter_wise_is_per_row() -> None:
    base = torch.zeros(2, 2)
    xs = [T([[1.0, 0.0], [1.0, 0.0]]), T([[1.0, 0.0], [0.0, 1.0]])]
    # Per row: row 0 offsets identical (t = 1) -> mean [1, 0]; row 1 orthogonal (t = 0) -> base [0, 0].
    torch.testing.assert_close(METHODS["model_stock"](xs, base, filter_wise=True), T([[1.0, 0.0], [0.0, 0.0]]))
    # Whole tensor: cos([1,0,1,0], [1,0,0,1]) = 1/2 -> t = 2/3 of mean [[1, 0], [.5, .5]].
    torch.testing.assert_close(
        METHODS["model_stock"](xs, base, filter_wise=False), T([[2 / 3, 0.0], [1 / 3, 1 / 3]])
    )


# --- nearswap, passthrough ------------------------------------------------------------------------


def test_nearswap_hand_example() -> None:
    # a = base, b = other, t = 0.5: |a - b| = [0.5, 2, 0.1, 0]
    # w = clamp(0.5 / max(|a - b|, 1e-6), 0, 1) = [1, 0.25, 1 (5 clamped), 1 (5e5 clamped)]
    # w b + (1 - w) a = [0.5, 0.25*2, -0.1, 1]
    a = T([0.0, 0.0, 0.0, 1.0])
    b = T([0.5, 2.0, -0.1, 1.0])
    assert torch.equal(METHODS["nearswap"]([b], a, t=0.5), T([0.5, 0.5, -0.1, 1.0]))


def test_passthrough_scale() -> None:
    x = T([1.0, -2.0, 3.0])
    assert torch.equal(METHODS["passthrough"]([x], None, scale=[2.0]), T([2.0, -4.0, 6.0]))
    assert torch.equal(METHODS["passthrough"]([x], None, scale=[1.0]), x)


# --- merging a model with itself (every registered method: method_cases.NAMES) -----------------------

X_SELF = T([[0.5, -1.25, 3.0], [2.0, 0.0, -0.75]])
OTHER_BASE = T([[0.0, 1.0, 2.0], [-1.0, 0.5, 0.25]])


@pytest.mark.parametrize("name", NAMES)
def test_merging_a_model_with_itself_gives_itself(name: str) -> None:
    # Copies of x, with x as the base where the method uses one: every task vector and offset is 0 (whatever is
    # trimmed or dropped), slerp and nearswap interpolate between equal tensors, linear and passthrough combine
    # copies of x. Parameters from the declaration: required ones set, density 0.5 where declared.
    n = model_count(name)
    base = X_SELF.clone() if uses_base(name) else None
    out = METHODS[name]([X_SELF.clone() for _ in range(n)], base, **call_kwargs(name, n, sparse=True))
    torch.testing.assert_close(out, X_SELF, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", names_where(lambda m: "normalize" in m.params))
def test_identical_models_over_another_base_give_that_model(name: str) -> None:
    # Every method declaring `normalize`: with it on, the merged (task) vector is a weighted mean of the models'
    # (task) vectors; identical ones agree everywhere and, nothing trimmed (density 1 where declared), give
    # theirs back over any base (linear takes no base), whatever the weights.
    n = model_count(name)
    base = OTHER_BASE.clone() if uses_base(name) else None
    weights = [0.3 + 0.4 * i for i in range(n)]
    out = METHODS[name]([X_SELF.clone() for _ in range(n)], base, **call_kwargs(name, n, normalize=True, density=1.0, weight=weights))
    torch.testing.assert_close(out, X_SELF, rtol=1e-6, atol=1e-6)


# --- dtype ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_output_dtype_is_the_input_dtype(name: str, dtype: torch.dtype) -> None:
    g = gen(4)
    x = torch.randn(3, 4, generator=g).to(dtype)
    base = torch.randn(3, 4, generator=g).to(dtype)
    other = (x + torch.randn(3, 4, generator=g)).to(dtype)
    n = model_count(name)
    out = METHODS[name]([x, other][:n], base if uses_base(name) else None, **call_kwargs(name, n, sparse=True))
    assert out.dtype == dtype
    assert out.shape == x.shape


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.97])
def test_blockwise_magnitude_matches_a_stable_sort_on_many_ties(density: float, monkeypatch: pytest.MonkeyPatch) -> None:
    # bf16-rounded deltas repeat values a lot; keep exactly the first k of a stable descending sort,
    # whether the tensor is one block or many (block size patched down to 64 elements).
    import merge_ops.methods.blocks as blocks

    d = (torch.randn(3000, generator=gen(4)) * 4).round() / 4
    k = int(density * d.numel())
    order = d.abs().argsort(descending=True, stable=True)
    expected = torch.zeros_like(d)
    expected[order[:k]] = d[order[:k]]
    assert torch.equal(sparsify.sparsified(sparsify.Magnitude(density), d), expected)
    monkeypatch.setattr(blocks, "BLOCK", 64)
    assert torch.equal(sparsify.sparsified(sparsify.Magnitude(density), d), expected)


def test_kth_largest_is_exact() -> None:
    from merge_ops.methods.blocks import kth_largest

    spread = torch.rand(5000, generator=gen(6)) * 100
    for values in (spread, spread.round()):  # distinct values, then many ties
        ordered = values.sort(descending=True).values
        for k in (1, 2, 777, 4999, 5000):
            value, above, equal, _ = kth_largest(lambda values=values: [values[:1234].clone(), values[1234:].clone()], k)
            assert value == ordered[k - 1] and above == int((values > value).sum()) and equal == int((values == value).sum())


def test_kth_largest_with_a_sample_is_exact_on_repeated_values() -> None:
    """bfloat16-like deltas repeat values: the sample's guess of a single value, the bracket and the radix fallback
    all give the exact k-th largest, also when a misleading sample makes the guess and the bracket miss."""
    from merge_ops.methods.blocks import SAMPLE_STEP, _brackets, kth_largest

    values = (torch.randn(300_000, generator=gen(7)).abs() * 0.002).to(torch.bfloat16).float()
    ordered = values.sort(descending=True).values
    blocks = lambda: [values[:100_000].clone(), values[100_000:].clone()]  # noqa: E731
    misleading = torch.cat([torch.full((4000,), float(ordered[1000])), values[::SAMPLE_STEP]])
    guessed = 0
    for k in (1, 1000, 2000, 5000, 50_000, 149_999, 150_000, 150_001, 299_999, 300_000, 90_000, 210_000):
        for sample in (values[::SAMPLE_STEP], misleading):
            guessed += len(_brackets(sample, k, values.numel())) == 2
            value, above, equal, per_block = kth_largest(blocks, k, sample, values.numel())
            assert value == ordered[k - 1] and above == int((values > value).sum()) and equal == int((values == value).sum())
            assert per_block is None or per_block == [int((b == value).sum()) for b in blocks()]
    assert guessed, "some case must try the single-value guess first"
