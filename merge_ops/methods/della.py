"""DELLA: magnitude-ranked random pruning of task vectors (Deep et al., 2024)."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.sparsify import WholeTensor, della_magprune
from merge_ops.methods.declaration import Fraction, PerModel, merge_method
from merge_ops.methods.task_arithmetic import combine_task_vectors, model_seeds


@merge_method("della", base="required")
def della(
    tensors: list[Tensor],
    base: Tensor,
    *,
    generator: torch.Generator,
    weight: PerModel[float],
    density: PerModel[Fraction] = 1.0,
    epsilon: PerModel[Fraction] = 0.15,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: bool = True,
    int8_mask: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """DELLA pruning, L1 rescale and TIES sign election."""
    seeds = model_seeds(generator, len(tensors))
    prunes = [WholeTensor(della_magprune(d, e, s)) for d, e, s in zip(density, epsilon, seeds)]
    return combine_task_vectors(
        tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=True, sparsifiers=prunes, rescale=rescale, dtype=dtype
    )


@merge_method("della_linear", base="required")
def della_linear(
    tensors: list[Tensor],
    base: Tensor,
    *,
    generator: torch.Generator,
    weight: PerModel[float],
    density: PerModel[Fraction] = 1.0,
    epsilon: PerModel[Fraction] = 0.15,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """DELLA pruning and L1 rescale, task vectors added linearly."""
    seeds = model_seeds(generator, len(tensors))
    prunes = [WholeTensor(della_magprune(d, e, s)) for d, e, s in zip(density, epsilon, seeds)]
    return combine_task_vectors(
        tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=False, sparsifiers=prunes, rescale=rescale, dtype=dtype
    )
