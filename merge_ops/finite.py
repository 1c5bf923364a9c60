"""NaN and infinity in the tensors a merge reads and writes: counted cheaply enough to check every block while streaming."""
from __future__ import annotations

import math

import torch


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
