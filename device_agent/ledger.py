"""The device's own ledger: every update it sent and every receipt it got, kept by the device.

Theory of operation
-------------------
The coordinator's counters describe what the coordinator believes. To check them from
outside, each device keeps an append-only file, ``{ledger_dir}/{device_id}.ledger``, that
the coordinator never sees. The agent host (``device_agent/service.py``) appends:

``update``    when the agent has encoded an update, *before* it is saved to the outbox and
              before its first shard is published: round, update id, the coordinator
              incarnation and the model version and digest it trained from, update digest,
              num_samples, codec, layout, and ``delta``: the float32 vector the coordinator
              will aggregate, obtained by decoding the shards exactly as the coordinator
              does (for lossy codecs the decoded values, not what the trainer produced).
``receipt``   each ``ack/{device}`` receipt it receives, before the agent acts on it:
              round, update id, status, reason, shards held. A retained receipt delivered
              again is recorded once per process (repeats across restarts are harmless).
``model``     the initial model (version 0) the device trained from, once per digest: an
              auditor rebuilds round 1 from it, and it is checked against the digest the
              coordinator's manifest named.
``campaign``  the agent saw a new campaign begin (a standing fleet, docs/protocol.md).

Format: records are ``u32 length`` (little endian) + a CBOR map with kind ``k``; vectors
are raw float32 little-endian bytes, digests the 16-byte protocol digests.

fsync policy: every record is fsync'd before the host carries on (for an ``update``: before
the outbox is written and anything is published), so what the ledger lacks was never sent,
and a receipt in it was received. A crash mid-append leaves a torn tail, which is cut off
when the ledger is opened again (that record was never acted on) and skipped by readers.

Cost: one model-sized vector per update on the device's disk; the ledger is opt-in
(``fedsync agent --ledger DIR``, ``[agent] ledger_dir``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsync.codecs import get_codec
from fedsync.errors import ProtocolError
from fedsync.messages import RoundManifest, ShardAck, UpdateShard, decode
from fedsync.params import bitmap_indices, flatten, vector_digest
from fedsync.records import LENGTH, frame, read_records

SUFFIX = ".ledger"


class DeviceLedger:
    """Appends one device's records to ``{ledger_dir}/{device_id}.ledger``.

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> ledger = DeviceLedger(d, "dev-1"); ledger.campaign()
    >>> [r.kind for r in read_device_ledger(ledger.path).records]
    ['campaign']
    """

    def __init__(self, ledger_dir: str | os.PathLike[str], device_id: str) -> None:
        self.device_id = device_id
        Path(ledger_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(ledger_dir) / f"{device_id}{SUFFIX}"
        created = not self.path.exists()
        self._file = open(self.path, "ab")
        _cut_torn_tail(self._file)
        if created:
            _fsync_dir(self.path.parent)  # the new file's name must survive a power cut too
        self._last_receipt: dict[tuple[int, str], tuple] = {}
        self._models: set[bytes] = set()

    def close(self) -> None:
        self._file.close()

    def update(self, payloads, job: RoundManifest | None, retries: int = 0) -> None:
        """Record an encoded update (its wire payloads, as saved to the outbox)."""
        shards = [decode(p, UpdateShard) for p in payloads]
        first = shards[0]
        codec = get_codec(first.codec)
        delta = np.concatenate([codec.decode(s.data, s.length) for s in shards]).astype("<f4")
        same_model = job is not None and job.round_id == first.round_id and job.model_version == first.base_version
        self._append({"k": "update", "device": first.device, "round": first.round_id, "update_id": first.update_id,
                      "federation": job.federation if job is not None else "",
                      "incarnation": job.incarnation if same_model else -1,
                      "base_version": first.base_version, "base_digest": job.model_digest if same_model else b"",
                      "update_digest": first.update_digest, "num_samples": first.num_samples, "codec": first.codec,
                      "num_params": first.num_params, "shards": first.count, "retries": retries,
                      "delta": delta.tobytes(), "at": time.time()})

    def model(self, job: RoundManifest, params: dict[str, np.ndarray]) -> None:
        """Record the initial model (version 0) the device is about to train from, once."""
        if job.model_version != 0 or job.model_digest in self._models:
            return
        vector = np.ascontiguousarray(flatten(params, job.param_spec), "<f4")
        if vector_digest(vector) != job.model_digest:
            return  # not the model the manifest names: nothing to vouch for
        self._models.add(job.model_digest)
        self._append({"k": "model", "version": 0, "digest": job.model_digest, "vector": vector.tobytes(),
                      "at": time.time()})

    def receipt(self, payload: bytes) -> None:
        """Record a receipt from ``ack/{device}`` (bad or foreign payloads are the agent's to count)."""
        try:
            ack = decode(payload, ShardAck)
        except ProtocolError:
            return
        if ack.device != self.device_id:
            return
        held = len(bitmap_indices(ack.held, ack.count))
        key = (ack.status, ack.reason, held)
        if self._last_receipt.get((ack.round_id, ack.update_id)) == key:
            return  # the same retained receipt again
        self._last_receipt[(ack.round_id, ack.update_id)] = key
        self._append({"k": "receipt", "round": ack.round_id, "update_id": ack.update_id, "status": ack.status,
                      "reason": ack.reason, "held": held, "count": ack.count, "at": time.time()})

    def campaign(self) -> None:
        self._append({"k": "campaign", "at": time.time()})

    def _append(self, body: dict) -> None:
        self._file.write(frame(body))
        self._file.flush()
        os.fsync(self._file.fileno())


def _cut_torn_tail(fh) -> None:
    """Truncate a record a crash left half written, so appends do not follow garbage."""
    size = fh.seek(0, os.SEEK_END)
    pos = 0
    with open(fh.name, "rb") as rd:
        while pos + 4 <= size:
            rd.seek(pos)
            (n,) = LENGTH.unpack(rd.read(4))
            if pos + 4 + n > size:
                break
            pos += 4 + n
    if pos != size:
        fh.truncate(pos)
        fh.flush()
        os.fsync(fh.fileno())
    fh.seek(0, os.SEEK_END)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpdateEntry:
    device: str
    round_id: int
    update_id: str
    federation: str
    incarnation: int  # of the coordinator whose manifest the device trained on (-1: unknown)
    base_version: int
    base_digest: bytes  # b"": unknown
    update_digest: bytes
    num_samples: int
    codec: str
    num_params: int
    shards: int
    delta: np.ndarray  # float32: what the coordinator decodes
    at: float
    campaign: int  # index of the campaign segment in this device's ledger (0 = before any marker)


@dataclass(frozen=True, slots=True)
class Receipt:
    round_id: int
    update_id: str
    status: str
    reason: str
    held: int
    count: int
    at: float


@dataclass(frozen=True, slots=True)
class Record:
    kind: str
    body: dict


@dataclass(slots=True)
class DeviceRecords:
    """One device's ledger, read back."""

    device: str
    records: list[Record] = field(default_factory=list)
    updates: list[UpdateEntry] = field(default_factory=list)
    # (round, update id) -> in arrival order. Update ids repeat across rounds after an agent restart
    # (its generator is seeded by the device id): an update is (device, round, update id).
    receipts: dict[tuple[int, str], list[Receipt]] = field(default_factory=dict)
    models: dict[bytes, np.ndarray] = field(default_factory=dict)  # digest -> initial model
    torn_tail: bool = False


def read_device_ledger(path: str | os.PathLike[str]) -> DeviceRecords:
    """Read one ``{device}.ledger`` file (a torn tail is skipped and flagged)."""
    path = Path(path)
    data = path.read_bytes()
    out = DeviceRecords(path.name[:-len(SUFFIX)] if path.name.endswith(SUFFIX) else path.stem)
    campaign = 0
    bodies, out.torn_tail = read_records(data)
    for body in bodies:
        kind = body.get("k", "")
        out.records.append(Record(kind, body))
        if kind == "campaign":
            campaign += 1
        elif kind == "update":
            out.updates.append(UpdateEntry(
                body["device"], body["round"], body["update_id"], body["federation"], body["incarnation"],
                body["base_version"], body["base_digest"], body["update_digest"], body["num_samples"],
                body["codec"], body["num_params"], body["shards"],
                np.frombuffer(body["delta"], "<f4").astype(np.float32), body["at"], campaign))
        elif kind == "receipt":
            out.receipts.setdefault((body["round"], body["update_id"]), []).append(Receipt(
                body["round"], body["update_id"], body["status"], body["reason"], body["held"], body["count"],
                body["at"]))
        elif kind == "model":
            out.models[body["digest"]] = np.frombuffer(body["vector"], "<f4").astype(np.float32)
    return out


def read_ledger_dir(ledger_dir: str | os.PathLike[str]) -> dict[str, DeviceRecords]:
    """Every ``*.ledger`` file in ``ledger_dir``, by device id."""
    return {r.device: r for r in (read_device_ledger(p) for p in sorted(Path(ledger_dir).glob(f"*{SUFFIX}")))}
