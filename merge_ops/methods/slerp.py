"""Spherical linear interpolation between the base and one other model."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from merge_ops.methods.blocks import block_slices, flat
from merge_ops.methods.declaration import Fraction, merge_method

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _norms_and_dot(v0: Tensor, v1: Tensor) -> tuple[float, float, float]:
    """||v0||, ||v1|| and v0 . v1 of two flat tensors, accumulated block by block in float64."""
    s00 = s11 = s01 = 0.0
    for s in block_slices(v0.numel()):
        a, b = v0[s].double(), v1[s].double()
        s00 += float(a @ a)
        s11 += float(b @ b)
        s01 += float(a @ b)
    return math.sqrt(s00), math.sqrt(s11), s01


@merge_method("slerp", base="required", min_models=1, max_models=1)
def slerp(tensors: list[Tensor], base: Tensor, *, t: Fraction, dtype: torch.dtype | None = None) -> Tensor:
    """Interpolate along the great circle from the base (t=0) to the other model (t=1); lerp when nearly parallel."""
    dtype = dtype or base.dtype
    v0, v1 = flat(base), flat(tensors[0])
    n0, n1, dot = _norms_and_dot(v0, v1)
    cosine = dot / ((n0 if n0 > EPS else 1.0) * (n1 if n1 > EPS else 1.0))
    if abs(cosine) > DOT_THRESHOLD:
        c0, c1 = 1 - t, t
    else:
        theta = math.acos(cosine)
        c0, c1 = math.sin(theta - theta * t) / math.sin(theta), math.sin(theta * t) / math.sin(theta)
    out = torch.empty_like(v0, dtype=dtype)
    for s in block_slices(v0.numel()):
        out[s] = v0[s].to(dtype) * c0 + v1[s].to(dtype) * c1
    return out.view_as(base)
