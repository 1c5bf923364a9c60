"""NaN and infinity in the tensors a merge reads and writes: counted cheaply enough to check every block while streaming."""
from __future__ import annotations

import math

import torch

from merge_ops.errors import NonFiniteError


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many entries of ``tensor`` are NaN or infinite (0 for integer tensors).

    One min/max pass (NaN and infinities always reach the minimum or the maximum; several times faster than
    ``torch.isfinite``, and no overflow as a sum could have); the exact count only when there are some.

    Example:
        >>> nonfinite_count(torch.tensor([1.0, float("nan"), float("inf")]))
        2
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    low, high = torch.aminmax(tensor)
    if math.isfinite(low.item()) and math.isfinite(high.item()):
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum().item())


def check_finite(tensor: torch.Tensor, name: str, *, model: str | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """``tensor``, if it holds no NaN or infinity.

    Args:
        tensor, name: the tensor (or the block ``rows`` of it) and its name.
        model: the model it was read from; None for a tensor the merge made.

    Raises:
        NonFiniteError: naming the model (or the merge), the tensor and how many values are not finite.
    """
    if count := nonfinite_count(tensor):
        raise NonFiniteError(name, count, model=model, rows=rows)
    return tensor
