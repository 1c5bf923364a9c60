"""Nearswap: take the other model's value where it is close to the base."""
from __future__ import annotations

from torch import Tensor

from merge_ops.methods.declaration import NonNegative, merge_method


@merge_method("nearswap", base="required", min_models=1, max_models=1, elementwise=True)
def nearswap(tensors: list[Tensor], base: Tensor, *, t: NonNegative) -> Tensor:
    """Blend towards the other model by ``clamp(t / |base - other|, 0, 1)`` per element."""
    other = tensors[0]
    w = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * other + (1 - w) * base
