"""DELLA: magnitude-ranked random pruning of task vectors (Deep et al., 2024)."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods import sparsify
from merge_ops.methods.declaration import Fraction, PerModel, merge_method
from merge_ops.methods.task_arithmetic import combine_task_vectors


def _della(tensors, base, generator, weight, density, epsilon, lambda_, normalize, rescale, consensus) -> Tensor:  # noqa: ANN001
    def prune(i: int, delta: Tensor) -> Tensor:
        kept = sparsify.della_magprune(delta, density[i], epsilon[i], generator)
        return sparsify.rescale_l1(delta, kept) if rescale else kept

    return combine_task_vectors(
        tensors, base, weight=weight, lambda_=lambda_, normalize=normalize, consensus=consensus, sparsify=prune
    )


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
) -> Tensor:
    """DELLA pruning, L1 rescale and TIES sign election."""
    return _della(tensors, base, generator, weight, density, epsilon, lambda_, normalize, rescale, consensus=True)


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
) -> Tensor:
    """DELLA pruning and L1 rescale, task vectors added linearly."""
    return _della(tensors, base, generator, weight, density, epsilon, lambda_, normalize, rescale, consensus=False)
