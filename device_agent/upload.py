"""An update as the device sends it: its shards, their topics, and what it keeps to re-send.

Theory of operation
-------------------
:func:`encode_update` turns a round's delta into the shards the wire contract describes
(docs/protocol.md "Update shards"): the vector cut into ``shard_values`` slices, each encoded
with the round's codec, digested, bound by the update digest to the federation, device,
round, update id and base model, and (optionally) signed. The result, an :class:`Upload`,
is what the agent holds until a final receipt: the encoded payloads (re-sent as they are,
so a resend is byte-identical and the coordinator drops it as a duplicate), which shards
the coordinator's receipts say it holds, and the delta (to re-encode under a fresh id after
a retryable rejection). An upload restored from the outbox has no delta;
:func:`decode_upload` recovers it from the payloads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedsync.codecs import get_codec
from fedsync.device_agent.agent_actions import OutboxRecord
from fedsync.executor import INLINE, Executor
from fedsync.messages import RoundManifest, UpdateShard, decode, encode
from fedsync.params import digest, shard_slices, update_digest
from fedsync.signing import signing_message
from fedsync.topics import Topics


@dataclass(slots=True)
class Upload:
    round_id: int
    update_id: str
    payloads: list[bytes]
    topics: list[str]
    num_samples: int
    metrics: dict[str, float]
    delta: np.ndarray | None = None  # kept so a rejected update can be re-sent under a fresh id
    held: set[int] = field(default_factory=set)
    retries: int = 0
    restored: bool = False  # from an earlier run's outbox, nothing re-sent yet
    receipt_seen: bool = False  # a receipt for it arrived since it was restored

    def record(self, qos: int) -> OutboxRecord:
        return OutboxRecord(self.round_id, self.update_id, qos, tuple(self.topics), tuple(self.payloads), self.retries)

    @classmethod
    def restored_from(cls, record: OutboxRecord) -> Upload:
        first = decode(record.payloads[0], UpdateShard)
        return cls(record.round_id, record.update_id, list(record.payloads), list(record.topics),
                   first.num_samples, dict(first.metrics), None, retries=record.retries, restored=True)


def encode_update(m: RoundManifest, delta: np.ndarray, num_samples: int, metrics: dict[str, float], *,
                  device_id: str, topics: Topics, update_id: str, signer=None, executor: Executor = INLINE,
                  datas: list[bytes] | None = None) -> Upload:
    """Shard, digest and (if ``signer``) sign ``delta`` for round ``m``; ``datas`` are the shards
    already encoded with the round's codec (error feedback encodes them), else they are encoded here."""
    codec = get_codec(m.update_codec)
    slices = shard_slices(m.num_params, m.shard_values)
    if datas is None:
        datas = executor.split_map(lambda sl: codec.encode(delta[sl[0]:sl[0] + sl[1]]), slices)
    digests = [digest(d) for d in datas]
    whole = update_digest(digests, federation=topics.federation, device=device_id, round_id=m.round_id,
                          update_id=update_id, base_version=m.model_version, base_digest=m.model_digest)
    signature = b""
    if signer is not None:
        signature = signer.sign(signing_message(topics.federation, device_id, m.round_id, update_id, whole,
                                                num_samples))
    payloads, shard_topics = [], []
    for i, ((off, n), data, dg) in enumerate(zip(slices, datas, digests)):
        shard = UpdateShard(device_id, m.round_id, update_id, m.model_version, i, len(slices), off, n,
                            m.num_params, codec.name, num_samples, dg, whole, data, metrics, signature)
        payloads.append(encode(shard))
        shard_topics.append(topics.up(device_id, m.round_id, update_id, i))
    return Upload(m.round_id, update_id, payloads, shard_topics, num_samples, metrics, delta)


def decode_upload(up: Upload) -> np.ndarray:
    """The delta an upload's payloads carry (as the coordinator will decode it)."""
    shards = [decode(p, UpdateShard) for p in up.payloads]
    codec = get_codec(shards[0].codec)
    return np.concatenate([codec.decode(s.data, s.length) for s in shards])
