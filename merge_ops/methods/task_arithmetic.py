"""Task arithmetic, and its family: task arithmetic with a sparsifier and a sign-consensus preset.

The family's parameters are declared once, in ``_family_parameters``; ``task_vector_method`` makes a member
from the function that builds its sparsifiers (TIES, DARE, breadcrumbs, DELLA) and its presets.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from merge_ops.methods.blocks import (
    BLOCK,
    PARALLEL_MIN,
    Differences,
    block_slices,
    flat,
    in_order,
)
from merge_ops.methods.declaration import MergeMethod, PerModel, merge_method


class Sparsifier(Protocol):
    def prepare(self, deltas: Differences, shape: torch.Size) -> None: ...
    def mask(self, delta: Tensor) -> Tensor | None: ...
    def reset(self) -> None: ...


Sparsify = Callable[..., list[Sparsifier]]
"""``(tensors, *, <the member's own parameters>) -> one sparsifier per model``; a keyword ``generator`` asks
for the tensor's seeded generator."""


def _l1_rescale(sparsifier: Sparsifier, deltas: Differences) -> float:
    """mergekit's rescale factor: the kept entries get the delta's full L1 norm.

    The masks are drawn here and again while merging (cheaper than keeping them: all are recomputable).
    """
    total = kept = 0.0
    for delta in deltas():
        mask = sparsifier.mask(delta)
        magnitude = delta.abs()
        total += float(magnitude.sum(dtype=torch.float32))
        kept += float((magnitude if mask is None else magnitude * mask).sum(dtype=torch.float32))
    sparsifier.reset()
    return total / kept if total >= 1e-7 and kept >= 1e-7 else 1.0


def _sum_rows(stacked: Tensor) -> Tensor:
    """``stacked.sum(dim=0)``: in float32 or wider added row after row (the same values; the reduction is ~3x
    slower); in bfloat16/float16 the reduction itself, which accumulates in float32 and rounds once, as mergekit's does."""
    if stacked.dtype in (torch.bfloat16, torch.float16):
        return stacked.sum(dim=0)
    total = stacked[0] + stacked[1] if len(stacked) > 1 else stacked[0].clone()
    for row in stacked[2:]:
        total += row
    return total


def elect_signs(rows: Tensor) -> Tensor:
    """TIES sign election over ``rows`` (one row per model): 1.0 where an entry has the sign of its column's sum
    (a zero sum counts as positive), 0.0 elsewhere; zero entries never agree. A float mask in ``rows``' dtype."""
    majority = _sum_rows(rows).ge_(0).mul_(2).sub_(1)  # +1 or -1
    return (rows * majority).gt_(0)


def combine_task_vectors(
    tensors: list[Tensor],
    base: Tensor,
    *,
    weight: list[float],
    lambda_: float,
    normalize: bool,
    consensus: bool,
    sparsifiers: list[Sparsifier] | None = None,
    rescale: bool = False,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``base + lambda * mix(w_i * sparsify(x_i - base))``, with optional TIES sign consensus.

    Steps and order follow merge-methods.md: each delta is sparsified on its own (L1-rescaled
    when ``rescale``), weights are applied before the sign vote, a zero vote counts as positive,
    and the ``normalize`` divisor sums the weights of agreeing entries (all weights without
    consensus). Computed in cache-sized blocks, in ``dtype`` (default: the base's), each block's result
    rounded to ``out_dtype`` (default: ``dtype``); whole-tensor statistics come first.
    """
    dtype = dtype or base.dtype
    out_dtype = out_dtype or dtype
    if not tensors:
        return base.to(dtype).to(out_dtype)
    base_flat, inputs = flat(base), [flat(x) for x in tensors]
    active = sparsifiers or []

    def prepare(i: int) -> float:
        deltas = Differences(inputs[i], base_flat, dtype)
        active[i].prepare(deltas, base.shape)
        return _l1_rescale(active[i], deltas) if rescale else 1.0

    # Whole-tensor statistics of each task vector, independent of each other: on two threads for big tensors
    count = len(active)
    scales = in_order(prepare, range(count), parallel=count > 1 and base.numel() > BLOCK) or [1.0] * len(tensors)
    out = torch.empty_like(base_flat, dtype=out_dtype)
    weights = torch.tensor(weight, dtype=dtype)  # in the working dtype, as mergekit does
    all_positive = bool((weights >= torch.finfo(dtype).tiny).all())

    def agreeing_weight(agree: Tensor) -> Tensor:  # the divisor; 1 where no weight agrees
        divisor = _sum_rows(agree.mul_(weights.view(-1, 1)))
        if all_positive:  # zero only where nothing agrees and the sum is +-0: +-0 / tiny == +-0 / 1
            return divisor.clamp_(min=torch.finfo(dtype).tiny)
        return divisor.add_(divisor == 0)

    def merge_block(s: slice) -> None:
        base_block = base_flat[s].to(dtype)
        stacked = torch.empty((len(inputs), base_block.numel()), dtype=dtype, device=base_block.device)

        def task_vector(i: int) -> None:  # row i: the weighted, sparsified delta of model i in this block
            delta = torch.sub(inputs[i][s].to(dtype), base_block, out=stacked[i])
            mask = active[i].mask(delta) if active else None
            if mask is not None:
                delta *= mask
            if scales[i] != 1.0:
                delta *= scales[i]
            delta *= weights[i]

        def combine(part: slice) -> None:  # elementwise over the block: any split gives the same values
            rows = stacked[:, part]
            if consensus:
                agree = elect_signs(rows)
                mixed = _sum_rows(rows.mul_(agree))
                if normalize:
                    mixed /= agreeing_weight(agree)
            elif normalize:
                total = weights.sum()
                mixed = _sum_rows(rows).div_(torch.where(total.abs() < 1e-8, torch.ones_like(total), total))
            else:
                mixed = _sum_rows(rows)
            if lambda_ != 1.0:
                mixed *= lambda_
            torch.add(base_block[part], mixed, out=out[s][part])

        # Each model's rows, then the combination, on two threads for big blocks (blocks stay in order)
        half = base_block.numel() // 2
        in_order(task_vector, range(len(inputs)), parallel=half >= PARALLEL_MIN)
        in_order(combine, [slice(0, half), slice(half, None)], parallel=half >= PARALLEL_MIN)

    for s in block_slices(base.numel()):
        merge_block(s)
    return out.view_as(base)


def model_seeds(generator: torch.Generator, count: int) -> list[int]:
    """One seed per input model, drawn in order from the tensor's generator."""
    return [int(torch.randint(0, 2**62, (1,), generator=generator)) for _ in range(count)]


def _family_parameters(
    tensors: list[Tensor],
    base: Tensor,
    *,
    weight: PerModel[float],
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> None:
    """What every member of the family declares; a member's own parameters follow ``weight``.

    ``rescale`` (the kept entries get the task vector's L1 norm) only where a sparsifier drops entries;
    ``int8_mask`` is mergekit's option to hold its whole-tensor sign masks as int8 rather than in the working dtype:
    less memory, the same values (the signs compared are -1, 0 and 1 either way). mergeflow's masks only live per
    cache-sized block, so there is nothing to save: it is accepted and the output is the same with either value.
    """


def task_vector_method(
    name: str,
    *,
    summary: str,
    sparsify: Sparsify | None = None,
    consensus: bool = False,
    normalize: bool = False,
    rescale: bool = False,
) -> MergeMethod:
    """A member of the family: ``combine_task_vectors`` with ``sparsify``'s sparsifiers and ``consensus``.

    Its declaration is ``_family_parameters`` with ``sparsify``'s keyword parameters after ``weight``.

    Args:
        name, summary: the recipe's ``merge_method`` value and the one-line description.
        sparsify: builds one sparsifier per model; without it nothing is dropped, there is no ``rescale``
            and every step is elementwise.
        consensus: TIES sign election before mixing.
        normalize, rescale: the member's defaults of those parameters.
    """
    own = [] if sparsify is None else [
        p for p in inspect.signature(sparsify, eval_str=True).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    presets = {"normalize": normalize, "rescale": rescale}
    family = [
        p.replace(default=presets.get(p.name, p.default))
        for p in inspect.signature(_family_parameters, eval_str=True).parameters.values()
        if sparsify is not None or p.name != "rescale"
    ]
    declaration = inspect.Signature([*family[:3], *own, *family[3:]], return_annotation=Tensor)  # tensors, base, weight

    def merge(tensors: list[Tensor], base: Tensor, **kwargs: Any) -> Tensor:
        bound = declaration.bind(tensors, base, **kwargs)
        bound.apply_defaults()
        args = bound.arguments
        sparsifiers = None if sparsify is None else sparsify(tensors, **{p.name: args[p.name] for p in own})
        return combine_task_vectors(
            tensors, base, weight=args["weight"], lambda_=args["lambda_"], normalize=args["normalize"],
            consensus=consensus, sparsifiers=sparsifiers, rescale=args.get("rescale", False), dtype=args["dtype"],
            out_dtype=args["out_dtype"],
        )

    merge.__signature__ = declaration  # type: ignore[attr-defined]  # what merge_method reads
    return merge_method(name, base="required", elementwise=sparsify is None, summary=summary)(merge)


task_arithmetic = task_vector_method(
    "task_arithmetic", summary="Add weighted task vectors to the base (Ilharco et al., 2023)."
)
