"""Model Breadcrumbs: drop both the smallest and the largest task-vector entries (Davari & Belilovsky, 2023)."""
from __future__ import annotations

from torch import Tensor

from merge_ops.methods.declaration import Fraction, PerModel, each
from merge_ops.methods.sparsify import WholeTensor, magnitude_outliers
from merge_ops.methods.task_arithmetic import Sparsifier, task_vector_method


def outlier_trims(
    tensors: list[Tensor],
    *,
    density: PerModel[Fraction] = each(1.0),  # noqa: B008
    gamma: PerModel[Fraction] = each(0.01),  # noqa: B008
) -> list[Sparsifier]:
    """Keep a ``density`` fraction of each task vector: the largest entries but its top ``gamma`` outliers."""
    return [WholeTensor(magnitude_outliers(d, g)) for d, g in zip(density, gamma, strict=False)]


breadcrumbs = task_vector_method(
    "breadcrumbs", sparsify=outlier_trims,
    summary="Task arithmetic over task vectors without their smallest entries and top-``gamma`` outliers.",
)
breadcrumbs_ties = task_vector_method(
    "breadcrumbs_ties", sparsify=outlier_trims, consensus=True, summary="Breadcrumbs trimming followed by TIES sign election."
)
