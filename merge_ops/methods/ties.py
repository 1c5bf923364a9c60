"""TIES: trim by magnitude, elect signs, merge the agreeing entries (Yadav et al., 2023)."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.declaration import Fraction, PerModel, merge_method
from merge_ops.methods.sparsify import Magnitude
from merge_ops.methods.task_arithmetic import combine_task_vectors


@merge_method("ties", base="required")
def ties(
    tensors: list[Tensor],
    base: Tensor,
    *,
    weight: PerModel[float],
    density: PerModel[Fraction] = 1.0,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: bool = False,
    int8_mask: bool = False,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Keep each task vector's top-``density`` magnitudes, elect signs by weighted mass, average agreeing entries."""
    return combine_task_vectors(
        tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=True,
        sparsifiers=[Magnitude(d) for d in density], rescale=rescale, dtype=dtype, out_dtype=out_dtype,
    )
