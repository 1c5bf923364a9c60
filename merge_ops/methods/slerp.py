"""Spherical linear interpolation between the base and one other model."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from merge_ops.methods.declaration import Fraction, merge_method

DOT_THRESHOLD = 0.9995


def _unit(v: Tensor, eps: float = 1e-8) -> Tensor:
    norm = torch.linalg.vector_norm(v)
    return v / norm if norm > eps else v


@merge_method("slerp", base="required", min_models=1, max_models=1)
def slerp(tensors: list[Tensor], base: Tensor, *, t: Fraction) -> Tensor:
    """Interpolate along the great circle from the base (t=0) to the other model (t=1); lerp when nearly parallel."""
    v0, v1 = base, tensors[0]
    dot = float((_unit(v0) * _unit(v1)).sum())
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return (math.sin(theta - theta * t) / sin_theta) * v0 + (math.sin(theta * t) / sin_theta) * v1
