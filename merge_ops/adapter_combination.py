"""PEFT's combination types for merging LoRA adapters into one adapter: the math of one module, no I/O.

Every adapter ``i`` adds ``scale_i * B_i @ A_i`` to a module (``A``: rank x in, ``B``: out x rank; embeddings the
same, transposed when applied). With recipe weights ``w_i`` the combination types of PEFT's
``add_weighted_adapter`` make one ``(A, B)`` per module:

- ``cat``: ``A = [w_i scale_i A_i]`` stacked by rows, ``B = [B_i]`` by columns, so ``B @ A = sum w_i scale_i B_i @ A_i``
  exactly; the rank is the sum of the adapters' ranks.
- factor space (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): the ``A_i`` are combined
  with coefficients ``sign(c_i) sqrt(|c_i|)`` and the ``B_i`` with ``sqrt(|c_i|)``, ``c_i = w_i scale_i``, by the
  type's task-arithmetic preset; ranks must be equal.
- ``*_svd`` types and ``svd``: the same presets on the full updates ``scale_i B_i @ A_i`` with weights ``w_i``, then
  the best rank-``svd_rank`` factorisation (SVD; factors defined up to sign), optionally clamped to the
  ``svd_clamp`` quantile of their entries.

Presets (PEFT's semantics, which differ from mergekit's: the sign vote uses the unweighted values and agreeing
entries are averaged by count, DARE rescales by ``1/density``): ``ties`` = top-``density`` magnitudes + sign
election + disjoint mean; ``dare_linear`` = Bernoulli(``density``) keep mask, ``/ density``, weighted sum;
``dare_ties`` = that mask + sign election + disjoint mean; ``magnitude_prune`` = top magnitudes + weighted sum.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, StrictBool
from torch import Tensor


@dataclass(frozen=True)
class Combination:
    """One combination type: how each input is sparsified, whether signs are elected, where it combines."""

    sparsify: Literal["magnitude", "random"] | None = None
    sign_election: bool = False
    space: Literal["factors", "svd", "cat"] = "factors"

    @property
    def parameters(self) -> tuple[str, ...]:
        """The recipe parameters (top-level ``parameters``) this type reads."""
        names: tuple[str, ...] = ("density",) if self.sparsify else ()
        names += ("majority_sign_method",) if self.sign_election else ()
        return names + (SVD_PARAMETERS if self.space == "svd" else ())

    @property
    def required(self) -> tuple[str, ...]:
        return ("density",) if self.sparsify else ()


SVD_PARAMETERS = ("svd_rank", "svd_clamp", "svd_full_matrices", "svd_driver")
_TIES, _DARE_LINEAR = Combination("magnitude", True), Combination("random")
_DARE_TIES, _MAGNITUDE = Combination("random", True), Combination("magnitude")
COMBINATIONS: dict[str, Combination] = {
    "linear": Combination(),
    "cat": Combination(space="cat"),
    "svd": Combination(space="svd"),
    "ties": _TIES,
    "ties_svd": Combination("magnitude", True, "svd"),
    "dare_linear": _DARE_LINEAR,
    "dare_ties": _DARE_TIES,
    "dare_linear_svd": Combination("random", False, "svd"),
    "dare_ties_svd": Combination("random", True, "svd"),
    "magnitude_prune": _MAGNITUDE,
    "magnitude_prune_svd": Combination("magnitude", False, "svd"),
}
"""PEFT's ``add_weighted_adapter`` combination types, by name."""


class CombinationOptions(BaseModel):
    """The top-level ``parameters`` of an adapter-space recipe (each used only by the types that read it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    density: float | None = Field(default=None, gt=0, le=1)
    """the fraction of each adapter's entries kept, 0 < density <= 1"""
    majority_sign_method: Literal["total", "frequency"] = "total"
    """sign election by the sum of the values (``total``) or by the count of signs (``frequency``)"""
    svd_rank: PositiveInt | None = None
    """the output rank of the svd types; default the largest rank of the adapters"""
    svd_clamp: float | None = Field(default=None, gt=0, le=1)
    """clamp both factors to +- this quantile of their entries; default no clamping"""
    svd_full_matrices: StrictBool = True
    """full or reduced SVD (``torch.linalg.svd``); the output's factors are the same up to sign"""
    svd_driver: Literal["gesvd", "gesvdj", "gesvda"] | None = None
    """cuSOLVER driver of the SVD on CUDA devices; not used on the CPU"""


def seed_for(seed: int, name: str) -> int:
    """The seed of one random mask: a function of (recipe seed, mask name) only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def dare_mask(shape: torch.Size | tuple[int, ...], density: float, seed: int) -> Tensor:
    """DARE's keep mask: independent Bernoulli(``density``) entries (float 0/1) drawn on the CPU from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full(tuple(shape), density), generator=generator)


def _top_magnitudes(tensor: Tensor, density: float) -> Tensor:
    """``tensor`` with all but its ``int(density * numel)`` largest magnitudes zeroed (PEFT's top-k; equal magnitudes at
    the threshold are kept lowest flat index first, on every device, where ``torch.topk`` leaves the choice open)."""
    magnitude, k = tensor.abs().reshape(-1), int(density * tensor.numel())
    if k == 0:
        return torch.zeros_like(tensor)
    threshold = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
    keep = magnitude > threshold
    tied = magnitude == threshold
    keep |= tied & (tied.cumsum(0) <= k - keep.sum())
    return tensor * keep.reshape(tensor.shape).to(tensor.dtype)


