"""Named numpy arrays <-> one flat float32 vector <-> contiguous shards.

A model is a ``dict[str, ndarray]``. Its *spec* is the sorted list of
``(name, shape)``; flattening concatenates the arrays in spec order. Shards are
contiguous slices of ``shard_values`` values (the last may be shorter), so a
shard's place in the vector is ``offset = index * shard_values``.

Digests are SHA-256 truncated to 128 bits: a shard's digest covers its encoded
bytes exactly as sent; an update's digest covers the ordered shard digests (so the receiver
verifies the whole update without decoding it twice) *and* what the update is: its
federation, device, round, update id and the model it is a delta from (version and digest),
so a payload moved to another round, device or base model no longer verifies.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fedsync.errors import ProtocolError

ParamSpec = tuple[tuple[str, tuple[int, ...]], ...]


def spec_of(params: Mapping[str, np.ndarray]) -> ParamSpec:
    """The stable (name-sorted) spec of a parameter dict."""
    return tuple((name, tuple(int(d) for d in params[name].shape)) for name in sorted(params))


def spec_size(spec: ParamSpec) -> int:
    return sum(math.prod(shape) for _, shape in spec)


def flatten(params: Mapping[str, np.ndarray], spec: ParamSpec | None = None) -> np.ndarray:
    """Concatenate ``params`` in spec order into one float32 vector.

    >>> flatten({"b": np.ones(2), "a": np.zeros((1, 2))}).tolist()
    [0.0, 0.0, 1.0, 1.0]
    """
    spec = spec_of(params) if spec is None else spec
    out = np.empty(spec_size(spec), dtype=np.float32)
    pos = 0
    for name, shape in spec:
        arr = params[name]
        if tuple(arr.shape) != shape:
            raise ProtocolError(f"params.{name}", "shape", f"{arr.shape} != {shape}")
        n = arr.size
        out[pos:pos + n] = arr.reshape(-1)
        pos += n
    return out


def unflatten(vector: np.ndarray, spec: ParamSpec) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten`; the arrays are copies, not views."""
    if vector.size != spec_size(spec):
        raise ProtocolError("vector", "size", f"{vector.size} values for a spec of {spec_size(spec)}")
    out, pos = {}, 0
    for name, shape in spec:
        n = math.prod(shape)
        out[name] = vector[pos:pos + n].reshape(shape).astype(np.float32, copy=True)
        pos += n
    return out


def shard_count(num_params: int, shard_values: int) -> int:
    return -(-num_params // shard_values)


def shard_slices(num_params: int, shard_values: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of every shard."""
    return [(off, min(shard_values, num_params - off)) for off in range(0, num_params, shard_values)]


def digest(data: bytes) -> bytes:
    """SHA-256, first 16 bytes. Chosen over BLAKE2b for the coordinator's hot path: with the
    SHA extensions of current x86 and ARMv8.2 servers it hashes 256 KiB shards at ~1.36 GiB/s
    here against BLAKE2b's ~0.5 (docs/benchmarks.md); a device hashes one update per round."""
    return hashlib.sha256(data).digest()[:16]


UPDATE_DOMAIN = b"fedsync/update-digest/v1\x00"


def shards_digest(shard_digests: Iterable[bytes]) -> bytes:
    """SHA-256 (first 16 bytes) over an update's shard digests in index order: what the
    update's bytes are, before :func:`update_digest` binds it to where it belongs."""
    h = hashlib.sha256()
    for d in shard_digests:
        h.update(d)
    return h.digest()[:16]


def update_binding(shards: bytes, *, federation: str, device: str, round_id: int, update_id: str,
                   base_version: int, base_digest: bytes) -> bytes:
    """The bytes :func:`update_digest` hashes: ``UPDATE_DOMAIN``, then federation, device (u16
    length + UTF-8 each), round id (u64 big-endian), update id (u16 length + UTF-8), base version
    (u64 big-endian), base model digest (u8 length + bytes) and ``shards`` (:func:`shards_digest`,
    16 bytes). Length prefixes, so no two different tuples give the same bytes.

    >>> update_binding(bytes(16), federation="f", device="d", round_id=1, update_id="u", base_version=0,
    ...                base_digest=bytes(16)).hex()[:16]
    '66656473796e632f'
    """
    out = bytearray(UPDATE_DOMAIN)
    for text in (federation, device):
        raw = text.encode("utf-8")
        out += struct.pack(">H", len(raw)) + raw
    out += struct.pack(">Q", round_id)
    raw = update_id.encode("utf-8")
    out += struct.pack(">H", len(raw)) + raw
    out += struct.pack(">QB", base_version, len(base_digest)) + bytes(base_digest)
    return bytes(out + shards)


def update_digest(shard_digests: Iterable[bytes], *, federation: str, device: str, round_id: int,
                  update_id: str, base_version: int, base_digest: bytes) -> bytes:
    """Digest of a whole update: SHA-256 (first 16 bytes) of :func:`update_binding` of its shard
    digests (in index order) and what it is: the federation, the device, the round, the update id,
    and the version and digest of the global model it is a delta from.

    >>> kw = dict(federation="f", device="d", round_id=1, update_id="u", base_version=0, base_digest=bytes(16))
    >>> update_digest([bytes(16)], **kw) == update_digest([bytes(16)], **{**kw, "round_id": 7})
    False
    """
    return hashlib.sha256(update_binding(shards_digest(shard_digests), federation=federation, device=device,
                                         round_id=round_id, update_id=update_id, base_version=base_version,
                                         base_digest=base_digest)).digest()[:16]


def vector_digest(vector: np.ndarray) -> bytes:
    """Digest of a float32 vector's little-endian bytes (the model's identity)."""
    return digest(np.ascontiguousarray(vector, dtype="<f4").tobytes())


def bitmap(indices: Iterable[int], count: int) -> bytes:
    """Shard-held bitmap: bit i of byte i // 8, least significant bit first."""
    out = bytearray((count + 7) // 8)
    for i in indices:
        out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def bitmap_indices(bits: bytes, count: int) -> list[int]:
    return [i for i in range(count) if bits[i // 8] >> (i % 8) & 1]


def check_shard_layout(offset: int, length: int, index: int, shard_values: int, num_params: int) -> None:
    """A shard must sit exactly where the manifest's layout puts it."""
    want_off = index * shard_values
    want_len = min(shard_values, num_params - want_off)
    if offset != want_off or length != want_len:
        raise ProtocolError("offset", "layout", f"shard {index} is [{offset}, +{length}), layout says [{want_off}, +{want_len})")


def as_vector(values: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32)
