"""Task arithmetic, and the shared core of its family (TIES, DARE, breadcrumbs, DELLA)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from merge_ops.methods.declaration import PerModel, merge_method

Sparsifier = Callable[[int, Tensor], Tensor]


def combine_task_vectors(
    tensors: list[Tensor],
    base: Tensor,
    *,
    weight: list[float],
    lambda_: float,
    normalize: bool,
    consensus: bool,
    sparsify: Sparsifier | None = None,
) -> Tensor:
    """``base + lambda * mix(w_i * sparsify(x_i - base))``, with optional TIES sign consensus.

    The steps and their order follow ../shared merge-methods.md: weights are applied before the
    sign vote; a zero vote counts as positive; the divisor for ``normalize`` sums the weights of
    the entries that agree (or all weights without consensus).
    """
    weighted = []
    for i, (x, w) in enumerate(zip(tensors, weight, strict=True)):
        delta = x - base
        weighted.append((sparsify(i, delta) if sparsify else delta) * w)
    if not weighted:
        return base
    if consensus:
        positive = torch.stack(weighted).sum(dim=0) >= 0
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for wd, w in zip(weighted, weight):
            agree = torch.where(positive, wd > 0, wd < 0)
            mixed += wd * agree
            divisor += w * agree
        divisor[divisor == 0] = 1
    else:
        mixed = torch.stack(weighted).sum(dim=0)
        total = sum(weight)
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, dtype=base.dtype, device=base.device)
    if normalize:
        mixed = mixed / divisor
    return base + mixed * lambda_


@merge_method("task_arithmetic", base="required", elementwise=True)
def task_arithmetic(
    tensors: list[Tensor],
    base: Tensor,
    *,
    weight: PerModel[float],
    lambda_: float = 1.0,
    normalize: bool = False,
    int8_mask: bool = False,
) -> Tensor:
    """Add weighted task vectors to the base (Ilharco et al., 2023)."""
    return combine_task_vectors(tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=False)
