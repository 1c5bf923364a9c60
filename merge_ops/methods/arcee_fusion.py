"""Arcee Fusion: take the other model's changes only where they matter most (Arcee AI, mergekit)."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.declaration import merge_method

QUANTILE_SAMPLE = 1_000_000
"""Quartiles of a larger tensor's importance come from this many entries drawn with replacement (mergekit's size)."""


def quartiles(values: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """The entries at ranks ``(n - 1) // 4``, ``// 2`` and ``3 (n - 1) // 4`` of the sorted values (lower quartile,
    median, upper quartile), of a seeded sample when there are more than ``QUANTILE_SAMPLE``."""
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator).to(flat.device)]
    ordered = flat.sort().values
    last = ordered.numel() - 1
    return ordered[last // 4], ordered[last // 2], ordered[3 * last // 4]


@merge_method("arcee_fusion", base="required", min_models=1, max_models=1)
def arcee_fusion(tensors: list[Tensor], base: Tensor, *, generator: torch.Generator) -> Tensor:
    """Add the other model's change where its importance, the change's size times its row's softmax KL divergence, is an outlier.

    Importance is ``abs(x - base) * KL(softmax(x) + 1e-8 || softmax(base) + 1e-8)``, the KL divergence taken
    along the last dimension (one value per row); an entry is an outlier at or above ``median + 1.5 * (q3 - q1)``
    of the tensor's importances. The quartiles are exact
    up to ``QUANTILE_SAMPLE`` entries and estimated from a seeded sample above that.
    """
    other = tensors[0]
    delta = other - base
    p, q = torch.softmax(other, dim=-1) + 1e-8, torch.softmax(base, dim=-1) + 1e-8
    importance = delta.abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    q1, median, q3 = quartiles(importance, generator)
    return base + delta * (importance >= median + 1.5 * (q3 - q1))
