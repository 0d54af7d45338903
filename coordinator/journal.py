"""Crash recovery for the coordinator: a checkpoint plus a journal of the open round.

Theory of operation
-------------------
``state_dir`` holds two kinds of file:

* ``checkpoint.cbor`` — the committed state (:class:`fedsync.coordinator.core.Checkpoint`:
  model version and vector, next round id, recently accepted update ids,
  counters, and the aggregation strategy's state across rounds: FedAvgM's
  velocity, FedAdam's moments, dp_fedavg's noise generator; the update screen's
  remembered norms). Written to a
  temporary file, fsync'd, then renamed over the old one (POSIX rename is
  atomic), so a crash leaves either the old or the new checkpoint, never half
  of one. The vector is raw little-endian float32 bytes; a strategy-state array
  is ``{"dtype", "shape", "data"}`` with its raw little-endian bytes (float64
  moments stay float64: a restarted coordinator steps exactly as the crashed
  one would have). A checkpoint from before ``strategy_state`` existed loads
  with ``{}``: the strategy keeps the state it starts with.
* ``round-{id}.log`` — the open round: a header record with the manifest, then
  one record per shard the coordinator newly held, in arrival order. Records
  are ``u32 length`` + CBOR ``[topic, payload]``. The service appends the
  shards of a batch, fsyncs once, and only then sends the broker its
  PUBACK/PUBCOMP (paho manual acknowledgement) and the device its receipt.
  A crash in the middle of a record leaves a short tail, which ``load``
  ignores: that shard was never acknowledged, so the broker redelivers it.

A third file, ``commits.log``, is append-only: one record per round opened and per
checkpoint, with the update ids each round counted and every committed model
(:mod:`fedsync.coordinator.commit_log`). It is for auditors, never read by recovery.

Recovery is replay: restore the checkpoint, re-open the round from its
manifest, feed every journalled shard through the core's ordinary
``on_message``. The assembler's dedup makes replay idempotent, so a shard
journalled twice still counts once. The checkpoint is taken after the
committing round's strategy stepped, so the replayed round steps from the
state the crashed coordinator had when it opened that round.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
import numpy as np

from fedsync.atomic import write_atomic
from fedsync.coordinator import commit_log
from fedsync.coordinator.core import Checkpoint
from fedsync.messages import RoundManifest, decode, encode
from fedsync.records import LENGTH, read_records



@dataclass(slots=True)
class Recovered:
    checkpoint: Checkpoint | None
    manifest: RoundManifest | None = None
    shards: list[tuple[str, bytes]] = field(default_factory=list)
    torn_tail: bool = False


class Journal:
    """Durable state of one coordinator in ``state_dir``."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._log = None
        self._log_path: Path | None = None
        self.records_written = 0
        self._logged_version: int | None = None  # model version of the last commits.log close record

    # -- writing -------------------------------------------------------------

    def note_strategy(self, name: str, options: dict) -> None:
        """Record the aggregation strategy in ``commits.log``, so an audit replays the same one."""
        commit_log.append_strategy(self.dir, name, options)

    def write_checkpoint(self, ck: Checkpoint) -> None:
        # The audit trail first: a crash between the two leaves a close record that the
        # restarted coordinator's replay of the round repeats (commit_log: the last one wins).
        commit_log.append_close(self.dir, ck.closed_through, ck.version, ck.vector,
                                ck.recent.get(ck.closed_through, {}), ck.strategy_state,
                                with_vector=ck.version != self._logged_version)
        self._logged_version = ck.version
        body = {"version": ck.version, "vector": np.ascontiguousarray(ck.vector, "<f4").tobytes(),
                "next_round_id": ck.next_round_id, "closed_through": ck.closed_through, "finished": ck.finished,
                "recent": {int(r): d for r, d in ck.recent.items()}, "stats": ck.stats,
                "strategy_state": {k: _encode_state_value(k, v) for k, v in ck.strategy_state.items()},
                "screen_state": {k: _encode_state_value(k, v) for k, v in ck.screen_state.items()}}
        write_atomic(self.dir / "checkpoint.cbor", cbor2.dumps(body))
        # Round logs at or before the checkpoint are settled: the checkpoint supersedes them.
        for path in self.dir.glob("round-*.log"):
            if path != self._log_path:
                path.unlink(missing_ok=True)

    def open_round(self, manifest: RoundManifest) -> None:
        self.close()
        self._log_path = self.dir / f"round-{manifest.round_id}.log"
        self._log = open(self._log_path, "ab")
        if self._log.tell() == 0:
            self._append_record("manifest", encode(manifest))
            self.sync()
            commit_log.append_open(self.dir, manifest)

    def append(self, topic: str, payload: bytes) -> None:
        if self._log is None:
            raise RuntimeError("journal: no round is open")
        self._append_record(topic, payload)

    def sync(self) -> None:
        """Flush and fsync the round log: after this, everything appended is durable."""
        if self._log is not None:
            self._log.flush()
            os.fsync(self._log.fileno())

    def close(self) -> None:
        if self._log is not None:
            self.sync()
            self._log.close()
            self._log = None

    def _append_record(self, topic: str, payload: bytes) -> None:
        # The record is cbor2.dumps([topic, payload]) written without copying the payload into it:
        # a CBOR array head, the topic, a byte string head, then the payload as it is.
        head = b"\x82" + cbor2.dumps(topic) + _bytes_head(len(payload))
        self._log.write(LENGTH.pack(len(head) + len(payload)) + head)  # type: ignore[union-attr]
        self._log.write(payload)  # type: ignore[union-attr]
        self.records_written += 1

    # -- reading ---------------------------------------------------------------

    def load(self) -> Recovered:
        ck = None
        path = self.dir / "checkpoint.cbor"
        if path.exists():
            body = cbor2.loads(path.read_bytes())
            ck = Checkpoint(body["version"], np.frombuffer(body["vector"], "<f4").astype(np.float32),
                            body["next_round_id"], body["closed_through"], body["finished"],
                            {int(r): d for r, d in body["recent"].items()}, body["stats"],
                            {k: _decode_state_value(k, v) for k, v in body.get("strategy_state", {}).items()},
                            {k: _decode_state_value(k, v) for k, v in body.get("screen_state", {}).items()})
        logs = sorted(self.dir.glob("round-*.log"), key=lambda p: int(p.stem.split("-")[1]))
        if not logs:
            return Recovered(ck)
        data = logs[-1].read_bytes()
        rec = Recovered(ck)
        bodies, rec.torn_tail = read_records(data)
        for topic, payload in bodies:
            if topic == "manifest":
                rec.manifest = decode(payload, RoundManifest)
            else:
                rec.shards.append((topic, payload))
        if rec.manifest is None or (ck is not None and rec.manifest.round_id <= ck.closed_through):
            return Recovered(ck)  # that round closed after the log was written: settled
        return rec


