"""Sparsifiers for task vectors: each decides, block by block, which delta entries to keep.

A sparsifier first ``prepare``s on the whole delta (given as a re-iterable of flat blocks), then
hands out the ``mask`` of each consecutive block, in order.
Random sparsifiers draw masks on the CPU from their own seeded generator, so a mask is the
same on every device, worker and process.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from merge_ops.methods.blocks import Differences, above_and_equal, block_slices, kth_largest


class Magnitude:
    """Keep exactly the ``max(1, int(density * numel))`` largest-magnitude entries (TIES trim; none when ``density <= 0``,
    as mergekit), or exactly ``count`` of them.

    Ties at the threshold go to the lower flat index, as a stable descending sort would: ``prepare`` counts
    the ties of each block, so every block but the one where the tie budget runs out is a single comparison.
    """

    def __init__(self, density: float, count: int | None = None) -> None:
        self.density, self.count = density, count
        self.keep_all = density >= 1

    def prepare(self, deltas: Differences, shape: torch.Size) -> None:
        n = shape.numel()
        k = (max(1, int(self.density * n)) if self.density > 0 else 0) if self.count is None else self.count
        self.keep_all = self.density >= 1 or k >= n
        if self.keep_all:
            return
        if k <= 0:
            self.threshold: Tensor | float = float("inf")
            self.ties_kept: list[tuple[int, int]] = [(0, 0)] * len(list(block_slices(n)))  # per block: (ties kept, ties)
            self.reset()
            return

        def magnitudes() -> Iterator[Tensor]:
            return (d.abs().float() for d in deltas())
        found = kth_largest(magnitudes, k, deltas.sample().abs().float(), n)
        self.threshold = found.value
        per_block = found.equal_per_block or [above_and_equal(m, found.value)[1] for m in magnitudes()]
        budget = k - found.above
        self.ties_kept = []
        for ties in per_block:
            self.ties_kept.append((min(ties, budget), ties))
            budget -= self.ties_kept[-1][0]
        self.reset()

    def reset(self) -> None:
        self.block = 0

    def mask(self, delta: Tensor) -> Tensor | None:
        """The next block's mask: float 0/1 made in place (fast), or bool in the block where the tie budget ends."""
        if self.keep_all:
            return None
        kept, ties = self.ties_kept[self.block]
        self.block += 1
        magnitude = delta.abs().float()
        if kept == ties:
            return magnitude.ge_(self.threshold)
        if kept == 0:
            return magnitude.gt_(self.threshold)
        tied = magnitude == self.threshold
        return (magnitude > self.threshold) | (tied & (tied.cumsum(0) <= kept))


_U64 = (1 << 64) - 1
_CHUNK = 1 << 20
_INDEX = torch.arange(_CHUNK, dtype=torch.int32)


def _mix64(z: int) -> int:
    """splitmix64's finalizer (Steele et al., 2014): a 64-bit integer hash."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _U64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _U64
    return z ^ (z >> 31)


def _int32(value: int) -> int:
    """The low 32 bits of ``value`` as a signed int32."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


_MUL_1, _MUL_2 = _int32(0x7FEB352D), _int32(0x846CA68B)  # lowbias32's multipliers (C. Wellons, hash-prospector)


