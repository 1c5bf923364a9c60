"""Cache-sized blocks over flattened tensors: whole-tensor math done one block at a time.

Working on blocks of ``BLOCK`` elements keeps intermediates in the CPU cache (several times
faster than whole-tensor temporaries) and memory at a few blocks. The block size is a constant,
so anything drawn per block from a generator is the same on every run, device and machine.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

BLOCK = 1 << 20
SAMPLE_STEP = 67
"""Stride of ``Differences.sample``: prime, so rows whose length is a multiple of 64 are sampled in every column
(a stride of 64 saw 1/64 of the columns, a biased sample of low-rank deltas, whose magnitudes vary by column)."""
PARALLEL_MIN = 1 << 17
Blocks = Callable[[], Iterable[Tensor]]
T = TypeVar("T")
R = TypeVar("R")
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mergeflow-blocks")


def in_order(work: Callable[[T], R], items: Iterable[T], *, parallel: bool) -> list[R]:
    """``[work(item) for item in items]``, on two threads when ``parallel`` (errors raised, results in order).

    Each result is computed by the same operations either way, so outputs never depend on the threads;
    reductions over the results happen afterwards, in order. Two threads: this machine class has two cores,
    and the merge's reader and writer threads mostly wait.
    """
    return list(_POOL.map(work, items)) if parallel else [work(item) for item in items]


class Differences:
    """``values - offset`` (flattened, in ``dtype``) block by block, re-iterable, never whole in memory.

    Calling it yields the blocks; ``sample()`` is every ``SAMPLE_STEP``-th entry, read without the rest.
    """

    def __init__(self, values: Tensor, offset: Tensor | None, dtype: torch.dtype) -> None:
        self.values, self.offset, self.dtype = flat(values), None if offset is None else flat(offset), dtype

    def _diff(self, index: slice) -> Tensor:
        part = self.values[index].to(self.dtype)
        return part if self.offset is None else part - self.offset[index].to(self.dtype)

    def __call__(self) -> Iterator[Tensor]:
        return (self._diff(s) for s in block_slices(self.values.numel()))

    def sample(self) -> Tensor:
        return self._diff(slice(None, None, SAMPLE_STEP))


def block_slices(numel: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(numel)``."""
    for start in range(0, numel, BLOCK):
        yield slice(start, min(start + BLOCK, numel))


def flat(t: Tensor) -> Tensor:
    """A flat view (a copy only if ``t`` is not contiguous)."""
    return t.reshape(-1)


def _select(histogram: Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest count-weighted value, and how many lie in higher buckets."""
    from_top = histogram.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor(k)))
    return len(histogram) - 1 - position, int(from_top[position - 1]) if position else 0


def _brackets(sample: Tensor, k: int, numel: int) -> list[tuple[Tensor, Tensor]]:
    """Ranges of values likely to hold the k-th largest of ``numel`` values, from a uniform sample of them, to try
    in order: a few sigma wide; first, when the sample's value at that rank repeats across a sigma either side of
    the rank (bfloat16 deltas repeat values), that value alone, which one counting pass settles (in the bench's
    TIES merges it was tried for a third to a half of the tensors and missed for 4 of 400)."""
    m = sample.numel()
    rank = k * m / numel
    sigma = math.sqrt(rank * (1 - rank / m) + 1)

    def at(r: float) -> Tensor:  # the r-th largest of the sample
        return torch.kthvalue(sample, m - min(m, max(1, round(r))) + 1).values
    low, high = at(rank + 5 * sigma + 16), at(rank - 5 * sigma - 16)
    if low == high:
        return [(low, high)]
    likely = at(rank)
    above, equal = int(torch.count_nonzero(sample > likely)), int(torch.count_nonzero(sample == likely))
    first = [(likely, likely)] if above + sigma < rank < above + equal - sigma else []
    return [*first, (low, high)]


class KthLargest(NamedTuple):
    """The k-th largest value, how many values are strictly larger, how many equal it, and (when the search
    saw them) how many equal it in each block."""

    value: Tensor
    above: int
    equal: int
    equal_per_block: list[int] | None


def above_and_equal(block: Tensor, value: Tensor) -> tuple[int, int]:
    """How many entries of ``block`` are greater than ``value`` and how many equal it; overwrites ``block``.

    Float arithmetic rather than boolean comparisons, which torch does not vectorize (3x slower here): the
    sign of ``block - value`` is exact, and sums of -1/0/+1 over a block are exact in float32.
    """
    signs = block.sub_(value).sign_()
    balance = int(signs.sum())  # above - below
    above = int(signs.clamp_(min=0).sum())
    return above, block.numel() - above - (above - balance)


def _select_in_bracket(magnitudes: Blocks, k: int, low: Tensor, high: Tensor, limit: int) -> KthLargest | None:
    """The k-th largest if it lies in [low, high]: one pass counting what lies above and keeping what lies
    between (at most ``limit`` values; only counted when low == high, as with bfloat16 deltas); else None."""
    single = bool(low == high)
    above, inside, between, equal_per_block = 0, 0, [], []
    for block in magnitudes():
        if single:
            block_above, block_equal = above_and_equal(block, high)
            above, inside = above + block_above, inside + block_equal
            equal_per_block.append(block_equal)
            continue
        above += int(torch.count_nonzero(block > high))
        between.append(block[(block >= low) & (block <= high)])
        inside += between[-1].numel()
        if inside > limit:
            return None
    rank = k - above
    if not 1 <= rank <= inside:
        return None
    if single:
        return KthLargest(high, above, inside, equal_per_block)
    values = torch.cat(between)
    value = values.sort(descending=True).values[rank - 1]
    equal_per_block = [int(torch.count_nonzero(part == value)) for part in between]
    return KthLargest(value, above + int(torch.count_nonzero(values > value)), sum(equal_per_block), equal_per_block)


def kth_largest(magnitudes: Blocks, k: int, sample: Tensor | None = None, numel: int = 0) -> KthLargest:
    """Exact k-th largest (k >= 1) of non-negative float32 values, given as fresh blocks (they may be overwritten).

    With a uniform ``sample`` of the ``numel`` values: one pass keeping the values in a bracket estimated from
    it (two when a first guess of a single value misses). Otherwise, or when the bracket misses (or holds too
    much, e.g. many equal values): a two-level radix select on the float bits (ordered like integers for
    non-negative floats), two passes, no sort.
    """
    for low, high in _brackets(sample, k, numel) if sample is not None and sample.numel() >= 1024 else []:
        found = _select_in_bracket(magnitudes, k, low, high, limit=max(BLOCK, numel // 16))
        if found is not None:
            return found
    high_hist = torch.zeros(1 << 15, dtype=torch.int64)
    for block in magnitudes():
        high_hist += torch.bincount(block.view(torch.int32) >> 16, minlength=1 << 15)
    high_bucket, above = _select(high_hist, k)
    low_hist = torch.zeros(1 << 16, dtype=torch.int64)
    for block in magnitudes():
        bits = block.view(torch.int32)
        low_hist += torch.bincount(bits[(bits >> 16) == high_bucket] & 0xFFFF, minlength=1 << 16)
    low_bucket, above_low = _select(low_hist, k - above)
    value = torch.tensor([(high_bucket << 16) | low_bucket], dtype=torch.int32).view(torch.float32)[0]
    return KthLargest(value, above + above_low, int(low_hist[low_bucket]), None)
