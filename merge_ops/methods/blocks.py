"""Cache-sized blocks over flattened tensors: whole-tensor math done one block at a time.

Working on blocks of ``BLOCK`` elements keeps intermediates in the CPU cache (several times
faster than whole-tensor temporaries) and memory at a few blocks. The block size is a constant,
so anything drawn per block from a generator is the same on every run, device and machine.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

BLOCK = 1 << 20
Blocks = Callable[[], Iterable[Tensor]]


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


def kth_largest(magnitudes: Blocks, k: int) -> tuple[Tensor, int]:
    """Exact k-th largest (k >= 1) of non-negative float32 values, and how many are strictly larger.

    A two-level radix select on the float bits (ordered like integers for non-negative floats):
    two passes over the blocks, memory of two histograms, no sort.
    """
    high = torch.zeros(1 << 15, dtype=torch.int64)
    for block in magnitudes():
        high += torch.bincount(block.view(torch.int32) >> 16, minlength=1 << 15)
    high_bucket, above = _select(high, k)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for block in magnitudes():
        bits = block.view(torch.int32)
        low += torch.bincount(bits[(bits >> 16) == high_bucket] & 0xFFFF, minlength=1 << 16)
    low_bucket, above_low = _select(low, k - above)
    value = torch.tensor([(high_bucket << 16) | low_bucket], dtype=torch.int32).view(torch.float32)[0]
    return value, above + above_low
