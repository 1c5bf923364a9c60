"""TIES: trim by magnitude, elect signs, merge the agreeing entries (Yadav et al., 2023)."""
from __future__ import annotations

from torch import Tensor

from merge_ops.methods.declaration import Fraction, PerModel, each
from merge_ops.methods.sparsify import Magnitude
from merge_ops.methods.task_arithmetic import Sparsifier, task_vector_method


def top_magnitudes(
    tensors: list[Tensor], *, density: PerModel[Fraction] = each(1.0)  # noqa: B008
) -> list[Sparsifier]:
    """Keep the top ``density`` fraction of each task vector's entries by magnitude."""
    return [Magnitude(d) for d in density]


ties = task_vector_method(
    "ties", sparsify=top_magnitudes, consensus=True, normalize=True,
    summary="Keep each task vector's top-``density`` magnitudes, elect signs by weighted mass, average agreeing entries.",
)
