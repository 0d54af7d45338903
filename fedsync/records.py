"""Length-prefixed CBOR record files: the one framing of the coordinator's round log and commit
log and the device ledger.

A record is a little-endian u32 byte count followed by that many bytes holding one CBOR item.
Files are only appended to, so a crash can leave a torn last record (a short count or a short
body); :func:`read_records` stops there and says so, and everything before it is intact.

>>> data = frame({"k": 1}) + frame(["a", b"b"]) + frame("torn")[:-1]
>>> read_records(data)
([{'k': 1}, ['a', b'b']], True)
"""

from __future__ import annotations

import struct

import cbor2

__all__ = ["LENGTH", "frame", "read_records"]

LENGTH = struct.Struct("<I")


def frame(body: object) -> bytes:
    """One record: the CBOR encoding of ``body`` behind its length."""
    data = cbor2.dumps(body)
    return LENGTH.pack(len(data)) + data


def read_records(data: bytes) -> tuple[list, bool]:
    """Every whole record in ``data``, decoded, and whether a torn record ends it."""
    out, pos = [], 0
    while pos < len(data):
        if pos + LENGTH.size > len(data):
            return out, True
        (n,) = LENGTH.unpack_from(data, pos)
        if pos + LENGTH.size + n > len(data):
            return out, True
        out.append(cbor2.loads(data[pos + LENGTH.size:pos + LENGTH.size + n]))
        pos += LENGTH.size + n
    return out, False
