"""A strict CBOR reader for large payloads that hands out byte strings without copying.

Why: cbor2 6.3's C decoder reads long byte strings in 64 KiB pieces and joins
them (a guard against lying length headers), so decoding one 256 KiB update
shard costs ~250 µs of GIL-held time on the coordinator — more than its
SHA-256 (benchmarks/ingest.py, docs/benchmarks.md). Here a byte string longer
than ``VIEW_MIN`` comes back as a read-only ``memoryview`` into the payload; the
payload is already checked against ``MAX_PAYLOAD`` and a length is checked
against what is left before anything is sliced.

The reader covers exactly what :mod:`fedsync.messages` writes: definite-length
maps, arrays, text and byte strings, integers, floats, true/false/null. For
anything else (tags, indefinite lengths, undefined, duplicate or non-text map
keys, deep nesting, truncation, bad UTF-8) it raises :class:`Unsupported` and
the caller decodes with cbor2 instead, so its verdict on odd input is cbor2's.
tests/test_wire.py checks it against cbor2 on generated and junk payloads.
"""

from __future__ import annotations

import struct
from typing import Any

VIEW_MIN = 4096  # byte strings at least this long come back as memoryview
MAX_DEPTH = 8

_HALF = struct.Struct(">e")
_FLOAT = struct.Struct(">f")
_DOUBLE = struct.Struct(">d")


class Unsupported(Exception):
    """The payload uses something this reader leaves to cbor2."""


def loads(payload: bytes) -> tuple[Any, int]:
    """Decode the first CBOR item of ``payload``; return it and the offset just past it."""
    if not isinstance(payload, bytes):
        raise Unsupported("only bytes payloads are read in place")
    try:
        return _item(payload, memoryview(payload), 0, 0)
    except IndexError:  # a head or float past the end
        raise Unsupported("truncated") from None


_FLOATS = {25: _HALF, 26: _FLOAT, 27: _DOUBLE}
_SIMPLE = {20: False, 21: True, 22: None}


def _item(buf: bytes, view: memoryview, pos: int, depth: int) -> tuple[Any, int]:
    # One flat function on purpose: this runs ~40 times per update shard on the coordinator.
    b = buf[pos]
    major, arg = b >> 5, b & 31
    pos += 1
    if major == 7:
        if arg in _SIMPLE:
            return _SIMPLE[arg], pos
        fmt = _FLOATS.get(arg)
        if fmt is None:
            raise Unsupported("simple value")
        if pos + fmt.size > len(buf):
            raise Unsupported("truncated")
        return fmt.unpack_from(buf, pos)[0], pos + fmt.size
    if arg >= 24:
        if arg > 27:
            raise Unsupported("indefinite length or reserved value")
        n = 1 << (arg - 24)
        if pos + n > len(buf):
            raise Unsupported("truncated")
        arg = int.from_bytes(buf[pos:pos + n], "big")
        pos += n
    if major == 0:
        return arg, pos
    if major == 3 or major == 2:
        end = pos + arg
        if end > len(buf):
            raise Unsupported("truncated")
        if major == 2:
            return (view[pos:end] if arg >= VIEW_MIN else buf[pos:end]), end
        try:
            return buf[pos:end].decode("utf-8"), end
        except UnicodeDecodeError:
            raise Unsupported("utf-8") from None
    if major == 1:
        return -1 - arg, pos
    if depth >= MAX_DEPTH:
        raise Unsupported("nesting")
    if major == 5:
        if 2 * arg > len(buf) - pos:  # every item takes at least one byte
            raise Unsupported("truncated")
        out: dict[str, Any] = {}
        for _ in range(arg):
            key, pos = _item(buf, view, pos, depth + 1)
            if type(key) is not str or key in out:
                raise Unsupported("map key")
            out[key], pos = _item(buf, view, pos, depth + 1)
        return out, pos
    if major == 4:
        if arg > len(buf) - pos:
            raise Unsupported("truncated")
        items = []
        for _ in range(arg):
            value, pos = _item(buf, view, pos, depth + 1)
            items.append(value)
        return items, pos
    raise Unsupported("tag")
