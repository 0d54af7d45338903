"""Wire messages: frozen dataclasses encoded as CBOR maps with a schema version.

Theory of operation
-------------------
Each message type declares its fields once, as a table of validators
(``_SPEC``). :func:`encode` writes a CBOR map ``{"v": SCHEMA, "t": kind, ...}``;
:func:`decode` checks the size, the CBOR itself, the schema version, the kind
and then every field (type, range, size, finiteness) and returns the dataclass,
or raises :class:`~fedsync.errors.ProtocolError` naming the field and reason.
Cross-field rules (a shard's slice must fit inside the vector, the manifest's
quorum must not exceed its target) are checked in each type's ``_check``.

Versions (docs/protocol.md, "Versions"): ``v`` is the schema's major version. A build
reads every version from 1 up to :data:`SCHEMA` and writes :data:`WRITTEN_SCHEMA`, the
lowest that expresses what it sends. A field that is ``None`` is not written: that is how
a key added after the first v1 release (``resend_after``) stays absent at its default, so
a v1 decoder written before it (which rejects unknown keys) still reads the message.

Nothing here touches the network or the clock.
"""

from __future__ import annotations

import io
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, ClassVar

import cbor2

from fedsync import cborview
from fedsync.errors import EncodeError, ProtocolError
from fedsync.topics import check_name

SCHEMA = 1  # the newest schema version this build reads (it reads every one from 1 up)
WRITTEN_SCHEMA = 1  # the version it writes: the lowest that expresses every message it sends
MAX_PAYLOAD = 32 * 1024 * 1024  # bytes; larger payloads are refused before parsing
MAX_PARAMS = 1 << 28
MAX_SHARDS = 1 << 16
MAX_DEVICES = 100_000
DIGEST_SIZE = 16

Validator = Callable[[str, Any], Any]


# -- field validators --------------------------------------------------------

