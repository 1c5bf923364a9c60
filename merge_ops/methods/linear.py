"""Linear merge / model soup (Wortsman et al., 2022)."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.declaration import PerModel, merge_method


@merge_method("linear", base="none")
def linear(tensors: list[Tensor], base: Tensor | None, *, weight: PerModel[float], normalize: bool = True) -> Tensor:
    """Weighted sum of the models, divided by the sum of weights when ``normalize``."""
    weights = torch.tensor(weight, dtype=tensors[0].dtype, device=tensors[0].device)
    mixed = (torch.stack(tensors) * weights.view(-1, *[1] * tensors[0].dim())).sum(dim=0)
    return mixed / weights.sum() if normalize else mixed
