"""SequentialWriter: bytes on disk equal the bytes written, across chunk boundaries, with or without O_DIRECT."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from merge_ops import direct_io
from merge_ops.direct_io import SequentialWriter

SMALL_CHUNK = 8192


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct_io, "CHUNK", SMALL_CHUNK)


@pytest.mark.parametrize("size", [0, 1, SMALL_CHUNK - 1, SMALL_CHUNK, SMALL_CHUNK + 4097, 3 * SMALL_CHUNK + 3])
def test_bytes_round_trip_in_uneven_pieces(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    writer = SequentialWriter(tmp_path / "out.bin")
    cuts = sorted(random.Random(size + 1).sample(range(size + 1), min(size + 1, 7)))
    for start, end in zip([0, *cuts], [*cuts, size], strict=False):
        writer.write(data[start:end])
    writer.close()
    assert (tmp_path / "out.bin").read_bytes() == data


def test_falls_back_to_buffered_writes_where_o_direct_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def refuse_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(direct_io.os, "open", refuse_direct)
    data = random.Random(0).randbytes(2 * SMALL_CHUNK + 5)
    writer = SequentialWriter(tmp_path / "out.bin")
    writer.write(memoryview(data))
    writer.close()
    assert (tmp_path / "out.bin").read_bytes() == data


def test_abort_leaves_what_was_flushed_and_closes(tmp_path: Path) -> None:
    writer = SequentialWriter(tmp_path / "out.bin")
    writer.write(b"x" * (SMALL_CHUNK + 10))
    writer.abort()
    assert (tmp_path / "out.bin").read_bytes() == b"x" * SMALL_CHUNK
    writer.abort()  # a second abort is harmless
