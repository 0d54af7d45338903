"""A strict CBOR reader that hands out large byte strings without copying, and the strict
rules (no tags, no duplicate keys) for what it leaves to cbor2.

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
the caller decodes with cbor2 instead, so its verdict on odd input is cbor2's, after
:func:`check_strict` has refused tags and duplicate keys (which cbor2 would unwrap or merge).
tests/test_fastpaths.py checks it against cbor2, bit for bit, on generated and junk payloads.
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
        value = fmt.unpack_from(buf, pos)[0]
        if value != value and fmt is _HALF:  # struct drops a half NaN's payload bits; cbor2 keeps them
            raise Unsupported("half-precision NaN")
        return value, pos + fmt.size
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


# -- the strict rules, for payloads cbor2 decodes ------------------------------------------------

def check_strict(payload: bytes) -> None:
    """Raise :class:`~fedsync.errors.ProtocolError` at the first CBOR tag or duplicate map key
    in the first item of ``payload`` (docs/protocol.md, "Encoding rules" 4 and 6).

    Why a separate pass: cbor2 unwraps the tags it knows before any hook sees them (tags 2
    and 3 become integers, 28 and 55799 disappear) and keeps the last of duplicate keys, so
    its result cannot tell. This walks the item's heads without building values, before
    cbor2 runs (so no tag reaches cbor2's tag decoders), iteratively (hostile nesting cannot
    exhaust the stack). Duplicates are looked for among text, integer and byte-string keys;
    any other key fails the field checks anyway. Malformed or truncated input: it returns
    quietly and cbor2 reports it.

    >>> check_strict(b"\\xa1\\x61a\\xc2\\x41\\x0c")
    Traceback (most recent call last):
    ...
    fedsync.errors.ProtocolError: a: type (CBOR tag 2; values are untagged)
    """
    from fedsync.errors import ProtocolError  # lazy: the fast reader above needs nothing else

    n = len(payload)
    pos = 0
    # One frame per open array or map: [major, items expected (-1: indefinite), items seen,
    # keys seen (maps), last key]. A map's keys and values count as items.
    stack: list[list[Any]] = []
    while pos < n:
        b = payload[pos]
        major, arg = b >> 5, b & 31
        pos += 1
        if b == 0xFF:  # break: ends the innermost indefinite array or map
            if not stack or stack[-1][1] != -1 or (stack[-1][0] == 5 and stack[-1][2] % 2):
                return
            stack.pop()
        elif major == 6:
            raise ProtocolError(_path(stack), "type", f"CBOR tag {_arg(payload, pos, arg)}; values are untagged")
        else:
            if arg == 31:
                if major in (4, 5):
                    stack.append([major, -1, 0, set(), None])
                    continue
                if major not in (2, 3):
                    return
                key, pos = _chunks(payload, pos, major)
            else:
                if arg > 27:
                    return
                size = 0 if arg < 24 else 1 << (arg - 24)
                if pos + size > n:
                    return
                value = arg if size == 0 else int.from_bytes(payload[pos:pos + size], "big")
                pos += size
                key = None
                if major in (2, 3):
                    if pos + value > n:
                        return
                    key = (major, payload[pos:pos + value])
                    pos += value
                elif major in (0, 1):
                    key = (major, value)
                elif major in (4, 5) and value:
                    stack.append([major, value * (major - 3), 0, set(), None])  # a map of n holds 2n items
                    continue
            if key is not None and stack and stack[-1][0] == 5 and stack[-1][2] % 2 == 0:
                frame = stack[-1]
                label = _label(key)
                if key in frame[3]:
                    raise ProtocolError(_path(stack[:-1], label), "duplicate_key",
                                        f"key {label!r} appears twice in one map")
                frame[3].add(key)
                frame[4] = label
        # one item is complete: count it in its container, closing every container it fills
        while stack:
            frame = stack[-1]
            frame[2] += 1
            if frame[2] != frame[1]:
                break
            stack.pop()
        else:
            return  # the first item is complete; what follows is the decoder's trailing-bytes check


def _arg(payload: bytes, pos: int, arg: int) -> int:
    if 24 <= arg <= 27:
        return int.from_bytes(payload[pos:pos + (1 << (arg - 24))], "big")
    return arg


def _chunks(payload: bytes, pos: int, major: int) -> tuple[Any, int]:
    """An indefinite-length string's content as a map key (None if malformed) and its end."""
    parts = []
    while pos < len(payload) and payload[pos] != 0xFF:
        b = payload[pos]
        if b >> 5 != major or b & 31 > 27:
            return None, len(payload)
        arg = b & 31
        size = 0 if arg < 24 else 1 << (arg - 24)
        length = arg if size == 0 else int.from_bytes(payload[pos + 1:pos + 1 + size], "big")
        pos += 1 + size
        parts.append(payload[pos:pos + length])
        pos += length
    return (major, b"".join(parts)), pos + 1


def _label(key: tuple[int, Any]) -> str:
    major, value = key
    if major == 3:
        return value.decode("utf-8", "replace")
    if major == 1:
        return str(-1 - value)
    return str(value) if major == 0 else value.hex()


def _path(stack: list[list[Any]], last: str | None = None) -> str:
    """The field the next item belongs to, named as the validators in fedsync.messages name it:
    ``deadline``, ``metrics[train_loss]``, ``selected[1]``; a key's position adds ``.key``;
    an item outside the message's map is ``payload``."""
    name = ""
    for i, frame in enumerate(stack):
        if frame[0] == 4:
            name = (name or "payload") + f"[{frame[2]}]"
        elif frame[2] % 2 == 0:
            return f"{name}.key" if name else "payload"
        else:
            name = frame[4] if i == 0 else f"{name}[{frame[4]}]"
    if last is not None:
        return f"{name}[{last}]" if name else last
    return name or "payload"
