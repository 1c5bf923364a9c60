"""Model Breadcrumbs: drop both the smallest and the largest task-vector entries (Davari & Belilovsky, 2023)."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.declaration import Fraction, MergeMethod, PerModel, merge_method
from merge_ops.methods.sparsify import WholeTensor, magnitude_outliers
from merge_ops.methods.task_arithmetic import combine_task_vectors


def _breadcrumbs(name: str, *, consensus: bool, summary: str) -> MergeMethod:
    def method(
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
        out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        trims = [WholeTensor(magnitude_outliers(d, g)) for d, g in zip(density, gamma)]
        return combine_task_vectors(
            tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=consensus,
            sparsifiers=trims, rescale=rescale, dtype=dtype, out_dtype=out_dtype,
        )

    method.__doc__ = summary
    return merge_method(name, base="required")(method)


breadcrumbs = _breadcrumbs(
    "breadcrumbs", consensus=False,
    summary="Task arithmetic over task vectors without their smallest entries and top-``gamma`` outliers.",
)
breadcrumbs_ties = _breadcrumbs("breadcrumbs_ties", consensus=True, summary="Breadcrumbs trimming followed by TIES sign election.")
