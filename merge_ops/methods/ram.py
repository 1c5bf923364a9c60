"""RAM: Reinforced Agent Merging, and RAM+ with a tensor-local boost of entries one model alone changed (arXiv 2601.13572)."""
from __future__ import annotations

import torch
from torch import Tensor

from merge_ops.methods.declaration import NonNegative, merge_method


def changes(tensors: list[Tensor], base: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """Which entries each model changed (``|x_i - base| > epsilon``, one row per model) and its task vector
    with the other entries zeroed."""
    deltas = torch.stack([x - base for x in tensors]).reshape(len(tensors), -1)
    changed = deltas.abs() > epsilon
    return changed, deltas * changed


def combine(kept: Tensor, count: Tensor, base: Tensor, boost: Tensor | None = None) -> Tensor:
    """``base + sum_i`` of each kept entry: whole (times the model's ``boost``) where only its model changed it
    (``count == 1``), divided by ``count`` where several did."""
    alone = kept * (count == 1)
    if boost is not None:
        alone = alone * boost.unsqueeze(-1)
    shared = kept * (count > 1) / count.clamp(min=1)
    return base + (alone + shared).sum(dim=0).view_as(base)


@merge_method("ram", base="required", elementwise=True)
def ram(tensors: list[Tensor], base: Tensor, *, epsilon: NonNegative = 1e-5) -> Tensor:
    """Task-vector entries that one model alone changed (by more than ``epsilon``) are added whole, the others averaged."""
    changed, kept = changes(tensors, base, epsilon)
    return combine(kept, changed.sum(dim=0), base)


@merge_method("ramplus_tl", base="required")
def ramplus_tl(
    tensors: list[Tensor], base: Tensor, *, r: float = 0.1, alpha: NonNegative = 0.2, epsilon: NonNegative = 1e-5
) -> Tensor:
    """RAM, each model's unshared entries scaled by ``1 + r * clamp(shared / unshared, 0, alpha)``, counted per tensor.

    ``shared`` and ``unshared`` count the entries the model changed that other models also changed, or not
    (``unshared`` at least ``epsilon``). The boosts are float32, so a bfloat16 merge is mixed in float32 and
    rounded once, as mergekit does.
    """
    changed, kept = changes(tensors, base, epsilon)
    count = changed.sum(dim=0)
    shared, alone = (changed & (count > 1)).sum(dim=1), (changed & (count == 1)).sum(dim=1)
    boost = 1 + r * (shared / alone.clamp(min=epsilon)).clamp(min=0, max=alpha)
    return combine(kept, count, base, boost).to(base.dtype)
