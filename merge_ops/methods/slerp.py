"""Spherical linear interpolation between the base and one other model."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.blocks import block_slices, flat
from merge_ops.methods.declaration import Fraction, merge_method

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _norm(v: Tensor, work: torch.dtype) -> Tensor:
    """L2 norm as the norm of per-block norms (mergekit's order of operations)."""
    norm: Tensor = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v[s].to(work)) for s in block_slices(v.numel())]))
    return norm


@merge_method("slerp", base="required", min_models=1, max_models=1)
def slerp(
    tensors: list[Tensor], base: Tensor, *, t: Fraction, dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Interpolate along the great circle from the base (t=0) to the other model (t=1); lerp when nearly parallel.

    Computed in float32 (float64 for float64), block by block, with mergekit's order of operations:
    each vector divided by its norm before the dot product, coefficients in the working dtype. Each block
    of the result is rounded to ``out_dtype`` as it is made.
    """
    work = torch.float64 if (dtype or base.dtype) == torch.float64 else torch.float32
    v0, v1 = flat(base), flat(tensors[0])
    n0, n1 = _norm(v0, work), _norm(v1, work)
    n0, n1 = torch.where(n0 > EPS, n0, 1), torch.where(n1 > EPS, n1, 1)
    dot = torch.stack([((v0[s].to(work) / n0) * (v1[s].to(work) / n1)).sum() for s in block_slices(v0.numel())]).sum().clamp(-1, 1)
    step = torch.tensor(t, dtype=work)
    if dot.abs() > DOT_THRESHOLD:
        c0, c1 = 1 - step, step
    else:
        theta = torch.acos(dot)
        c0, c1 = torch.sin((1 - step) * theta) / torch.sin(theta), torch.sin(step * theta) / torch.sin(theta)
    rounded = dtype or base.dtype
    out = torch.empty_like(v0, dtype=out_dtype or rounded)
    for s in block_slices(v0.numel()):
        out[s] = (c0 * v0[s].to(work) + c1 * v1[s].to(work)).to(rounded)
    return out.view_as(base)
