"""Run the demo family's training in a child Python whose arithmetic is the same on every x86-64 CPU.

torch picks each CPU kernel by the CPU's vector ISA (ATen builds every kernel for DEFAULT, AVX2 and AVX512) and
MKL, which does torch's float32 matmuls, picks its code path by the CPU and its vendor. The paths sum in other
orders and round differently, so the same training gave other bytes on an AVX-512 machine than on an AVX2 one
(every model file differed). Both libraries read their choice from the environment once, when torch first
computes, so the training runs in a child process started with ``PINNED``:

- ``ATEN_CPU_CAPABILITY=default``: ATen's portable kernels, the same code on every x86-64 CPU;
- ``MKL_CBWR=COMPATIBLE``: the branch of MKL's conditional numerical reproducibility that gives the same results
  on every x86-64 CPU, Intel or not (its AVX2/AVX512 branches hold on Intel CPUs only: on this AMD machine
  ``MKL_CBWR=AVX2`` gave the unpinned bytes).

oneDNN plays no part (``ONEDNN_MAX_CPU_ISA`` does not change the bytes), nor does ``MKL_ENABLE_INSTRUCTIONS``
once the branch is pinned. The price: training takes about twice the CPU time (mostly MKL's COMPATIBLE
branch). What stays outside: another torch, MKL or
glibc version, and non-x86 CPUs (no MKL there).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from mergeflow.demo_family.training import deterministic_cpu
from mergeflow.errors import DemoBuildError

PINNED = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
_SOURCE_ROOT = Path(__file__).resolve().parents[2]
"""The folder holding this ``mergeflow`` package: the child imports the same code as the parent."""


def run_pinned(function: Callable[..., object], *args: object) -> None:
    """Call ``function(*args)`` under ``deterministic_cpu()`` in a child Python started with ``PINNED``.

    ``function`` and ``args`` are pickled to the child, so ``function`` is a module-level function; it
    writes its results to files.

    Raises:
        DemoBuildError: the child failed (its traceback went to stderr).

    Example:
        >>> run_pinned(_build_into, staging, FamilySettings())  # doctest: +SKIP
    """
    python_path = os.pathsep.join(filter(None, (str(_SOURCE_ROOT), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, **PINNED, "PYTHONPATH": python_path}
    child = subprocess.run([sys.executable, "-m", __name__], input=pickle.dumps((function, args)), env=env, check=False)
    if child.returncode:
        raise DemoBuildError(f"{function.__module__}.{function.__name__}", child.returncode)


def _main() -> None:
    function, args = pickle.loads(sys.stdin.buffer.read())
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "DEFAULT":
        raise RuntimeError(f"ATEN_CPU_CAPABILITY=default did not take: torch runs its {capability} kernels")
    with deterministic_cpu():
        function(*args)


if __name__ == "__main__":
    _main()
