"""Lazy reading of (sharded) safetensors models and a streaming safetensors writer.

Reading opens a file with ``safe_open`` per tensor and gets views of its mapping, so nothing but
the tensors in use stays mapped. Writing streams: the header is computed up front from names,
dtypes and shapes, and each tensor's bytes go to disk as soon as it is computed (with O_DIRECT
where the filesystem allows, see ``direct_io``), so peak memory is one tensor.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from types import TracebackType

import torch
from safetensors import safe_open

from merge_ops.direct_io import SequentialWriter

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of safetensors ``dtype`` (``"BF16"``) and ``shape``."""
    return math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()


def load_tensor(file: Path, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One tensor, or the block of its rows ``[start, end)``: a view of the file's mapping, which lives as long as it."""
    with safe_open(file, framework="pt") as handle:
        tensor: torch.Tensor = handle.get_slice(name)[rows[0] : rows[1]] if rows else handle.get_tensor(name)
    return tensor


class TensorBlocks:
    """Row blocks of tensors, each tensor opened once while its blocks are read in order.

    ``safe_open`` maps the file and returns views of the mapping, so a block costs nothing until it is
    used; opening the file per block would map and unmap it again each time. Only the tensors of the
    latest ``read`` stay mapped.
    """

    def __init__(self) -> None:
        self._open: dict[tuple[Path, str], torch.Tensor] = {}

    def read(self, sources: list[tuple[Path, str]], rows: tuple[int, int] | None) -> list[torch.Tensor]:
        """The tensors ``(file, name)``, or rows ``[start, end)`` of each."""
        self._open = {key: self._open[key] if key in self._open else load_tensor(*key) for key in sources}
        return [self._open[key][rows[0] : rows[1]] if rows else self._open[key] for key in sources]


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy().data) if flat.numel() else memoryview(b"")


class StreamingSafetensorsWriter:
    """Write a safetensors file tensor by tensor, in the order of ``specs``, atomically.

    The file is written as ``<path>.partial`` and renamed when ``close`` finds every tensor
    written; on error the partial file is removed. ``close`` returns the file's sha256.

    Example:
        with StreamingSafetensorsWriter(path, [("w", "F32", (2, 2))]) as writer:
            writer.write("w", torch.zeros(2, 2))
    """

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._expected: list[tuple[str, str, tuple[int, ...]]] = []
        for name, dtype, shape in specs:
            size = tensor_nbytes(dtype, tuple(shape))
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._expected.append((name, dtype, tuple(shape)))
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._position = 0
        self._rows_done = 0
        self._hash = hashlib.sha256()
        self._file = SequentialWriter(self.partial)
        self._emit(len(encoded).to_bytes(8, "little") + encoded)

    def _emit(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._hash.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor, or the next block of its rows (blocks must add up to the tensor).

        The tensor must match the next spec's name and dtype, and its shape (or trailing shape, for a block).
        """
        if self._position >= len(self._expected):
            raise ValueError(f"unexpected tensor {name!r}: all {len(self._expected)} tensors are already written")
        want_name, want_dtype, want_shape = self._expected[self._position]
        dtype = DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype))
        rows_left = (want_shape[0] if want_shape else 1) - self._rows_done
        block = tuple(tensor.shape) == want_shape or (
            len(want_shape) > 0 and tuple(tensor.shape[1:]) == want_shape[1:] and tensor.dim() == len(want_shape)
        )
        if name != want_name or dtype != want_dtype or not block or (want_shape and tensor.shape[0] > rows_left):
            raise ValueError(f"tensor {self._position} should be {(want_name, want_dtype, want_shape)}, got {(name, dtype, tuple(tensor.shape))}")
        self._emit(_tensor_bytes(tensor.cpu()))
        self._rows_done += tensor.shape[0] if want_shape else 1
        if self._rows_done == (want_shape[0] if want_shape else 1):
            self._position += 1
            self._rows_done = 0

    def close(self) -> str:
        """Finish the file (fsync + rename) and return its sha256."""
        if self._position != len(self._expected):
            missing = [n for n, _, _ in self._expected[self._position :]]
            self.abort()
            raise ValueError(f"{self.path.name}: {len(missing)} tensor(s) never written, first {missing[0]!r}")
        self._file.close()
        os.replace(self.partial, self.path)
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Drop the partial file."""
        self._file.abort()
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.sha256 = self.close()
        else:
            self.abort()