def _encode_state_value(key: str, value: object) -> object:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _ARRAY_KINDS:
            raise ValueError(f"strategy state {key!r}: cannot store an array of dtype {value.dtype}")
        wire = value.dtype.newbyteorder("<")
        return {"dtype": wire.str, "shape": list(value.shape), "data": np.ascontiguousarray(value, wire).tobytes()}
    if isinstance(value, (bool, int, float, str)):
        return value  # CBOR has them all; ints beyond 64 bits (a PCG64 state) as bignums (RFC 8949 §3.4.3)
    raise ValueError(f"strategy state {key!r}: cannot store a {type(value).__name__}")


def _decode_state_value(key: str, value: object) -> object:
    if not isinstance(value, dict):
        return value
    dtype = np.dtype(value["dtype"])
    shape = tuple(value["shape"])
    if dtype.kind not in _ARRAY_KINDS or len(value["data"]) != dtype.itemsize * math.prod(shape):
        raise ValueError(f"checkpoint: strategy state {key!r} is not {math.prod(shape)} values of {dtype}")
    return np.frombuffer(value["data"], dtype).reshape(shape).astype(dtype.newbyteorder("="))  # a writable copy


_ARRAY_KINDS = "biuf"  # numbers only: never an object array


def _bytes_head(n: int) -> bytes:
    """The CBOR head of a byte string of ``n`` bytes (RFC 8949 §3: major type 2)."""
    if n < 24:
        return bytes([0x40 | n])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([0x40 | info]) + n.to_bytes(size, "big")
    raise ValueError(f"byte string of {n} bytes")