def _int(lo: int, hi: int) -> Validator:
    def check(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ProtocolError(name, "type", f"expected integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise ProtocolError(name, "range", f"{v} not in [{lo}, {hi}]")
        return v
    return check


def _float(lo: float = -math.inf, hi: float = math.inf) -> Validator:
    def check(name: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ProtocolError(name, "type", f"expected number, got {type(v).__name__}")
        if type(v) is int and not -(2**64) <= v < 2**64:  # would be written as a bignum tag (encode)
            raise ProtocolError(name, "range", "integer beyond CBOR's 64-bit integers")
        v = float(v)
        if not math.isfinite(v):
            raise ProtocolError(name, "not_finite", f"{v}")
        if not lo <= v <= hi:
            raise ProtocolError(name, "range", f"{v} not in [{lo}, {hi}]")
        return v
    return check


def _str(max_len: int = 64, choices: tuple[str, ...] | None = None) -> Validator:
    def check(name: str, v: Any) -> str:
        if not isinstance(v, str):
            raise ProtocolError(name, "type", f"expected text, got {type(v).__name__}")
        size = len(v.encode("utf-8", "surrogatepass"))  # CBOR (and CDDL's .size) count UTF-8 bytes
        if size > max_len:
            raise ProtocolError(name, "size", f"{size} UTF-8 bytes > {max_len}")
        if choices is not None and v not in choices:
            raise ProtocolError(name, "value", f"{v!r} not one of {choices}")
        return v
    return check


def _ident(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ProtocolError(name, "type", f"expected text, got {type(v).__name__}")
    return check_name(name, v)


def _bytes(max_len: int, exact: int | None = None) -> Validator:
    def check(name: str, v: Any) -> bytes:
        if not isinstance(v, (bytes, memoryview)):  # memoryview: a large field read in place (fedsync.cborview)
            raise ProtocolError(name, "type", f"expected bytes, got {type(v).__name__}")
        if exact is not None and len(v) != exact:
            raise ProtocolError(name, "size", f"{len(v)} bytes, expected {exact}")
        if len(v) > max_len:
            raise ProtocolError(name, "size", f"{len(v)} bytes > {max_len}")
        return v
    return check


def _list(item: Validator, max_len: int) -> Validator:
    def check(name: str, v: Any) -> tuple:
        if not isinstance(v, list):
            raise ProtocolError(name, "type", f"expected array, got {type(v).__name__}")
        if len(v) > max_len:
            raise ProtocolError(name, "size", f"{len(v)} items > {max_len}")
        return tuple(item(f"{name}[{i}]", x) for i, x in enumerate(v))
    return check


def _float_map(max_len: int = 32) -> Validator:
    key = _str(32)
    val = _float()

    def check(name: str, v: Any) -> dict[str, float]:
        if not isinstance(v, dict):
            raise ProtocolError(name, "type", f"expected map, got {type(v).__name__}")
        if len(v) > max_len:
            raise ProtocolError(name, "size", f"{len(v)} entries > {max_len}")
        return {key(f"{name}.key", k): val(f"{name}[{k}]", x) for k, x in v.items()}
    return check


def _param_entry(name: str, v: Any) -> tuple[str, tuple[int, ...]]:
    if not isinstance(v, list) or len(v) != 2:
        raise ProtocolError(name, "type", "expected [name, shape]")
    pname = _str(128)(f"{name}.name", v[0])
    shape = _list(_int(0, MAX_PARAMS), 8)(f"{name}.shape", v[1])
    return (pname, shape)


_DIGEST = _bytes(DIGEST_SIZE, exact=DIGEST_SIZE)
_ROUND = _int(0, 2**53)
_VERSION = _int(0, 2**53)
_COUNT = _int(1, MAX_SHARDS)
_INDEX = _int(0, MAX_SHARDS - 1)
_NPARAMS = _int(1, MAX_PARAMS)
_OFFSET = _int(0, MAX_PARAMS)
_CODEC = _str(32)
_TIME = _float(0.0, 1e12)


# -- message types -----------------------------------------------------------

class _Message:
    KIND: ClassVar[str]
    _SPEC: ClassVar[dict[str, Validator]]

    def _check(self) -> None:  # cross-field rules; overridden where needed
        pass


@dataclass(frozen=True, slots=True)
class RoundManifest(_Message):
    """The retained description of the current round (topic ``manifest``)."""

    federation: str
    round_id: int
    incarnation: int
    state: str  # "open" | "waiting" | "finished"
    mode: str
    model_version: int
    model_digest: bytes
    model_codec: str
    model_shards: int
    param_spec: tuple[tuple[str, tuple[int, ...]], ...]
    num_params: int
    shard_values: int
    update_codec: str
    update_qos: int
    deadline: float
    issued_at: float
    quorum: int
    target: int
    selected: tuple[str, ...]
    hyper: dict[str, float] = field(default_factory=dict)
    delta_from: int = -1  # a device holding this version may fetch modeldelta/{delta_from}/{version}/{i}
    resend_after: float | None = None  # seconds before a device re-sends; None (absent): the device's own

    KIND: ClassVar[str] = "manifest"

    def _check(self) -> None:
        # The flat vector's order is the param_spec's (fedsync.params.spec_of: sorted by name),
        # so a repeated or out-of-order name would make two sides flatten differently.
        total = 0
        for i, (name, shape) in enumerate(self.param_spec):
            if i and name <= self.param_spec[i - 1][0]:
                prev = self.param_spec[i - 1][0]
                raise ProtocolError(f"param_spec[{i}].name", "repeated" if name == prev else "order",
                                    f"{name!r} after {prev!r}: names are sorted and unique")
            total += math.prod(shape)
        seen: dict[str, int] = {}
        for i, device in enumerate(self.selected):  # one device, one slot: quorum counts devices
            if device in seen:
                raise ProtocolError(f"selected[{i}]", "repeated", f"{device!r} is also selected[{seen[device]}]")
            seen[device] = i
        if total != self.num_params:
            raise ProtocolError("num_params", "mismatch", f"param_spec has {total} values, num_params says {self.num_params}")
        if self.model_shards != -(-self.num_params // self.shard_values):
            raise ProtocolError("model_shards", "mismatch", "does not match num_params / shard_values")
        if self.state == "open" and not 1 <= self.quorum <= self.target <= len(self.selected):
            raise ProtocolError("quorum", "range", f"open round needs 1 <= quorum {self.quorum} <= target {self.target} <= selected {len(self.selected)}")
        if self.quorum > self.target:
            raise ProtocolError("quorum", "range", f"quorum {self.quorum} > target {self.target}")
        if self.deadline < self.issued_at:
            raise ProtocolError("deadline", "range", "deadline before issued_at")


@dataclass(frozen=True, slots=True)
class ModelShard(_Message):
    """One retained slice of the global model (topic ``model/{version}/{index}``)."""

    version: int
    index: int
    count: int
    offset: int
    length: int
    num_params: int
    codec: str
    digest: bytes
    data: bytes
    base: int = -1  # >= 0: this shard is of the delta from version ``base`` (see coordinator/model_store.py)

    KIND: ClassVar[str] = "model"

    def _check(self) -> None:
        _check_slice(self.index, self.count, self.offset, self.length, self.num_params)


@dataclass(frozen=True, slots=True)
class UpdateShard(_Message):
    """One slice of a device's update (topic ``up/{device}/{round}/{update_id}/{index}``).

    ``digest`` covers this shard's encoded ``data``; ``update_digest`` covers the
    ordered list of all shard digests, so the whole update is verified once
    reassembled (see :func:`fedsync.params.update_digest`).
    """

    device: str
    round_id: int
    update_id: str
    base_version: int
    index: int
    count: int
    offset: int
    length: int
    num_params: int
    codec: str
    num_samples: int
    digest: bytes
    update_digest: bytes
    data: bytes
    metrics: dict[str, float] = field(default_factory=dict)
    signature: bytes = b""  # optional: the device's signature of the update (fedsync/signing.py)

    KIND: ClassVar[str] = "update"

    def _check(self) -> None:
        _check_slice(self.index, self.count, self.offset, self.length, self.num_params)


ACK_STATES = ("partial", "accepted", "duplicate", "rejected", "closed", "refused")


@dataclass(frozen=True, slots=True)
class ShardAck(_Message):
    """Coordinator receipt (topic ``ack/{device}``, retained).

    ``held`` is a bitmap (bit i of byte i//8, LSB first) of the shards of
    ``update_id`` the coordinator holds durably. ``status`` tells the device
    whether to keep sending (``partial``), stop (``accepted``, ``duplicate``,
    ``closed``, ``refused`` — the update failed a policy check such as the norm
    bound and re-sending it would not help) or that the update will never be accepted
    (``rejected``, ``reason`` = ``"{field}:{code}"``; :mod:`fedsync.receipts` says which
    codes invite a fresh update and which are final).
    """

    device: str
    round_id: int
    update_id: str
    count: int
    held: bytes
    status: str
    reason: str = ""

    KIND: ClassVar[str] = "ack"

    def _check(self) -> None:
        if len(self.held) != (self.count + 7) // 8:
            raise ProtocolError("held", "size", f"{len(self.held)} bytes for {self.count} shards")


@dataclass(frozen=True, slots=True)
class PeerStatus(_Message):
    """Retained presence of a device or the coordinator; the last will sets ``offline``."""

    peer: str
    state: str  # "online" | "offline"
    incarnation: int = 0

    KIND: ClassVar[str] = "status"


def _check_slice(index: int, count: int, offset: int, length: int, num_params: int) -> None:
    if index >= count:
        raise ProtocolError("index", "range", f"index {index} >= count {count}")
    if length < 1 or offset + length > num_params:
        raise ProtocolError("length", "range", f"slice [{offset}, {offset + length}) outside {num_params} values")


RoundManifest._SPEC = {
    "federation": _ident,
    "round_id": _ROUND,
    "incarnation": _int(0, 2**63 - 1),
    "state": _str(16, ("open", "waiting", "finished")),
    "mode": _str(16, ("sync", "async", "semisync")),
    "model_version": _VERSION,
    "model_digest": _DIGEST,
    "model_codec": _CODEC,
    "model_shards": _COUNT,
    "param_spec": _list(_param_entry, 256),
    "num_params": _NPARAMS,
    "shard_values": _int(1, MAX_PARAMS),
    "update_codec": _CODEC,
    "update_qos": _int(1, 2),
    "deadline": _TIME,
    "issued_at": _TIME,
    "quorum": _int(0, MAX_DEVICES),
    "target": _int(0, MAX_DEVICES),
    "selected": _list(_ident, MAX_DEVICES),
    "hyper": _float_map(),
    "delta_from": _int(-1, 2**53),
    "resend_after": _float(0.1, 3600.0),
}
# The fields every slice of the flat vector carries, model shard or update shard alike.
_SLICE_SPEC: dict[str, Validator] = {
    "index": _INDEX,
    "count": _COUNT,
    "offset": _OFFSET,
    "length": _NPARAMS,
    "num_params": _NPARAMS,
    "codec": _CODEC,
    "digest": _DIGEST,
    "data": _bytes(MAX_PAYLOAD),
}
ModelShard._SPEC = {
    **_SLICE_SPEC,
    "version": _VERSION,
    "base": _int(-1, 2**53),
}
UpdateShard._SPEC = {
    **_SLICE_SPEC,
    "device": _ident,
    "round_id": _ROUND,
    "update_id": _ident,
    "base_version": _VERSION,
    "num_samples": _int(1, 1 << 40),
    "update_digest": _DIGEST,
    "metrics": _float_map(),
    "signature": _bytes(64),
}
ShardAck._SPEC = {
    "device": _ident,
    "round_id": _ROUND,
    "update_id": _ident,
    "count": _COUNT,
    "held": _bytes(MAX_SHARDS // 8),
    "status": _str(16, ACK_STATES),
    "reason": _str(200),
}
PeerStatus._SPEC = {
    "peer": _ident,
    "state": _str(16, ("online", "offline")),
    "incarnation": _int(0, 2**63 - 1),
}

_KINDS: dict[str, type[_Message]] = {
    cls.KIND: cls for cls in (RoundManifest, ModelShard, UpdateShard, ShardAck, PeerStatus)
}


def _to_cbor(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_cbor(v) for v in value]
    if isinstance(value, memoryview):  # cbor2 would write it as an array of ints
        return value.tobytes()
    return value


def _layout(cls: type[_Message]) -> tuple[tuple[str, bool, Validator], ...]:
    """(field name, required, validator) per field of a message type, in declaration order."""
    lay = _LAYOUTS.get(cls)
    if lay is None:
        lay = _LAYOUTS[cls] = tuple((f.name, f.default is MISSING and f.default_factory is MISSING,
                                     cls._SPEC[f.name]) for f in fields(cls))  # type: ignore[arg-type]
    return lay


_LAYOUTS: dict[type, tuple[tuple[str, bool, Validator], ...]] = {}


def encode(msg: _Message) -> bytes:
    """Encode a message as a CBOR map. Validates first, so nothing invalid leaves: every
    field goes through the decoder's own validator in the form it is written in. An
    invalid message raises :class:`fedsync.errors.EncodeError` (an internal error, never
    counted as bad input)."""
    body: dict[str, Any] = {"v": WRITTEN_SCHEMA, "t": msg.KIND}
    try:
        for name, _, check in _layout(type(msg)):
            value = getattr(msg, name)
            if value is None:
                continue  # absent (docs/protocol.md, "Encoding rules": absent, not null)
            body[name] = value = _to_cbor(value)
            check(name, value)
        msg._check()
    except ProtocolError as err:
        raise EncodeError(msg.KIND, err) from err
    out = cbor2.dumps(body)
    if len(out) > MAX_PAYLOAD:
        raise EncodeError(msg.KIND, ProtocolError("payload", "size", f"{len(out)} bytes > {MAX_PAYLOAD}"))
    return out


def _read_cbor(payload: bytes) -> tuple[Any, int]:
    """The first CBOR item and where it ends. A bytes payload goes through
    :mod:`fedsync.cborview`, which leaves large byte strings (shard data) in place;
    anything it does not cover (tags and duplicate keys among it) goes through
    :func:`fedsync.cborview.check_strict` and then cbor2. (The strict pass plus cbor2
    costs ~2x cborview alone on a 100-400 byte receipt or manifest, so small payloads
    take the in-place reader too.)"""
    if isinstance(payload, bytes):
        try:
            return cborview.loads(payload)
        except cborview.Unsupported:
            pass
    cborview.check_strict(payload)  # no tags, no duplicate keys: cbor2 would unwrap or merge them
    fp = io.BytesIO(payload)
    try:
        body = cbor2.CBORDecoder(fp).decode()
    except Exception as exc:  # cbor2 raises several types; all mean "not CBOR"
        raise ProtocolError("payload", "cbor", str(exc)[:120]) from None
    return body, fp.tell()


def decode(payload: bytes, expect: type[_Message] | None = None) -> Any:
    """Decode and validate one payload; raise ProtocolError naming the field.

    >>> m = PeerStatus("dev-1", "online")
    >>> decode(encode(m), PeerStatus) == m
    True
    """
    if not isinstance(payload, (bytes, bytearray)):
        raise ProtocolError("payload", "type", f"expected bytes, got {type(payload).__name__}")
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError("payload", "size", f"{len(payload)} bytes > {MAX_PAYLOAD}")
    if not payload:
        raise ProtocolError("payload", "empty")
    body, end = _read_cbor(payload)
    if end != len(payload):
        raise ProtocolError("payload", "trailing_bytes", f"{len(payload) - end} bytes after the CBOR item")
    if not isinstance(body, dict):
        raise ProtocolError("payload", "type", f"expected CBOR map, got {type(body).__name__}")
    version = body.get("v")
    if type(version) is not int or not 1 <= version <= SCHEMA:  # an integer: not 1.0, not true
        raise ProtocolError("v", "schema_version", f"got {version!r}, this build reads 1 to {SCHEMA}")
    kind = body.get("t")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError("t", "value", f"unknown message kind {kind!r}")
    if expect is not None and cls is not expect:
        raise ProtocolError("t", "value", f"expected {expect.KIND!r}, got {kind!r}")
    unknown = set(body) - set(cls._SPEC) - {"v", "t"}
    if unknown:
        raise ProtocolError(sorted(map(str, unknown))[0], "unknown_field")
    values = {}
    for name, required, check in _layout(cls):
        if name not in body:
            if required:
                raise ProtocolError(name, "missing")
            continue  # optional field: the dataclass default applies
        values[name] = check(name, body[name])
    msg = cls(**values)
    msg._check()
    return msg
