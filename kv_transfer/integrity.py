"""Debug-mode integrity check of transferred KV blocks: CRC32 of the same spans on both
sides (the producer's registered blocks, the consumer's blocks after the READ), in order.

Off by default (`--kv-checksum`): it reads every transferred byte once more on each side.
"""

from __future__ import annotations

import ctypes
import zlib
from typing import Iterable, Sequence

CHUNK = 8 << 20


def inside(spans: Iterable[tuple[int, int]], registered: Sequence[tuple[int, int]]) -> bool:
    """Every (addr, length) span lies within one registered (addr, length) span. Pure."""
    for addr, length in spans:
        if length < 0 or not any(base <= addr and addr + length <= base + size
                                 for base, size in registered):
            return False
    return True


def crc32_of(spans: Iterable[tuple[int, int]]) -> int:
    """CRC32 of the bytes at these spans of this process's memory, concatenated in order.
    Only for spans the caller owns (checked with `inside` for a peer's request)."""
    crc = 0
    for addr, length in spans:
        off = 0
        while off < length:
            n = min(CHUNK, length - off)
            crc = zlib.crc32(ctypes.string_at(addr + off, n), crc)
            off += n
    return crc & 0xFFFFFFFF
