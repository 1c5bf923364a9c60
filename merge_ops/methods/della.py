"""DELLA: magnitude-ranked random pruning of task vectors (Deep et al., 2024)."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.declaration import Fraction, PerModel, each
from merge_ops.methods.sparsify import WholeTensor, della_magprune
from merge_ops.methods.task_arithmetic import (
    Sparsifier,
    model_seeds,
    task_vector_method,
)


def magprunes(
    tensors: list[Tensor],
    *,
    generator: torch.Generator,
    density: PerModel[Fraction] = each(1.0),  # noqa: B008
    epsilon: PerModel[Fraction] = each(0.15),  # noqa: B008
) -> list[Sparsifier]:
    """Keep entries with probability ``density - epsilon`` to ``density + epsilon`` by magnitude rank in their row."""
    seeds = model_seeds(generator, len(tensors))
    return [WholeTensor(della_magprune(d, e, s)) for d, e, s in zip(density, epsilon, seeds, strict=False)]


della = task_vector_method(
    "della", sparsify=magprunes, consensus=True, normalize=True, rescale=True,
    summary="DELLA pruning, L1 rescale and TIES sign election.",
)
della_linear = task_vector_method(
    "della_linear", sparsify=magprunes, rescale=True, summary="DELLA pruning and L1 rescale, task vectors added linearly."
)
