"""Spherical linear interpolation between the base and one other model."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.blocks import block_slices, flat, in_order
from merge_ops.methods.declaration import Fraction, merge_method

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@merge_method("slerp", base="required", min_models=1, max_models=1)
def slerp(
    tensors: list[Tensor], base: Tensor, *, t: Fraction, dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Interpolate along the great circle from the base (t=0) to the other model (t=1); lerp when nearly parallel.

    Computed in float32 (float64 for float64), block by block, with mergekit's order of operations:
    each vector's norm is the norm of its per-block norms, each vector is divided by its norm before the
    dot product, coefficients are in the working dtype. Each block of the result is rounded to ``out_dtype``
    as it is made. The blocks of each pass run on two threads; per-block results are combined in order.
    """
    work = torch.float64 if (dtype or base.dtype) == torch.float64 else torch.float32
    v0, v1 = flat(base), flat(tensors[0])
    blocks = list(block_slices(v0.numel()))
    parallel = len(blocks) > 1

    def block_norms(s: slice) -> tuple[Tensor, Tensor]:
        return torch.linalg.vector_norm(v0[s].to(work)), torch.linalg.vector_norm(v1[s].to(work))

    norms = in_order(block_norms, blocks, parallel=parallel)
    n0, n1 = (torch.linalg.vector_norm(torch.stack([pair[i] for pair in norms])) for i in (0, 1))
    n0, n1 = torch.where(n0 > EPS, n0, 1), torch.where(n1 > EPS, n1, 1)

    def block_dot(s: slice) -> Tensor:
        return ((v0[s].to(work) / n0) * (v1[s].to(work) / n1)).sum()

    dot = torch.stack(in_order(block_dot, blocks, parallel=parallel)).sum().clamp(-1, 1)
    step = torch.tensor(t, dtype=work)
    if dot.abs() > DOT_THRESHOLD:
        c0, c1 = 1 - step, step
    else:
        theta = torch.acos(dot)
        c0, c1 = torch.sin((1 - step) * theta) / torch.sin(theta), torch.sin(step * theta) / torch.sin(theta)
    rounded = dtype or base.dtype
    out = torch.empty_like(v0, dtype=out_dtype or rounded)

    def block_out(s: slice) -> None:
        out[s] = (c0 * v0[s].to(work) + c1 * v1[s].to(work)).to(rounded)

    in_order(block_out, blocks, parallel=parallel)
    return out.view_as(base)
