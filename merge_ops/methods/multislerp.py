"""Multi-SLERP: a weighted barycentre of many models on the hypersphere (tangent space at their mean direction)."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.declaration import NonNegative, PerModel, merge_method


@merge_method("multislerp", base="optional", min_models=1, normalized_by="normalize_weights")
def multislerp(
    tensors: list[Tensor], base: Tensor | None, *, weight: PerModel[float], normalize_weights: bool = True, eps: NonNegative = 1e-8
) -> Tensor:
    """Average the models' directions on the sphere and scale by their weighted norms; with a base, their task vectors.

    Each flattened (task) vector ``x_i`` becomes ``u_i = x_i / (|x_i| + eps)``; ``m`` = the normalised weighted sum of
    the ``u_i``; the weighted sum ``T`` of their tangents ``u_i - (u_i . m) m`` is mapped back as
    ``m cos|T| + T sin|T| / |T|`` and scaled by ``sum w_i |x_i|``. Weights are divided by their sum when
    ``normalize_weights``. One model is returned as it is.

    Raises:
        ValueError: the weighted directions cancel out (``|sum w_i u_i| < eps``) for more than two models;
            two models are then mixed linearly.
    """
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(tensors)
    if base is not None:
        stacked -= base
    vectors = stacked.view(len(tensors), -1)
    w = torch.tensor(weight, dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
    units = vectors / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) > 2:
            raise ValueError("the weighted directions of the models cancel out (e.g. x and -x with equal weights); change the weights")
        merged = stacked[0] * w[0] + stacked[1] * w[1]
    else:
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        tangent = (tangents * w.view(-1, 1)).sum(0)
        length = torch.linalg.vector_norm(tangent) + eps
        direction = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
        merged = (direction * (norms.squeeze(-1) * w).sum()).view_as(tensors[0])
    return merged if base is None else merged + base
