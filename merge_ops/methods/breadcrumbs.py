"""Model Breadcrumbs: drop both the smallest and the largest task-vector entries (Davari & Belilovsky, 2023)."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.sparsify import WholeTensor, magnitude_outliers
from merge_ops.methods.declaration import Fraction, PerModel, merge_method
from merge_ops.methods.task_arithmetic import combine_task_vectors


@merge_method("breadcrumbs", base="required")
def breadcrumbs(
    tensors: list[Tensor],
    base: Tensor,
    *,
    weight: PerModel[float],
    density: PerModel[Fraction] = 1.0,
    gamma: PerModel[Fraction] = 0.01,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Task arithmetic over task vectors without their smallest entries and top-``gamma`` outliers."""
    trims = [WholeTensor(magnitude_outliers(d, g)) for d, g in zip(density, gamma)]
    return combine_task_vectors(
        tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=False, sparsifiers=trims, rescale=rescale, dtype=dtype
    )


@merge_method("breadcrumbs_ties", base="required")
def breadcrumbs_ties(
    tensors: list[Tensor],
    base: Tensor,
    *,
    weight: PerModel[float],
    density: PerModel[Fraction] = 1.0,
    gamma: PerModel[Fraction] = 0.01,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Breadcrumbs trimming followed by TIES sign election."""
    trims = [WholeTensor(magnitude_outliers(d, g)) for d, g in zip(density, gamma)]
    return combine_task_vectors(
        tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=True, sparsifiers=trims, rescale=rescale, dtype=dtype
    )
