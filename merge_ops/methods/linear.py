"""Linear merge / model soup (Wortsman et al., 2022)."""
from __future__ import annotations

from torch import Tensor

from merge_ops.methods.declaration import PerModel, merge_method


@merge_method("linear", base="none", elementwise=True, normalized_by="normalize")
def linear(tensors: list[Tensor], base: Tensor | None, *, weight: PerModel[float], normalize: bool = True) -> Tensor:
    """Weighted sum of the models, divided by the sum of weights when ``normalize``."""
    mixed = tensors[0] * weight[0]
    for x, w in zip(tensors[1:], weight[1:], strict=True):
        mixed += x * w
    return mixed / sum(weight) if normalize else mixed
