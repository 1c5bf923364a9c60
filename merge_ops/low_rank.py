"""Truncated SVD of a task vector: LoRA factors ``B @ A`` of a chosen rank, or of the smallest rank an error budget allows.

For ``D = U diag(s) V^T`` the best rank-k approximation in the Frobenius norm keeps the first k singular triplets
(Eckart-Young), and its relative error is ``sqrt(sum_{i >= k} s_i^2) / sqrt(sum_i s_i^2)``: the rank for a budget is
read off the singular values. The factors share the singular values evenly, ``B = U_k diag(sqrt(s_k))`` and
``A = diag(sqrt(s_k)) V_k^T``, which keeps both in the same range (bfloat16 friendly), and each singular vector's
sign is fixed (largest entry of ``u`` positive) so the factors do not depend on the LAPACK build's sign choice.
"""
from __future__ import annotations

import torch


def tail_errors(singular: torch.Tensor) -> torch.Tensor:
    """Relative Frobenius error of keeping the first k singular values, for k = 0 .. n (float64; 1 at k = 0, 0 at n).

    Example:
        >>> tail_errors(torch.tensor([4.0, 3.0])).tolist()
        [1.0, 0.6, 0.0]
    """
    energy = singular.double().square()
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return (tail / tail[0]).sqrt()


def rank_for_error(singular: torch.Tensor, max_error: float, max_rank: int | None = None) -> int:
    """The smallest rank >= 1 whose relative error is at most ``max_error``, capped at ``max_rank``.

    Example:
        >>> rank_for_error(torch.tensor([4.0, 3.0, 0.1]), 0.1)
        2
    """
    fits = (tail_errors(singular)[1:] <= max_error).nonzero()
    rank = int(fits[0]) + 1 if len(fits) else len(singular)
    return min(rank, max_rank or rank)


def low_rank_factors(
    delta: torch.Tensor, *, rank: int | None = None, max_error: float | None = None, max_rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, A, s)`` with ``B @ A`` the truncated SVD of the 2-D float ``delta`` ([out, in] -> B [out, r], A [r, in]) and
    ``s`` all its singular values; the rank is ``min(rank, min(delta.shape))``, or the one ``rank_for_error`` picks.

    Raises:
        ValueError: neither or both of ``rank`` and ``max_error``.

    Example:
        >>> b, a, s = low_rank_factors(torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.ones(2)), rank=1)
        >>> (b @ a).round().tolist()
        [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
    """
    if (rank is None) == (max_error is None):
        raise ValueError("give either rank or max_error")
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, len(s)) if rank is not None else rank_for_error(s, max_error or 0.0, max_rank)
    u, s_kept, vh = u[:, :keep], s[:keep], vh[:keep]
    largest = u.abs().argmax(dim=0)
    signs = torch.where(u[largest, torch.arange(keep, device=u.device)] < 0, -1.0, 1.0).to(u.dtype)
    root = s_kept.sqrt() * signs  # the sign flips u and v together, so B @ A is unchanged
    return u * root, root[:, None] * vh, s
