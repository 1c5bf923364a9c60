"""Model Stock: interpolate between the base and the average by the task vectors' agreement (Jang et al., 2024)."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.declaration import merge_method


@merge_method("model_stock", base="required", min_models=2)
def model_stock(tensors: list[Tensor], base: Tensor, *, filter_wise: bool = False) -> Tensor:
    """``t * mean(models) + (1 - t) * base`` with ``t = N cos / (1 + (N - 1) cos)``, whole tensor or per row.

    ``cos`` is the mean pairwise cosine of the offsets from the base (each clamped to [-1, 1]);
    where ``1 + (N - 1) cos`` is near zero there is no finite estimate and the base is kept.
    """
    def rows(x: Tensor) -> Tensor:  # the vectors compared: one per row, or the whole tensor
        return x.reshape(-1, x.shape[-1]) if filter_wise and base.dim() > 0 else x.reshape(1, -1)

    w0 = rows(base)
    offsets = [rows(x) - w0 for x in tensors]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(tensors)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(rows(x) for x in tensors) / n
    return (t * average + (1 - t) * w0).view_as(base)