def combine(
    tensors: list[Tensor], weights: list[float], combination: Combination, options: CombinationOptions, mask_seeds: list[int]
) -> Tensor:
    """One preset of PEFT's task arithmetic over same-shaped float32 ``tensors`` (``mask_seeds``: one per tensor, for DARE)."""
    density = options.density
    if combination.sparsify and density is not None and density < 1:
        if combination.sparsify == "magnitude":
            tensors = [_top_magnitudes(t, density) for t in tensors]
        else:
            tensors = [(t * dare_mask(t.shape, density, s).to(t.device)) / density for t, s in zip(tensors, mask_seeds, strict=True)]
    stacked = torch.stack(tensors)
    weighted = stacked * torch.tensor(weights, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if not combination.sign_election:
        return weighted.sum(dim=0)
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if options.majority_sign_method == "total" else signs.sum(dim=0)
    agree = signs == torch.where(votes >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def factor_coefficients(coefficient: float) -> tuple[float, float]:
    """``c = w * scale`` split over the two factors: ``(sign(c) sqrt|c|, sqrt|c|)`` for ``A`` and ``B``."""
    root = math.sqrt(abs(coefficient))
    return (root if coefficient >= 0 else -root), root


def _svd_factors(delta: Tensor, rank: int, options: CombinationOptions) -> tuple[Tensor, Tensor]:
    driver = options.svd_driver if delta.device.type == "cuda" else None
    u, s, vh = torch.linalg.svd(delta, full_matrices=options.svd_full_matrices, driver=driver)
    return vh[:rank, :], u[:, :rank] @ torch.diag(s[:rank])


def _low_rank_svd_factors(factors: list[tuple[Tensor, Tensor]], coefficients: list[float], rank: int) -> tuple[Tensor, Tensor]:
    """The rank-``rank`` SVD factors of ``sum c_i B_i @ A_i`` from QR decompositions of the stacked factors, never
    forming the full matrix (its rank is at most the sum of the adapters' ranks); missing ranks are zeros."""
    left = torch.cat([b * c for (_, b), c in zip(factors, coefficients, strict=True)], dim=1)
    right = torch.cat([a for a, _ in factors], dim=0)
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    a, b = vh[:rank] @ q_right.T, (q_left @ u[:, :rank]) * s[:rank]
    missing = rank - a.shape[0]
    return torch.nn.functional.pad(a, (0, 0, 0, missing)), torch.nn.functional.pad(b, (0, missing))


def combine_module(
    name: str,
    factors: list[tuple[Tensor, Tensor, float, float]],
    combination: Combination,
    options: CombinationOptions,
    *,
    rank: int,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """The combined ``(A, B)`` of one module, in float32.

    Args:
        name: the module's name; with ``seed`` it seeds DARE's masks (mask names ``{name}.lora_A.{i}``,
            ``{name}.lora_B.{i}`` or ``{name}.delta.{i}``, ``i`` the adapter's position among ``factors``).
        factors: per adapter that has the module, ``(A, B, scale, weight)``: float32 factors (``A`` rank x in,
            ``B`` out x rank), ``scale`` its ``lora_alpha / r`` for this module, ``weight`` the recipe's.
        rank: the output rank (``cat``: at least the sum of the ranks, zero-padded; factor space: the common rank).

    Example:
        >>> a, b = torch.ones(2, 3), torch.ones(4, 2)
        >>> combined = combine_module("m", [(a, b, 0.5, 1.0), (a, b, 0.5, 1.0)], COMBINATIONS["cat"], CombinationOptions(), rank=4, seed=0)
        >>> torch.equal(combined[1] @ combined[0], b @ a)
        True
    """
    if combination.space == "cat":
        a = torch.cat([a * weight * scale for a, _, scale, weight in factors], dim=0)
        b = torch.cat([b for _, b, _, _ in factors], dim=1)
        missing = rank - a.shape[0]
        return torch.nn.functional.pad(a, (0, 0, 0, missing)), torch.nn.functional.pad(b, (0, missing))
    if combination.space == "factors":
        split = [factor_coefficients(weight * scale) for _, _, scale, weight in factors]
        a = combine([f[0] for f in factors], [c[0] for c in split], combination, options, [seed_for(seed, f"{name}.lora_A.{i}") for i in range(len(factors))])
        b = combine([f[1] for f in factors], [c[1] for c in split], combination, options, [seed_for(seed, f"{name}.lora_B.{i}") for i in range(len(factors))])
        return a, b
    if combination.sparsify is None and options.svd_clamp is None:
        return _low_rank_svd_factors([(a, b) for a, b, _, _ in factors], [weight * scale for _, _, scale, weight in factors], rank)
    deltas = [(b @ a) * scale for a, b, scale, _ in factors]
    delta = combine(deltas, [f[3] for f in factors], combination, options, [seed_for(seed, f"{name}.delta.{i}") for i in range(len(factors))])
    a, b = _svd_factors(delta, rank, options)
    if options.svd_clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), options.svd_clamp)
        a, b = a.clamp(-high, high), b.clamp(-high, high)
    return a, b
