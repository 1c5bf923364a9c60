"""Keep freed memory in the process for the next tensor instead of handing it back to the OS.

A merge allocates and frees tensors of the same few sizes over and over (inputs, float32 copies, results).
glibc serves each large one with a fresh mmap and unmaps it on free, so every page is faulted in again for
the next tensor: on this kind of VM a bfloat16 -> float32 copy of 11.5M elements took 28 ms that way and
3 ms with the pages kept. Raising glibc's mmap and trim thresholds keeps them; peak memory is unchanged
(it is the largest set of tensors alive at once either way).
"""
from __future__ import annotations

import ctypes
import gc
import sys
from functools import cache

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_KEEP = 1 << 30


@cache
def reuse_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks (once per process); False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # one arena: freed blocks are kept once for every thread, not once per thread
        settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _KEEP), (_M_TRIM_THRESHOLD, 2 * _KEEP))
        return all([bool(libc.mallopt(option, value)) for option, value in settings])
    except (OSError, AttributeError):  # musl or another libc: leave malloc as it is
        return False


@cache
def freeze_long_lived_objects() -> None:
    """Move every object alive now (modules, classes, the plan) out of the cyclic collector's reach.

    A merge allocates many short-lived tensors and tuples; each full collection would otherwise walk the
    ~200k objects that torch, pydantic and friends leave behind (measured: ~0.2 s of a 4.5 s merge).
    """
    gc.freeze()
