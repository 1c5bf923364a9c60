"""DELLA: magnitude-ranked random pruning of task vectors (Deep et al., 2024)."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.declaration import Fraction, MergeMethod, PerModel, merge_method
from merge_ops.methods.sparsify import WholeTensor, della_magprune
from merge_ops.methods.task_arithmetic import combine_task_vectors, model_seeds


def _della(name: str, *, consensus: bool, normalize_default: bool, summary: str) -> MergeMethod:
    def method(
        tensors: list[Tensor],
        base: Tensor,
        *,
        generator: torch.Generator,
        weight: PerModel[float],
        density: PerModel[Fraction] = 1.0,
        epsilon: PerModel[Fraction] = 0.15,
        lambda_: float = 1.0,
        normalize: bool = normalize_default,
        rescale: bool = True,
        int8_mask: bool = False,
        dtype: torch.dtype | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        seeds = model_seeds(generator, len(tensors))
        prunes = [WholeTensor(della_magprune(d, e, s)) for d, e, s in zip(density, epsilon, seeds)]
        return combine_task_vectors(
            tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=consensus,
            sparsifiers=prunes, rescale=rescale, dtype=dtype, out_dtype=out_dtype,
        )

    method.__doc__ = summary
    return merge_method(name, base="required")(method)


della = _della("della", consensus=True, normalize_default=True, summary="DELLA pruning, L1 rescale and TIES sign election.")
della_linear = _della(
    "della_linear", consensus=False, normalize_default=False, summary="DELLA pruning and L1 rescale, task vectors added linearly."
)
