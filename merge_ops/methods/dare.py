"""DARE: drop task-vector entries at random and rescale (Yu et al., 2023), with or without TIES signs."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.declaration import Fraction, MergeMethod, PerModel, merge_method
from merge_ops.methods.sparsify import RandomDrop
from merge_ops.methods.task_arithmetic import combine_task_vectors, model_seeds


def _dare(name: str, *, consensus: bool, summary: str) -> MergeMethod:
    def method(
        tensors: list[Tensor],
        base: Tensor,
        *,
        generator: torch.Generator,
        weight: PerModel[float],
        density: PerModel[Fraction] = 1.0,
        lambda_: float = 1.0,
        normalize: bool = False,
        rescale: bool = True,
        int8_mask: bool = False,
        dtype: torch.dtype | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        drops = [RandomDrop(d, s) for d, s in zip(density, model_seeds(generator, len(tensors)))]
        return combine_task_vectors(
            tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=consensus,
            sparsifiers=drops, rescale=rescale, dtype=dtype, out_dtype=out_dtype,
        )

    method.__doc__ = summary
    return merge_method(name, base="required")(method)


dare_ties = _dare(
    "dare_ties", consensus=True,
    summary="Randomly drop task-vector entries, rescale to the original L1 norm, merge with TIES sign election.",
)
dare_linear = _dare(
    "dare_linear", consensus=False,
    summary="Randomly drop task-vector entries, rescale to the original L1 norm, add them up linearly.",
)
