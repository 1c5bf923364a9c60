"""Sparsifiers for task vectors: each keeps part of a delta and zeroes the rest.

Random sparsifiers draw their masks on the CPU from the given generator, so a tensor's mask is
the same on every device, worker and process.
"""
from __future__ import annotations

import torch
from torch import Tensor


def magnitude(delta: Tensor, density: float) -> Tensor:
    """Keep exactly the ``int(density * numel)`` largest-magnitude entries (TIES trim).

    Ties at the threshold go to the lower flat index, as a stable descending sort would.
    """
    flat = delta.abs().flatten()
    n = flat.numel()
    k = int(density * n)
    if density >= 1 or k >= n:
        return delta
    if k <= 0:
        raise ValueError(f"density {density} keeps no element of a tensor with {n} elements; raise density")
    threshold = flat.kthvalue(n - k + 1).values
    keep = flat > threshold
    missing = k - int(keep.sum())
    if missing:
        at_threshold = flat == threshold
        keep |= at_threshold & (at_threshold.cumsum(0) <= missing)
    return delta * keep.view_as(delta)


def bernoulli_mask(shape: torch.Size, keep_probability: float | Tensor, generator: torch.Generator) -> Tensor:
    """A CPU boolean mask with each entry kept with the given probability."""
    return torch.rand(shape, generator=generator) < keep_probability


def random(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Keep each entry with probability ``density`` (DARE drop)."""
    if density >= 1:
        return delta
    return delta * bernoulli_mask(delta.shape, density, generator).to(delta.device)


def magnitude_outliers(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Drop the smallest entries and the top ``gamma`` fraction of outliers (Model Breadcrumbs).

    With ``int(gamma * numel) == 0`` it keeps everything up to the largest entry.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    n_top = int(gamma * n)
    n_bottom = n - int(density * n) - n_top
    if n_bottom < 0:
        n_top, n_bottom = n_top + n_bottom, 0
    order = delta.abs().flatten().argsort(stable=True)
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    keep[order[n_bottom : n - n_top]] = True
    return delta * keep.view_as(delta)


def della_magprune(delta: Tensor, density: float, epsilon: float, generator: torch.Generator) -> Tensor:
    """Keep entries with a probability that grows with their magnitude rank in their row (DELLA)."""
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"della needs 0 < density - epsilon and density + epsilon < 1, got {density=} {epsilon=}")
    rows = delta.reshape(1, -1) if delta.dim() == 1 else delta.reshape(delta.shape[0], -1)
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).float()
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    scaled = ((ranks - low) / (high - low)).clamp(0, 1)
    probability = (density - epsilon) + 2 * epsilon * scaled
    mask = bernoulli_mask(rows.shape, probability.cpu(), generator).to(delta.device)
    return (rows * mask).view_as(delta)


def rescale_l1(original: Tensor, kept: Tensor) -> Tensor:
    """Scale ``kept`` so its L1 norm equals the original's (mergekit's rescale, not 1/density)."""
    norm_original = original.abs().sum(dtype=torch.float32)
    norm_kept = kept.abs().sum(dtype=torch.float32)
    if norm_original < 1e-7 or norm_kept < 1e-7:
        return kept
    return kept * (norm_original / norm_kept).to(kept.dtype)