def hashed_uniform(seed: int, start: int, count: int) -> Tensor:
    """Uniform int32 values for entries ``start .. start + count`` of a stream, each a hash of (seed, index).

    Counter-based: an entry's value depends on nothing else (no generator state, no block order), and the
    arithmetic is five integer passes (lowbias32 without its last xorshift, which only stirs the low bits),
    about 3x faster than ``torch.rand``. The index's high bits (per 2^20 entries) go into the key, its low
    bits into the data.
    """
    parts: list[Tensor] = []
    position, end = start, start + count
    while position < end or not parts:
        chunk, offset = divmod(position, _CHUNK)
        take = min(end - position, _CHUNK - offset)
        x = _INDEX[offset : offset + take] ^ _int32(_mix64(_mix64(seed & _U64) ^ chunk))
        x *= _MUL_1
        shifted = torch.bitwise_right_shift(x, 15)
        x ^= shifted.bitwise_and_(0x1FFFF)  # a logical shift: int32 shifts are arithmetic
        parts.append(x.mul_(_MUL_2))  # a bijection of uniform values: the top bits, which decide, are well mixed
        position += take
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class RandomDrop:
    """Keep each entry with probability ``density`` (DARE), from a counter-based hash of (seed, entry index)."""

    def __init__(self, density: float, seed: int) -> None:
        self.density, self.seed = density, seed
        # int32 values are uniform on [-2^31, 2^31): this many of the 2^32 fall below the threshold
        self.threshold = round(density * (1 << 32)) - (1 << 31)

    def prepare(self, deltas: Differences, shape: torch.Size) -> None:
        self.reset()

    def reset(self) -> None:
        self.offset = 0

    def mask(self, delta: Tensor) -> Tensor | None:
        if self.density >= 1:
            return None
        keep = torch.empty(delta.numel(), dtype=delta.dtype)  # a float 0/1 mask: a compare into floats is fast here
        torch.lt(hashed_uniform(self.seed, self.offset, delta.numel()), self.threshold, out=keep)
        self.offset += delta.numel()
        return keep.view(delta.shape).to(delta.device)


class WholeTensor:
    """A sparsifier that needs the whole delta at once: ``make_mask(delta) -> bool mask`` (or None)."""

    def __init__(self, make_mask: Callable[[Tensor], Tensor | None]) -> None:
        self.make_mask = make_mask

    def prepare(self, deltas: Differences, shape: torch.Size) -> None:
        whole = self.make_mask(torch.cat(list(deltas())).view(shape))
        self.whole = None if whole is None else whole.reshape(-1)
        self.reset()

    def reset(self) -> None:
        self.offset = 0

    def mask(self, delta: Tensor) -> Tensor | None:
        if self.whole is None:
            return None
        part = self.whole[self.offset : self.offset + delta.numel()]
        self.offset += delta.numel()
        return part


def magnitude_outliers(density: float, gamma: float) -> Callable[[Tensor], Tensor | None]:
    """Breadcrumbs: drop the smallest entries and the top ``gamma`` fraction of outliers.

    With ``int(gamma * numel) == 0`` it keeps everything up to the largest entry.
    """

    def make_mask(delta: Tensor) -> Tensor | None:
        if density >= 1:
            return None
        n = delta.numel()
        n_top = int(gamma * n)
        n_bottom = n - int(density * n) - n_top
        if n_bottom < 0:
            n_top, n_bottom = n_top + n_bottom, 0
        order = delta.abs().flatten().argsort(stable=True)
        keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
        keep[order[n_bottom : n - n_top]] = True
        return keep

    return make_mask


def della_magprune(density: float, epsilon: float, seed: int) -> Callable[[Tensor], Tensor | None]:
    """DELLA: keep entries with a probability that grows with their magnitude rank in their row."""
    if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"della needs 0 < density - epsilon and density + epsilon < 1, got {density=} {epsilon=}")

    def make_mask(delta: Tensor) -> Tensor | None:
        if density >= 1:
            return None
        rows = delta.reshape(1, -1) if delta.dim() == 1 else delta.reshape(delta.shape[0], -1)
        ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).float()
        low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
        probability = (density - epsilon) + 2 * epsilon * ((ranks - low) / (high - low)).clamp(0, 1)
        generator = torch.Generator().manual_seed(seed)
        return (torch.rand(rows.shape, generator=generator) < probability.cpu()).to(delta.device)

    return make_mask


def sparsified(sparsifier: Magnitude | RandomDrop | WholeTensor, delta: Tensor) -> Tensor:
    """``delta`` with the entries the sparsifier drops set to zero (the whole tensor at once)."""
    blocks = Differences(delta, None, delta.dtype)
    sparsifier.prepare(blocks, delta.shape)
    parts = [block if (mask := sparsifier.mask(block)) is None else block * mask for block in blocks()]
    return torch.cat(parts).view_as(delta) if parts else delta
