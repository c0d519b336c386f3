"""Byte counts as people write them ("24GiB", "80 GB", 1.5e9) and as reports print them, and
the rounding a GPU's allocator applies to each block. No torch here."""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", re.IGNORECASE)

#: The CUDA caching allocator hands out blocks in multiples of 512 bytes;
#: ``torch.cuda.max_memory_allocated()`` counts those blocks.
CUDA_BLOCK = 512


def parse_bytes(value: object, argument: str = "budget") -> int:
    """A byte count from an int, a float or a string with a unit (B, KB, MB, GB, TB in powers
    of 1000; KiB, MiB, GiB, TiB in powers of 1024; case does not matter).

    >>> parse_bytes("24GiB"), parse_bytes("1.5 GB"), parse_bytes(4096)
    (25769803776, 1500000000, 4096)
    >>> parse_bytes("24 gigs")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: budget='24 gigs': expected a size such as 24GiB, 80GB or 1.5e9 (units B, KB, ...)
    """
    if isinstance(value, bool):
        raise ValueError(f"{argument}={value!r}: expected a size in bytes, not a bool")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        number, unit = math.nan, "?"
    if unit not in _UNITS or not math.isfinite(number) or number < 0:
        raise ValueError(
            f"{argument}={value!r}: expected a size such as 24GiB, 80GB or 1.5e9 "
            f"(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return round(number * _UNITS[unit])


def format_bytes(count: int) -> str:
    """``count`` in the largest binary unit that keeps it at least 1, with one decimal.

    >>> format_bytes(0), format_bytes(512), format_bytes(1536), format_bytes(3 * 1024**3)
    ('0 B', '512 B', '1.5 KiB', '3.0 GiB')
    """
    sign = "-" if count < 0 else ""
    count = abs(count)
    if count < 1024:
        return f"{sign}{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{sign}{value:.1f} {unit}"
    return f"{sign}{value / 1024:.1f} TiB"


def rounded(nbytes: int, block: int) -> int:
    """``nbytes`` as an allocator with ``block``-byte granularity allocates it (1: exact).

    >>> rounded(1, 512), rounded(512, 512), rounded(513, 512), rounded(0, 512), rounded(7, 1)
    (512, 512, 1024, 0, 7)
    """
    return -(-nbytes // block) * block
