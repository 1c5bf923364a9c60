"""sce, arcee_fusion, ram and ramplus_tl: declarations as mergekit 0.1.5 has them, hand examples, and each method
against a small reference written here from its formula (float64, entry by entry)."""
from __future__ import annotations

import math

import pytest
import torch

from merge_ops.methods import arcee_fusion as fusion
from merge_ops.methods.registry import METHODS

T = torch.tensor


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def family(shape: tuple[int, ...], models: int, seed: int, changed: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``models`` fine-tunes whose deltas are non-zero at about ``changed`` of the entries."""
    g = gen(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.3 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < changed) for _ in range(models)]


def deltas64(xs: list[torch.Tensor], base: torch.Tensor) -> list[list[float]]:
    return [(x.double() - base.double()).flatten().tolist() for x in xs]


# --- declarations -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "defaults", "models"),
    [
        ("sce", {"select_topk": 1.0}, (1, None)),
        ("arcee_fusion", {}, (1, 1)),
        ("ram", {"epsilon": 1e-5}, (1, None)),
        ("ramplus_tl", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, (1, None)),
    ],
)
def test_declared_as_mergekit_declares_them(name: str, defaults: dict[str, float], models: tuple[int, int | None]) -> None:
    m = METHODS[name]
    assert {n: p.default for n, p in m.params.items()} == defaults
    assert not any(p.per_model for p in m.params.values())
    assert m.base == "required" and (m.min_models, m.max_models) == models
    assert m.elementwise == (name == "ram")  # the others need whole-tensor statistics
    assert m.random == (name == "arcee_fusion")  # its quartiles of a large tensor come from a seeded sample


# --- sce --------------------------------------------------------------------------------------------


def sce_reference(xs: list[torch.Tensor], base: torch.Tensor, select_topk: float) -> torch.Tensor:
    d = deltas64(xs, base)
    n, size = len(d), len(d[0])
    if select_topk < 1:
        means = [sum(row[j] for row in d) / n for j in range(size)]
        var = [sum((row[j] - means[j]) ** 2 for row in d) / n for j in range(size)]
        k = int(sum(v != 0 for v in var) * select_topk)
        keep = set(sorted(range(size), key=lambda j: (-var[j], j))[:k])  # largest first, ties to the lower index
        d = [[v if j in keep else 0.0 for j, v in enumerate(row)] for row in d]
    mass = [sum(v * v for v in row) / size for row in d]
    weights = [m / sum(mass) for m in mass] if sum(mass) >= 1e-6 else [1 / n] * n
    out = []
    for j in range(size):
        majority = 1.0 if sum(row[j] for row in d) >= 0 else -1.0
        agree = [w if row[j] * majority > 0 else 0.0 for w, row in zip(weights, d, strict=True)]
        out.append(sum(a * row[j] for a, row in zip(agree, d, strict=True)) / max(sum(agree), 1e-6))
    return base + torch.tensor(out).view_as(base).float()


@pytest.mark.parametrize("select_topk", [1.0, 0.6, 0.1])
def test_sce_equals_its_reference(select_topk: float) -> None:
    base, xs = family((12, 10), 3, seed=1, changed=0.7)
    out = METHODS["sce"](xs, base, select_topk=select_topk)
    torch.testing.assert_close(out, sce_reference(xs, base, select_topk), rtol=1e-5, atol=1e-6)


def test_sce_hand_example() -> None:
    # deltas (base 0) d1 = [2, -2, 1, 0], d2 = [2, 2, -1, 0]: mean squares 9/4 and 9/4 -> weights 1/2, 1/2.
    # Column sums [4, 0, 0, 0] elect +, + (a zero sum is positive), +, +: entry 0 averages 2 and 2, entry 1
    # and entry 2 keep the positive delta alone (2 and 1), entry 3 has no agreeing delta (0 / clamp 1e-6 = 0).
    base = torch.zeros(4)
    out = METHODS["sce"]([T([2.0, -2.0, 1.0, 0.0]), T([2.0, 2.0, -1.0, 0.0])], base, select_topk=1.0)
    assert torch.equal(out, T([2.0, 2.0, 1.0, 0.0]))
    # select_topk 0.5: variances [0, 4, 1, 0], two non-zero -> keep int(2 * 0.5) = 1 entry, the largest (entry 1);
    # the other entries of both deltas are erased before weights and votes.
    out = METHODS["sce"]([T([2.0, -2.0, 1.0, 0.0]), T([2.0, 2.0, -1.0, 0.0])], base, select_topk=0.5)
    assert torch.equal(out, T([0.0, 2.0, 0.0, 0.0]))


def test_sce_top_variance_ties_go_to_the_lower_index() -> None:
    # Two models: variance = ((a - b) / 2)^2 exactly. Entries 1, 2 and 4 tie at the largest variance (1); four
    # entries are non-zero, 0.5 of them -> keep 2: entries 1 and 2.
    base = torch.zeros(6)
    x1, x2 = T([1.0, 2.0, 2.0, 0.5, 2.0, 0.0]), T([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    out = METHODS["sce"]([x1, x2], base, select_topk=0.5)
    assert (out != 0).tolist() == [False, True, True, False, False, False]


def test_sce_of_one_model_is_that_model_and_of_nothing_changed_is_the_base() -> None:
    base, (x,) = family((5, 7), 1, seed=2)
    torch.testing.assert_close(METHODS["sce"]([x], base, select_topk=1.0), x)
    assert torch.equal(METHODS["sce"]([base.clone(), base.clone()], base, select_topk=0.3), base)  # uniform weights


# --- ram, ramplus_tl --------------------------------------------------------------------------------


def ram_reference(xs: list[torch.Tensor], base: torch.Tensor, epsilon: float, r: float | None = None, alpha: float = 0.0) -> torch.Tensor:
    d = deltas64(xs, base)
    changed = [[abs(v) > epsilon for v in row] for row in d]
    count = [sum(col) for col in zip(*changed, strict=True)]
    boost = [1.0] * len(d)
    if r is not None:  # ramplus_tl: per model, shared / unshared changed entries of this tensor
        for i, row in enumerate(changed):
            shared = sum(c and n > 1 for c, n in zip(row, count, strict=True))
            alone = sum(c and n == 1 for c, n in zip(row, count, strict=True))
            boost[i] = 1 + r * min(max(shared / max(alone, epsilon), 0.0), alpha)
    out = [
        sum(d[i][j] * (boost[i] if count[j] == 1 else 1 / count[j]) for i in range(len(d)) if changed[i][j])
        for j in range(len(count))
    ]
    return base + torch.tensor(out).view_as(base).float()


@pytest.mark.parametrize("epsilon", [1e-5, 0.2])
def test_ram_equals_its_reference(epsilon: float) -> None:
    base, xs = family((9, 11), 3, seed=3, changed=0.5)
    torch.testing.assert_close(METHODS["ram"](xs, base, epsilon=epsilon), ram_reference(xs, base, epsilon))


@pytest.mark.parametrize(("r", "alpha", "epsilon"), [(0.1, 0.2, 1e-5), (0.7, 5.0, 0.2), (-0.5, 1.0, 0.1)])
def test_ramplus_tl_equals_its_reference(r: float, alpha: float, epsilon: float) -> None:
    base, xs = family((9, 11), 3, seed=4, changed=0.5)
    xs.append(xs[0].clone())  # a copy of model 0: every entry it changed is shared (no unshared ones)
    out = METHODS["ramplus_tl"](xs, base, r=r, alpha=alpha, epsilon=epsilon)
    torch.testing.assert_close(out, ram_reference(xs, base, epsilon, r, alpha))


def test_ram_hand_example() -> None:
    # base 0: entry 0 changed by model 1 alone (kept whole), entry 1 by two (averaged), entry 2 by none,
    # entry 3 by all three ((3 - 6 + 6) / 3), entry 4 by less than epsilon (dropped).
    xs = [T([1.0, 2.0, 0.0, 3.0, 1e-6]), T([0.0, 4.0, 0.0, -6.0, 0.0]), T([0.0, 0.0, 0.0, 6.0, 0.0])]
    assert torch.equal(METHODS["ram"](xs, torch.zeros(5), epsilon=1e-5), T([1.0, 3.0, 0.0, 1.0, 0.0]))


def test_ramplus_tl_hand_example() -> None:
    # Model 1 changed entries 0, 1, 2 (1 shared, 2 unshared: rho 0.5), model 2 entries 1, 3 (1 and 1: rho 1, clamped to
    # alpha 0.75). Boosts 1 + 0.5 * 0.5 = 1.25 and 1 + 0.5 * 0.75 = 1.375 scale the unshared entries; entry 1 is averaged.
    xs = [T([1.0, 2.0, 3.0, 0.0]), T([0.0, 4.0, 0.0, 8.0])]
    out = METHODS["ramplus_tl"](xs, torch.zeros(4), r=0.5, alpha=0.75, epsilon=1e-5)
    assert torch.equal(out, T([1.25, 3.0, 3.75, 11.0]))


def test_ramplus_tl_without_boost_is_ram() -> None:
    base, xs = family((6, 8), 3, seed=5, changed=0.5)
    assert torch.equal(METHODS["ramplus_tl"](xs, base, r=0.0, alpha=0.2, epsilon=1e-5), METHODS["ram"](xs, base, epsilon=1e-5))


# --- arcee_fusion -----------------------------------------------------------------------------------


def fusion_reference(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Importance in float64, entry by entry; quartiles with torch.quantile's "lower" rule (floor of q * (n - 1))."""
    rows_x, rows_b = x.double().reshape(-1, x.shape[-1]).tolist(), base.double().reshape(-1, x.shape[-1]).tolist()
    importance = []
    for rx, rb in zip(rows_x, rows_b, strict=True):
        ex, eb = [math.exp(v) for v in rx], [math.exp(v) for v in rb]
        p, q = [e / sum(ex) + 1e-8 for e in ex], [e / sum(eb) + 1e-8 for e in eb]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        importance += [abs(a - b) * kl for a, b in zip(rx, rb, strict=True)]
    scores = torch.tensor(importance, dtype=torch.float64)
    q1, median, q3 = torch.quantile(scores, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), interpolation="lower")
    keep = (scores >= median + 1.5 * (q3 - q1)).view_as(x)
    return torch.where(keep, x, base)


