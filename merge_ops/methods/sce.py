"""SCE: select task-vector entries by variance, calculate weights from their mass, erase sign conflicts (Wan et al., 2024)."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.declaration import Fraction, merge_method
from merge_ops.methods.sparsify import Magnitude, sparsified
from merge_ops.methods.task_arithmetic import elect_signs


def high_variance(deltas: Tensor, fraction: float) -> Tensor:
    """1 at the ``int(count_nonzero(var) * fraction)`` entries whose variance across the models (dim 0) is largest
    (ties to the lower index, as the TIES trim keeps them), 0 elsewhere; in the deltas' dtype."""
    variance = torch.var(deltas, dim=0, unbiased=False)
    count = int(torch.count_nonzero(variance) * fraction)  # a float32 product, as mergekit's
    if count == 0:
        return torch.zeros_like(variance)
    return sparsified(Magnitude(fraction, count), variance).ne_(0)  # the kept variances are > 0


@merge_method("sce", base="required")
def sce(tensors: list[Tensor], base: Tensor, *, select_topk: Fraction = 1.0) -> Tensor:
    """Keep the top-``select_topk`` task-vector entries by variance across models, elect signs, mix by mean-square weights.

    Weights are ``mean(d_i^2) / sum_j mean(d_j^2)`` (uniform when that sum is below 1e-6); each entry is the
    weighted mean of the task vectors agreeing with the elected sign (the TIES vote on the unweighted deltas).
    """
    deltas = torch.stack([x - base for x in tensors])
    if select_topk < 1:
        deltas *= high_variance(deltas, select_topk)
    rows = deltas.reshape(len(tensors), -1)
    mass = rows.square().mean(dim=1)
    total = float(mass.sum())
    weights = torch.ones_like(mass) / len(mass) if abs(total) < 1e-6 else mass / total
    kept = weights.unsqueeze(1) * elect_signs(rows)
    merged = (rows * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)
    return base + merged.view_as(base)
