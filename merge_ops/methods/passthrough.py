"""Passthrough: copy one input tensor unchanged (layer stacking / frankenmerges)."""
from __future__ import annotations

from torch import Tensor

from merge_ops.methods.declaration import PerModel, each, merge_method


@merge_method("passthrough", base="none", min_models=1, max_models=1, elementwise=True)
def passthrough(
    tensors: list[Tensor], base: Tensor | None, *, scale: PerModel[float] = each(1.0)  # noqa: B008
) -> Tensor:
    """Return the single input tensor, multiplied by ``scale`` when it is not 1."""
    return tensors[0] if scale[0] == 1.0 else tensors[0] * scale[0]