@pytest.mark.parametrize("shape", [(16, 12), (40,), (3, 5, 8)])
def test_arcee_fusion_equals_its_reference(shape: tuple[int, ...]) -> None:
    base, (x,) = family(shape, 1, seed=6)
    x[..., 0] += 2.0  # some rows whose softmax moves a lot
    out = METHODS["arcee_fusion"]([x], base, generator=gen())
    want = fusion_reference(x, base)
    assert 0 < int((out != base).sum()) < out.numel() // 2  # the outliers, not everything
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)  # base + (x - base) rounds to within an ulp of x


def test_arcee_fusion_hand_example() -> None:
    # One row: the KL factor is one positive number, so the ranks are those of |delta| = 1..8 and 100. Ranks 2, 4, 6
    # of 0..8 -> q1 3, median 5, q3 7: threshold 5 + 1.5 * 4 = 11 (times the KL factor): only the 100 is taken.
    base = torch.zeros(9)
    x = T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 100.0])
    assert torch.equal(METHODS["arcee_fusion"]([x], base, generator=gen()), T([0.0] * 8 + [100.0]))


def test_arcee_fusion_samples_quartiles_of_large_tensors_from_the_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    base, (x,) = family((50, 40), 1, seed=7)
    run = lambda seed: METHODS["arcee_fusion"]([x], base, generator=gen(seed))  # noqa: E731
    assert torch.equal(run(1), run(2))  # 2000 entries: exact quartiles, the generator is not used
    monkeypatch.setattr(fusion, "QUANTILE_SAMPLE", 100)
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_arcee_fusion_sampled_threshold_is_close_to_the_exact_one() -> None:
    # 1.2M entries, more than the sample: the kept fraction with sampled quartiles is within 0.2% (absolute) of the
    # fraction kept with exact ones (a sample of 1e6 estimates a quantile to ~0.05%).
    base, (x,) = family((1200, 1000), 1, seed=8)
    out = METHODS["arcee_fusion"]([x], base, generator=gen(3))
    p, q = torch.softmax(x, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    importance = (x - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    q1, median, q3 = importance.flatten().sort().values[[299_999, 599_999, 899_999]]  # (n - 1) // 4, // 2, 3 (n - 1) // 4
    exact = float((importance >= median + 1.5 * (q3 - q1)).double().mean())
    assert 0.001 < exact < 0.5
    assert abs(float((out != base).double().mean()) - exact) < 0.002
