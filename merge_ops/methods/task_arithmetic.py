"""Task arithmetic, and the shared core of its family (TIES, DARE, breadcrumbs, DELLA)."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from merge_ops.methods.blocks import block_slices, flat
from merge_ops.methods.declaration import PerModel, merge_method


class Sparsifier(Protocol):
    def prepare(self, deltas: "object", shape: torch.Size) -> None: ...
    def mask(self, delta: Tensor) -> Tensor | None: ...


def _l1_rescale(sparsifier: Sparsifier, deltas: "object") -> tuple[float, list[Tensor | None]]:
    """mergekit's rescale factor (the kept entries get the delta's full L1 norm), and the masks it drew.

    The masks are kept (one byte per element) so that merging reuses them instead of drawing them again.
    """
    total = kept = 0.0
    masks = []
    for delta in deltas():
        mask = sparsifier.mask(delta)
        magnitude = delta.abs()
        total += float(magnitude.sum(dtype=torch.float32))
        kept += float((magnitude if mask is None else magnitude * mask).sum(dtype=torch.float32))
        masks.append(mask)
    return (total / kept if total >= 1e-7 and kept >= 1e-7 else 1.0), masks


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
) -> Tensor:
    """``base + lambda * mix(w_i * sparsify(x_i - base))``, with optional TIES sign consensus.

    Steps and order follow merge-methods.md: each delta is sparsified on its own (L1-rescaled
    when ``rescale``), weights are applied before the sign vote, a zero vote counts as positive,
    and the ``normalize`` divisor sums the weights of agreeing entries (all weights without
    consensus). Computed in cache-sized blocks, in ``dtype`` (default: the base's); whole-tensor
    statistics come first.
    """
    dtype = dtype or base.dtype
    if not tensors:
        return base.to(dtype)
    base_flat, inputs = flat(base), [flat(x) for x in tensors]
    scales = [1.0] * len(tensors)
    drawn: list[list[Tensor | None] | None] = [None] * len(tensors)
    for i, sparsifier in enumerate(sparsifiers or []):
        deltas = lambda x=inputs[i]: (x[s].to(dtype) - base_flat[s].to(dtype) for s in block_slices(base.numel()))  # noqa: E731
        sparsifier.prepare(deltas, base.shape)
        if rescale:
            scales[i], drawn[i] = _l1_rescale(sparsifier, deltas)
    out = torch.empty_like(base_flat, dtype=dtype)
    weights = torch.tensor(weight, dtype=dtype)  # in the working dtype, as mergekit does
    for b, s in enumerate(block_slices(base.numel())):
        base_block = base_flat[s].to(dtype)
        weighted = []
        for i, x in enumerate(inputs):
            delta = x[s].to(dtype) - base_block
            masks = drawn[i]
            mask = masks[b] if masks is not None else sparsifiers[i].mask(delta) if sparsifiers else None
            if mask is not None:
                delta *= mask
            if scales[i] != 1.0:
                delta *= scales[i]
            weighted.append(delta * weights[i])
        stacked = torch.stack(weighted)
        if consensus:
            majority = (stacked.sum(dim=0) >= 0).to(dtype) * 2 - 1
            agree = ((stacked * majority) > 0).to(dtype)  # same non-zero sign as the majority
            mixed = (stacked * agree).sum(dim=0)
            divisor = (agree * weights.view(-1, 1)).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = stacked.sum(dim=0)
            total = weights.sum()
            divisor = torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
        if normalize:
            mixed /= divisor
        out[s] = base_block + mixed * lambda_
    return out.view_as(base)


def model_seeds(generator: torch.Generator, count: int) -> list[int]:
    """One seed per input model, drawn in order from the tensor's generator."""
    return [int(torch.randint(0, 2**62, (1,), generator=generator)) for _ in range(count)]


@merge_method("task_arithmetic", base="required", elementwise=True)
def task_arithmetic(
    tensors: list[Tensor],
    base: Tensor,
    *,
    weight: PerModel[float],
    lambda_: float = 1.0,
    normalize: bool = False,
    int8_mask: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Add weighted task vectors to the base (Ilharco et al., 2023)."""
    return combine_task_vectors(
        tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=False, dtype=dtype
    )
