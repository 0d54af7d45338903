"""Reassembly of device updates from shards, with deduplication and verification.

Theory of operation
-------------------
The assembler is sans-IO: it is fed decoded :class:`UpdateShard` messages for
the round it was built for and answers with a :class:`ShardOutcome`. It never
reads a clock or touches the network.

Per device it keeps at most one *open* update (the one being reassembled) and
remembers whether the device already has an accepted update this round. The
rules, in the order they are checked:

1. The shard must belong to this round and this round's layout (model version,
   vector length, shard count, codec, offset/length) — else ``rejected``.
2. Its digest must match its bytes — else ``rejected`` (reason ``digest``).
3. If the device already has an accepted update this round, the shard is a
   ``duplicate`` (first complete update per device and round wins).
4. A shard index already held for the same update is a ``duplicate`` (QoS 1
   redelivery, a resend after reconnect). A device may have several update ids
   open (it re-encoded after a restart); whichever completes first wins and the
   others are dropped.
5. When the last shard of an update arrives the ordered shard digests, bound to
   the round's federation, the device, the round, the update id and the base
   model (``fedsync.params.update_digest``), must hash to ``update_digest``, so
   a payload moved to another round, device or base fails here; then every shard is decoded with the round's
   codec. Any failure rejects the whole update (reason ``update_digest`` or
   ``decode``) and forgets it, so the device can send a fresh one. (Dense
   codecs, raw and zstd, are decoded as each shard arrives, every other one
   through the ``executor`` the assembler was given (:mod:`fedsync.executor`:
   inline by default, the coordinator service's helper thread in production);
   their errors are collected here, so the outcome is the same.)

Only a complete, verified update is returned (``complete`` with ``vector``),
so nothing partial can reach the aggregate and nothing is counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from fedsync.codecs import get_codec
from fedsync.errors import ProtocolError
from fedsync.executor import INLINE, Executor, Pending
from fedsync.messages import UpdateShard
from fedsync.params import bitmap, check_shard_layout, digest, update_digest
from fedsync.signing import signing_message


@dataclass(frozen=True, slots=True)
class RoundLayout:
    """What every update shard of one round must agree with."""

    round_id: int
    model_version: int
    num_params: int
    shard_values: int
    codec: str
    base_digest: bytes = b""  # the manifest's model_digest: every update digest binds it

    @property
    def shard_count(self) -> int:
        return -(-self.num_params // self.shard_values)


@dataclass(frozen=True, slots=True)
class CompleteUpdate:
    device: str
    round_id: int
    update_id: str
    num_samples: int
    vector: np.ndarray  # decoded float32 delta, length num_params
    metrics: dict[str, float]


@dataclass(frozen=True, slots=True)
class ShardOutcome:
    """What one shard did. ``kind`` is one of accepted, duplicate, rejected, complete;
    a rejection names the ``field`` that failed and its ``reason`` code."""

    kind: str
    device: str
    update_id: str
    reason: str = ""
    held: bytes = b""
    update: CompleteUpdate | None = None
    field: str = ""


@dataclass(slots=True)
class _OpenUpdate:
    update_id: str
    num_samples: int
    update_digest: bytes
    signature: bytes = b""
    shards: dict[int, UpdateShard] = field(default_factory=dict)
    vector: np.ndarray | None = None  # eager decoding: the update's values, filled in as shards arrive
    decoding: list[Pending] = field(default_factory=list)  # eager decodes still running or unchecked


class ShardAssembler:
    """Reassembles, deduplicates and verifies the updates of one round.

    >>> layout = RoundLayout(round_id=1, model_version=0, num_params=3, shard_values=2, codec="raw")
    >>> asm = ShardAssembler(layout)
    >>> asm.accepted_devices
    set()
    """

    def __init__(self, layout: RoundLayout, verifier=None, federation: str = "", *,
                 executor: Executor = INLINE) -> None:
        self.layout = layout
        self.executor = executor  # where half the decoding runs (fedsync.executor)
        self.verifier = verifier  # fedsync.signing verifier: every update must carry a valid signature
        self.federation = federation
        self._codec = get_codec(layout.codec)
        # Codecs that decode in place into a dense vector (raw, zstd) are decoded as shards arrive;
        # sparse ones (top-k, int8) wait for the whole update, so an open update stays small.
        self._eager = self._codec.decode_into is not None
        self._open: dict[tuple[str, str], _OpenUpdate] = {}
        self._accepted: dict[str, str] = {}  # device -> accepted update id
        self._refused: set[str] = set()  # complete and verified, but refused by policy (norm bound, ...)

    @property
    def accepted_devices(self) -> set[str]:
        return set(self._accepted)

    @property
    def refused_devices(self) -> set[str]:
        return set(self._refused)

    def mark_refused(self, device: str) -> None:
        """The device's complete update failed a policy check: it does not count, and the
        device may not try again this round (its later shards are duplicates)."""
        self._accepted.pop(device, None)
        self._refused.add(device)

    def accepted_update(self, device: str) -> str | None:
        """The update id accepted for ``device`` this round, if any."""
        return self._accepted.get(device)

    def open_updates(self) -> int:
        return len(self._open)

    def held(self, device: str, update_id: str) -> bytes:
        """Bitmap of the shards held for ``(device, update_id)``."""
        if self._accepted.get(device) == update_id:
            return bitmap(range(self.layout.shard_count), self.layout.shard_count)
        op = self._open.get((device, update_id))
        return bitmap(op.shards if op else (), self.layout.shard_count)

    def add(self, shard: UpdateShard, digest_checked: bool = False) -> ShardOutcome:
        """Feed one decoded shard; see the module docstring for the rules.

        ``digest_checked=True``: the caller already verified ``shard.digest`` (the
        coordinator does, before its stale-round path), so it is not hashed twice."""
        try:
            self._check_layout(shard)
        except ProtocolError as err:
            return ShardOutcome("rejected", shard.device, shard.update_id, reason=err.reason, field=err.field)
        if not digest_checked and digest(shard.data) != shard.digest:
            return ShardOutcome("rejected", shard.device, shard.update_id, reason="digest",
                                held=self.held(shard.device, shard.update_id), field="digest")
        if shard.device in self._refused:
            return ShardOutcome("duplicate", shard.device, shard.update_id, reason="update_refused",
                                held=self.held(shard.device, shard.update_id))
        if shard.device in self._accepted:
            return ShardOutcome("duplicate", shard.device, shard.update_id, reason="update_already_accepted",
                                held=self.held(shard.device, shard.update_id))
        key = (shard.device, shard.update_id)
        op = self._open.get(key)
        if op is None:
            op = self._open[key] = _OpenUpdate(shard.update_id, shard.num_samples, shard.update_digest,
                                               shard.signature)
        elif (op.update_digest, op.num_samples, op.signature) != (shard.update_digest, shard.num_samples,
                                                                  shard.signature):
            differs = next(name for name, a, b in (("update_digest", op.update_digest, shard.update_digest),
                                                   ("num_samples", op.num_samples, shard.num_samples),
                                                   ("signature", op.signature, shard.signature)) if a != b)
            return ShardOutcome("rejected", shard.device, shard.update_id, reason="inconsistent_update",
                                held=self.held(*key), field=differs)
        if shard.index in op.shards:
            return ShardOutcome("duplicate", shard.device, shard.update_id, reason="shard_already_held",
                                held=self.held(*key))
        if self._eager:
            self._decode_early(op, shard)
        else:
            op.shards[shard.index] = shard
        if len(op.shards) < self.layout.shard_count:
            return ShardOutcome("accepted", shard.device, shard.update_id, held=self.held(*key))
        return self._complete(key, op)

    def _signed(self, device: str, update_id: str, op: _OpenUpdate) -> bool:
        try:
            msg = signing_message(self.federation, device, self.layout.round_id, update_id, op.update_digest,
                                  op.num_samples)
        except ValueError:
            return False
        return bool(op.signature) and self.verifier.verify(device, msg, op.signature)

    def _decode_early(self, op: _OpenUpdate, shard: UpdateShard) -> None:
        """Dense codecs: decode the shard now into the update's vector and keep the shard without
        its data — odd shards here, even ones through the executor (with the helper thread,
        one thread doing them all was slower with zstd: it became the bottleneck). Errors are
        kept until the update completes. A payload is freed as soon as its values are in place, so an open update
        holds about as much memory as before (its values instead of its bytes)."""
        if op.vector is None:
            op.vector = np.empty(self.layout.num_params, dtype=np.float32)
        out = op.vector[shard.offset:shard.offset + shard.length]
        data, codec = shard.data, self._codec
        where = INLINE if shard.index % 2 else self.executor
        op.decoding.append(where.submit(lambda: codec.decode_to(data, out)))
        op.shards[shard.index] = replace(shard, data=b"")

    def _check_layout(self, s: UpdateShard) -> None:
        lay = self.layout
        if s.round_id != lay.round_id:
            raise ProtocolError("round_id", "stale_round", f"{s.round_id} != {lay.round_id}")
        if s.base_version != lay.model_version:
            raise ProtocolError("base_version", "base_version", f"{s.base_version} != {lay.model_version}")
        if s.num_params != lay.num_params:
            raise ProtocolError("num_params", "shape", f"{s.num_params} != {lay.num_params}")
        if s.count != lay.shard_count:
            raise ProtocolError("count", "shape", f"{s.count} != {lay.shard_count}")
        if s.codec != lay.codec:
            raise ProtocolError("codec", "codec", f"{s.codec!r} != {lay.codec!r}")
        check_shard_layout(s.offset, s.length, s.index, lay.shard_values, lay.num_params)

    def _complete(self, key: tuple[str, str], op: _OpenUpdate) -> ShardOutcome:
        device, update_id = key
        del self._open[key]
        ordered = [op.shards[i] for i in range(self.layout.shard_count)]
        if update_digest((s.digest for s in ordered), federation=self.federation, device=device,
                         round_id=self.layout.round_id, update_id=update_id, base_version=self.layout.model_version,
                         base_digest=self.layout.base_digest) != op.update_digest:
            return ShardOutcome("rejected", device, update_id, reason="update_digest", held=b"",
                                field="update_digest")
        if self.verifier is not None and not self._signed(device, update_id, op):
            # Verified before the update is accepted: a forgery cannot block the device's genuine update.
            return ShardOutcome("rejected", device, update_id, reason="signature", held=b"", field="signature")
        try:
            if op.vector is not None:
                vector = op.vector
                for job in op.decoding:
                    job.result()
            else:
                vector = np.empty(self.layout.num_params, dtype=np.float32)
                # zstd and numpy copies release the GIL: half the shards decode on a second core.
                decode = self._codec.decode_to
                self.executor.split_map(lambda s: decode(s.data, vector[s.offset:s.offset + s.length]), ordered)
        except ProtocolError as err:
            return ShardOutcome("rejected", device, update_id, reason=f"decode_{err.reason}", held=b"",
                                field=err.field)
        self._accepted[device] = update_id
        # Other open updates of this device can never win now: drop them.
        for other in [k for k in self._open if k[0] == device]:
            del self._open[other]
        update = CompleteUpdate(device, self.layout.round_id, update_id, op.num_samples, vector,
                                dict(ordered[0].metrics))
        return ShardOutcome("complete", device, update_id, held=self.held(device, update_id), update=update)
