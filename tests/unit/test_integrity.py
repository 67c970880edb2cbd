"""Debug-mode KV checksums: span validation and CRC32 over process memory."""

import ctypes
import zlib

from kv_transfer.connector.connector import lease_margin_s
from kv_transfer.integrity import crc32_of, inside


def test_inside_registered_spans():
    reg = [(1000, 100), (5000, 10)]
    assert inside([(1000, 100), (1050, 10), (5000, 10)], reg)
    assert not inside([(1090, 20)], reg)            # runs past the end
    assert not inside([(990, 20)], reg)             # starts before
    assert not inside([(1099, 1), (2000, 1)], reg)  # one bad span is enough
    assert not inside([(1000, -1)], reg)
    assert inside([], reg)


def test_crc32_of_spans_in_order():
    a = ctypes.create_string_buffer(b"hello " * 1000)
    b = ctypes.create_string_buffer(b"world" * 3)
    pa, pb = ctypes.addressof(a), ctypes.addressof(b)
    want = zlib.crc32(b"hello " * 1000 + b"world" * 3)
    assert crc32_of([(pa, 6000), (pb, 15)]) == want
    assert crc32_of([(pb, 15), (pa, 6000)]) != want      # order matters
    ctypes.memset(pa + 10, 0, 1)
    assert crc32_of([(pa, 6000), (pb, 15)]) != want      # one changed byte shows


def test_lease_margin_is_bounded():
    assert lease_margin_s(30.0) == 1.0
    assert lease_margin_s(2.0) == 0.2
