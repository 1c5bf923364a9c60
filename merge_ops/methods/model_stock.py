"""Model Stock: interpolate between the base and the average by the task vectors' agreement (Jang et al., 2024)."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.declaration import merge_method


def _mean_pairwise_cosine(offsets: Tensor) -> Tensor:
    unit = offsets / offsets.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    cosines = unit @ unit.transpose(-1, -2)
    n = offsets.shape[-2]
    pairs = torch.triu_indices(n, n, offset=1)
    return cosines[..., pairs[0], pairs[1]].mean(dim=-1)


@merge_method("model_stock", base="required", min_models=2)
def model_stock(tensors: list[Tensor], base: Tensor, *, filter_wise: bool = False) -> Tensor:
    """``t * mean(models) + (1 - t) * base`` with ``t = N cos / (1 + (N - 1) cos)``, whole tensor or per row."""
    stacked = torch.stack(tensors)
    offsets = stacked - base
    if filter_wise and base.dim() > 1:
        cos = _mean_pairwise_cosine(offsets.flatten(2).transpose(0, 1)).view(-1, *[1] * (base.dim() - 1))
    else:
        cos = _mean_pairwise_cosine(offsets.flatten(1))
    n = len(tensors)
    t = n * cos / (1 + (n - 1) * cos)
    return t * stacked.mean(dim=0) + (1 - t) * base
