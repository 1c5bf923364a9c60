"""Karcher mean: the Riemannian barycentre of the models' directions on the unit sphere, scaled by their mean norm."""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from merge_ops.methods.declaration import NonNegative, merge_method


@merge_method("karcher", base="none", min_models=1)
def karcher(tensors: list[Tensor], base: None, *, max_iter: Annotated[int, Field(ge=0)] = 10, tol: NonNegative = 1e-5) -> Tensor:
    """Equal-weight Karcher mean (Riemannian barycentre) of the models' directions, scaled by the mean of their norms.

    The direction is the point of the unit sphere with the least mean squared great-circle distance to the directions
    ``u_i = x_i / |x_i|``: from their normalised mean, up to ``max_iter`` steps
    ``u <- exp_u(sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) u))``, stopping when the step is shorter than
    ``tol``. Vectors with ``|x_i| <= tol`` take no part in the direction (all of them: the result is 0) but count in
    the mean norm. Norms and step lengths in float32 (float64 for float64), the vectors in the input dtype, as
    mergekit computes them. The recipe's base model, if any, is one of the models.
    """
    if len(tensors) == 1:
        return tensors[0]
    work = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    alpha = 1.0 / len(tensors)
    norms = [torch.linalg.vector_norm(x.to(work)) for x in tensors]
    kept = [(x / n).to(x.dtype) for x, n in zip(tensors, norms, strict=True) if n.item() > tol]
    if not kept:
        return torch.zeros_like(tensors[0])
    share = alpha / sum([alpha] * len(kept))  # 1 / len(kept), rounded as mergekit rounds it
    mean = torch.zeros_like(kept[0])
    for u in kept:
        mean += share * u
    mean_norm = torch.linalg.vector_norm(mean.to(work))
    mean = kept[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for u in kept:
            cos = torch.dot(mean.flatten(), u.flatten()).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            step += share * (theta / torch.sin(theta)) * (u - cos * mean)
        length = torch.linalg.vector_norm(step.to(work))
        if length.item() < tol:
            break
        mean = (torch.cos(length) * mean + torch.sin(length) * (step / length)).to(mean.dtype)
        mean_norm = torch.linalg.vector_norm(mean.to(work))
        if mean_norm.item() > tol:
            mean = (mean / mean_norm).to(mean.dtype)
    scale = alpha * norms[0]  # summed in order, as mergekit sums them
    for n in norms[1:]:
        scale = scale + alpha * n
    merged: Tensor = scale * mean
    return merged
