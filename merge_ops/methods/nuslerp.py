"""NuSLERP: slerp between two models (or their task vectors) at ``t`` set by their weights, whole or per row."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.declaration import PerModel, merge_method

NORM_FLOOR = 1e-7
COLINEAR = 1e-8**2
"""``1 - cos^2`` at or below this (``|sin theta| <= 1e-8``): the vectors are parallel and are lerped."""


def _slerp_last_dim(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """Slerp each vector along the last dim of ``v0`` to the same one of ``v1``; lerp where parallel."""
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, spherical)


@merge_method("nuslerp", base="optional", min_models=2, max_models=2)
def nuslerp(
    tensors: list[Tensor], base: Tensor | None, *, weight: PerModel[float], nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False
) -> Tensor:
    """Slerp from the first model to the second at ``t = w2 / (w1 + w2)``; with a base, between the task vectors.

    ``nuslerp_flatten`` (default) treats the tensor as one vector; otherwise each vector runs along the
    last dim (one per row), or along dim 0 (one per column) when ``nuslerp_row_wise`` (mergekit's name).
    ``t`` is 0.5 when the weights sum to about 0.
    """
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    v0, v1 = (tensors[0], tensors[1]) if base is None else (tensors[0] - base, tensors[1] - base)
    if nuslerp_flatten:
        merged = _slerp_last_dim(t, v0.reshape(-1), v1.reshape(-1)).view_as(v0)
    elif nuslerp_row_wise:
        merged = _slerp_last_dim(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        merged = _slerp_last_dim(t, v0, v1)
    return merged if base is None else base + merged
