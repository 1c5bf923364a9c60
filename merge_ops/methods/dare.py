"""DARE: drop task-vector entries at random and rescale (Yu et al., 2023), with or without TIES signs."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.declaration import Fraction, PerModel, each
from merge_ops.methods.sparsify import RandomDrop
from merge_ops.methods.task_arithmetic import (
    Sparsifier,
    model_seeds,
    task_vector_method,
)


def random_drops(
    tensors: list[Tensor], *, generator: torch.Generator, density: PerModel[Fraction] = each(1.0)  # noqa: B008
) -> list[Sparsifier]:
    """Keep each entry with probability ``density``, from one seed per model."""
    return [RandomDrop(d, s) for d, s in zip(density, model_seeds(generator, len(tensors)), strict=False)]


dare_ties = task_vector_method(
    "dare_ties", sparsify=random_drops, consensus=True, rescale=True,
    summary="Randomly drop task-vector entries, rescale to the original L1 norm, merge with TIES sign election.",
)
dare_linear = task_vector_method(
    "dare_linear", sparsify=random_drops, rescale=True,
    summary="Randomly drop task-vector entries, rescale to the original L1 norm, add them up linearly.",
)
