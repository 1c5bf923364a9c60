"""Property tests of the merge methods (hypothesis): identities that hold for any input.

Each property is derived from the formulas in ../shared/merge-methods.md; the comment above each
test says why it holds. Values are bounded (|v| <= 100) so float32 rounding stays far below the
tolerances used.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from merge_ops.methods import sparsify
from merge_ops.methods.registry import METHODS

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)  # the same examples on every run, CI included

values = st.floats(min_value=-100, max_value=100, allow_nan=False, allow_infinity=False, width=32)
nonzero_values = values.filter(lambda v: abs(v) >= 1e-3)
positive_weights = st.floats(min_value=0.1, max_value=10, allow_nan=False, allow_infinity=False)
densities = st.floats(min_value=0.05, max_value=0.95)


@st.composite
def tensor_family(draw, *, count: int | tuple[int, int], elements=values, dtype=torch.float32):
    """(base, [x_i]) of one random length; ``count`` models (or a range of counts)."""
    n_models = count if isinstance(count, int) else draw(st.integers(*count))
    size = draw(st.integers(min_value=1, max_value=12))
    rows = [draw(st.lists(elements, min_size=size, max_size=size)) for _ in range(n_models + 1)]
    tensors = [torch.tensor(r, dtype=dtype) for r in rows]
    return tensors[0], tensors[1:]


def scale_of(*tensors: torch.Tensor) -> float:
    return max(1.0, *(float(t.abs().max()) for t in tensors))


# --- linear ---------------------------------------------------------------------------------------


# sum (c w_i) x_i / sum (c w_i) = sum w_i x_i / sum w_i for any c != 0.
@SETTINGS
@given(tensor_family(count=(1, 4)), st.data(), st.floats(min_value=0.1, max_value=10))
def test_linear_normalized_is_invariant_to_scaling_the_weights(family, data, c) -> None:
    _, xs = family
    weights = data.draw(st.lists(positive_weights, min_size=len(xs), max_size=len(xs)))
    merged = METHODS["linear"](xs, None, weight=weights, normalize=True)
    scaled = METHODS["linear"](xs, None, weight=[c * w for w in weights], normalize=True)
    torch.testing.assert_close(scaled, merged, rtol=1e-5, atol=1e-5 * scale_of(*xs))


# sum w_i x / sum w_i = x.
@SETTINGS
@given(tensor_family(count=1), st.lists(positive_weights, min_size=1, max_size=4))
def test_linear_of_identical_tensors_is_that_tensor(family, weights) -> None:
    _, (x,) = family
    merged = METHODS["linear"]([x.clone() for _ in weights], None, weight=weights, normalize=True)
    torch.testing.assert_close(merged, x, rtol=1e-5, atol=1e-5 * scale_of(x))


# A one-hot weight vector selects its model bit for bit: 0 * x_j adds exact zeros, the divisor is 1.
@SETTINGS
@given(tensor_family(count=(1, 4)), st.data(), st.booleans())
def test_linear_one_hot_weights_select_a_model_exactly(family, data, normalize) -> None:
    _, xs = family
    pick = data.draw(st.integers(0, len(xs) - 1))
    weights = [1.0 if i == pick else 0.0 for i in range(len(xs))]
    assert torch.equal(METHODS["linear"](xs, None, weight=weights, normalize=normalize), xs[pick])


# --- task arithmetic ------------------------------------------------------------------------------


# base + lambda * m is affine in lambda: out(lambda) - base = lambda * (out(1) - base).
@SETTINGS
@given(tensor_family(count=(1, 3)), st.data(), st.floats(min_value=-3, max_value=3), st.booleans())
def test_task_arithmetic_is_linear_in_lambda(family, data, lam, normalize) -> None:
    base, xs = family
    weights = data.draw(st.lists(positive_weights, min_size=len(xs), max_size=len(xs)))

    def ta(lambda_: float) -> torch.Tensor:
        return METHODS["task_arithmetic"](xs, base, weight=weights, lambda_=lambda_, normalize=normalize, int8_mask=False)

    atol = 1e-4 * scale_of(base, *xs) * sum(weights) * max(1.0, abs(lam))
    torch.testing.assert_close(ta(lam) - base, lam * (ta(1.0) - base), rtol=1e-4, atol=atol)


# Without normalize the mix is a sum of per-model terms: merging two models adds their separate task vectors.
@SETTINGS
@given(tensor_family(count=2), positive_weights, positive_weights)
def test_task_arithmetic_adds_task_vectors(family, w1, w2) -> None:
    base, (x1, x2) = family

    def ta(xs, ws):
        return METHODS["task_arithmetic"](xs, base, weight=ws, lambda_=1.0, normalize=False, int8_mask=False)

    both = ta([x1, x2], [w1, w2]) - base
    separate = (ta([x1], [w1]) - base) + (ta([x2], [w2]) - base)
    torch.testing.assert_close(both, separate, rtol=1e-4, atol=1e-4 * scale_of(base, x1, x2) * (w1 + w2))


# DARE at density 1 keeps every entry and its L1 rescale factor is 1: dare_linear = task arithmetic.
@SETTINGS
@given(tensor_family(count=(1, 3)), st.data())
def test_dare_linear_at_density_1_is_task_arithmetic(family, data) -> None:
    base, xs = family
    weights = data.draw(st.lists(positive_weights, min_size=len(xs), max_size=len(xs)))
    dare = METHODS["dare_linear"](
        xs, base, generator=torch.Generator().manual_seed(0), weight=weights, density=[1.0] * len(xs),
        lambda_=1.0, normalize=False, rescale=True, int8_mask=False,
    )
    ta = METHODS["task_arithmetic"](xs, base, weight=weights, lambda_=1.0, normalize=False, int8_mask=False)
    assert torch.equal(dare, ta)


# --- ties -----------------------------------------------------------------------------------------


# With positive weights, normalize and lambda 1, each output delta is a weighted mean of the agreeing
# deltas (those whose weighted sign matches the elected sign of sum_i w_i d_i, zero sum = +), so it lies
# between their min and max and has the elected sign; with no agreeing delta (all zero) it is 0.
@SETTINGS
@given(tensor_family(count=(2, 4)), st.data())
def test_ties_output_is_a_mean_of_the_agreeing_deltas(family, data) -> None:
    base, xs = family
    weights = data.draw(st.lists(positive_weights, min_size=len(xs), max_size=len(xs)))
    out = METHODS["ties"](
        xs, base, weight=weights, density=[1.0] * len(xs), lambda_=1.0, normalize=True, rescale=False, int8_mask=False
    )
    merged = (out - base).double().numpy()
    # The vote recomputed with the same float32 operations, so a sum near 0 rounds the same way.
    weighted_t = torch.stack([(x - base) * w for x, w in zip(xs, weights, strict=False)])
    elected = np.where((weighted_t.sum(dim=0) >= 0).numpy(), 1.0, -1.0)
    weighted = weighted_t.double().numpy()
    deltas = np.stack([(x - base).double().numpy() for x in xs])
    tol = 1e-5 * scale_of(base, *xs)
    for j in range(merged.shape[0]):
        agreeing = deltas[np.sign(weighted[:, j]) == elected[j], j]
        if agreeing.size == 0:
            assert merged[j] == 0
            continue
        assert agreeing.min() - tol <= merged[j] <= agreeing.max() + tol
        assert np.sign(merged[j]) == elected[j]


# With weights 1 and no normalize, the output delta is exactly the sum of the agreeing deltas.
@SETTINGS
@given(tensor_family(count=(2, 4), dtype=torch.float64))
def test_ties_unnormalized_unit_weights_sum_the_agreeing_deltas(family) -> None:
    base, xs = family
    ones = [1.0] * len(xs)
    out = METHODS["ties"](xs, base, weight=ones, density=ones, lambda_=1.0, normalize=False, rescale=False, int8_mask=False)
    deltas = np.stack([(x - base).numpy() for x in xs])
    elected = np.where(deltas.sum(axis=0) >= 0, 1.0, -1.0)
    expected = (deltas * (np.sign(deltas) == elected)).sum(axis=0)
    np.testing.assert_allclose((out - base).numpy(), expected, rtol=1e-9, atol=1e-9 * scale_of(base, *xs))


# The vote, the masks and the divisor are sums over models: the order of the models does not matter.
@SETTINGS
@given(tensor_family(count=(2, 4)), st.data(), densities)
def test_ties_does_not_depend_on_model_order(family, data, density) -> None:
    base, xs = family
    assume(int(density * base.numel()) > 0)
    weights = data.draw(st.lists(positive_weights, min_size=len(xs), max_size=len(xs)))
    order = data.draw(st.permutations(range(len(xs))))

    def run(idx):
        return METHODS["ties"](
            [xs[i] for i in idx], base, weight=[weights[i] for i in idx], density=[density] * len(xs),
            lambda_=1.0, normalize=True, rescale=False, int8_mask=False,
        )

    torch.testing.assert_close(run(order), run(range(len(xs))), rtol=1e-5, atol=1e-5 * scale_of(base, *xs))


# --- sparsifiers ----------------------------------------------------------------------------------


# TIES trim keeps exactly k = int(density * numel) entries, and they are the largest ones.
@SETTINGS
@given(st.lists(nonzero_values, min_size=1, max_size=40), densities)
def test_magnitude_keeps_exactly_k_largest(entries, density) -> None:
    delta = torch.tensor(entries)
    k = int(density * delta.numel())
    assume(k > 0)
    kept = sparsify.sparsified(sparsify.Magnitude(density), delta)
    mask = kept != 0
    assert int(mask.sum()) == k
    assert torch.equal(kept[mask], delta[mask])
    if k < delta.numel():
        assert delta[mask].abs().min() >= delta[~mask].abs().max()


# Breadcrumbs keeps n - n_bot - n_top entries, and both branches of the formula make that int(density * n);
# the kept magnitudes are one contiguous block of the sorted magnitudes (dropped ones are below or above it).
@SETTINGS
@given(st.lists(nonzero_values, min_size=1, max_size=40), densities, st.floats(min_value=0, max_value=0.5))
def test_magnitude_outliers_keeps_int_density_n_in_one_sorted_block(entries, density, gamma) -> None:
    delta = torch.tensor(entries)
    kept = sparsify.sparsified(sparsify.WholeTensor(sparsify.magnitude_outliers(density, gamma)), delta)
    mask = kept != 0
    assert int(mask.sum()) == int(density * delta.numel())
    assert torch.equal(kept[mask], delta[mask])
    if mask.any() and (~mask).any():
        low, high = delta[mask].abs().min(), delta[mask].abs().max()
        dropped = delta[~mask].abs()
        assert bool(((dropped <= low) | (dropped >= high)).all())


# rescale_l1 multiplies the kept entries by ||d||_1 / ||kept||_1, so the result has the original L1 norm.
@SETTINGS
@given(st.lists(nonzero_values, min_size=1, max_size=40), densities, st.integers(0, 2**31))
def test_dare_rescale_preserves_the_l1_norm(entries, density, seed) -> None:
    delta = torch.tensor(entries)
    zeros = torch.zeros_like(delta)
    rescaled = METHODS["dare_linear"]([delta], zeros, weight=[1.0], density=[density], lambda_=1.0, normalize=False,
                                      rescale=True, int8_mask=False, generator=torch.Generator().manual_seed(seed))
    assume(bool((rescaled != 0).any()))
    torch.testing.assert_close(rescaled.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
    kept = rescaled != 0
    ratio = rescaled[kept] / delta[kept]
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio))  # one common factor for every kept entry


# --- slerp ----------------------------------------------------------------------------------------


@st.composite
def unit_pair(draw):
    """Two unit vectors whose cosine is safely inside the slerp (non-lerp) range."""
    n = draw(st.integers(2, 8))
    v0 = torch.tensor(draw(st.lists(values, min_size=n, max_size=n)), dtype=torch.float64)
    v1 = torch.tensor(draw(st.lists(values, min_size=n, max_size=n)), dtype=torch.float64)
    assume(float(v0.norm()) > 1e-2 and float(v1.norm()) > 1e-2)
    v0, v1 = v0 / v0.norm(), v1 / v1.norm()
    assume(abs(float(v0 @ v1)) < 0.999)
    return v0, v1


# On unit vectors, slerp stays on the unit sphere and moves by the angle t * theta from v0 (and
# (1 - t) * theta from v1).
@SETTINGS
@given(unit_pair(), st.floats(min_value=0, max_value=1))
def test_slerp_of_unit_vectors_is_a_unit_vector_at_angle_t_theta(pair, t) -> None:
    v0, v1 = pair
    out = METHODS["slerp"]([v1], v0, t=t)
    theta = math.acos(float(v0 @ v1))
    assert float(out.norm()) == pytest.approx(1.0, abs=1e-9)
    assert float(out @ v0) == pytest.approx(math.cos(t * theta), abs=1e-9)
    assert float(out @ v1) == pytest.approx(math.cos((1 - t) * theta), abs=1e-9)


# The cosine and the coefficients do not change when both inputs are scaled by c > 0: slerp(c a, c b) = c slerp(a, b).
@SETTINGS
@given(unit_pair(), st.floats(min_value=0, max_value=1), st.floats(min_value=0.1, max_value=10))
def test_slerp_is_positively_homogeneous(pair, t, c) -> None:
    v0, v1 = pair
    scaled = METHODS["slerp"]([c * v1], c * v0, t=t)
    torch.testing.assert_close(scaled, c * METHODS["slerp"]([v1], v0, t=t), rtol=1e-9, atol=1e-9 * c)


# t = 0 gives the base exactly on either branch: the coefficients are exactly 1 and 0.
@SETTINGS
@given(tensor_family(count=1))
def test_slerp_t0_is_the_base_exactly(family) -> None:
    base, (x,) = family
    assert torch.equal(METHODS["slerp"]([x], base, t=0.0), base)


# --- nearswap -------------------------------------------------------------------------------------


# w = clamp(t / max(|a - b|, 1e-6), 0, 1) makes each output a convex combination of a and b, and w = 1
# (b) wherever max(|a - b|, 1e-6) <= t. Up to rounding only: torch computes scalar / tensor as
# t * reciprocal(tensor), so t = |a - b| = 47 gives w = 0.99999994 (and a = t = 26.75, b = 0 gives 1.6e-6
# instead of 0: the tolerance scales with the values); and below 1e-6 the clamp matters
# (a == b with t = 1e-7 gives w = 0.1).
@SETTINGS
@given(tensor_family(count=1), st.floats(min_value=0, max_value=50))
def test_nearswap_stays_between_the_inputs_and_swaps_close_values(family, t) -> None:
    a, (b,) = family
    out = METHODS["nearswap"]([b], a, t=t)
    tol = 1e-5 * scale_of(a, b)
    assert bool((out >= torch.minimum(a, b) - tol).all() and (out <= torch.maximum(a, b) + tol).all())
    close = (a - b).abs().clamp(min=1e-6) <= torch.tensor(t, dtype=a.dtype)
    torch.testing.assert_close(out[close], b[close], rtol=1e-6, atol=tol)
