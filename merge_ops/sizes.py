"""Byte sizes written the way people write them: ``5GB``, ``500MB``, ``2GiB``, ``1234``."""
from __future__ import annotations

import math

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5000000000; ValueError naming the accepted forms otherwise, or when the size is under one byte."""
    if isinstance(text, int):
        size = float(text)
    else:
        number = text.strip().upper().rstrip("S")
        unit = next((u for u in sorted(UNITS, key=len, reverse=True) if u and number.endswith(u)), "")
        try:
            size = float(number[: len(number) - len(unit)]) * UNITS[unit]
        except ValueError:
            raise ValueError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB") from None
    if not (math.isfinite(size) and size >= 1):
        raise ValueError(f"{text!r} is not a size of at least one byte; write e.g. 5GB, 500MB or 2GiB")
    return int(size)
