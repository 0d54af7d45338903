"""The device agent's protocol logic, with no I/O.

Theory of operation
-------------------
:class:`AgentCore` follows the retained manifest. For a round that selects
this device it fetches the global model (retained shards under
``model/{version}/+``, verified shard by shard and then as a whole against the
manifest's digest), asks its adapter to train (a :class:`Train` action; the
adapter calls :meth:`AgentCore.on_trained` when done), encodes the delta
``local - global`` with the round's codec into shards and publishes them.
It then waits for the coordinator's retained ``ack/{device}``: ``accepted``,
``duplicate`` or ``closed`` end the round for this device; ``rejected``
re-encodes under a fresh update id; ``partial`` records progress. If no
progress is seen for ``resend_after`` seconds the shards the coordinator does
not hold are sent again (the coordinator drops duplicates, so resending is
always safe).

========  ====================================  ==========  =========================================
state     event                                 next        actions
========  ====================================  ==========  =========================================
idle      manifest open, selected, model cached training    Train
idle      manifest open, selected               fetching    Subscribe model/{v}/+
fetching  last model shard, digest ok           training    Unsubscribe, Train
training  on_trained for the current round      uploading   Publish every shard
uploading ack accepted / duplicate / closed     done        —
uploading ack rejected (retries left)           uploading   Publish every shard under a new update id
uploading tick, no progress for resend_after    uploading   Publish the shards not held
any       manifest for another round / waiting  idle        (work for the old round is dropped)
any       manifest finished                     finished    Finished
finished  manifest open or waiting              idle        CampaignStarted (a new campaign)
any       new incarnation, round id or model    idle        CampaignStarted (a campaign we missed the
          version lower than the last seen                  end of; cached model and residual dropped)
========  ====================================  ==========  =========================================

A standing fleet therefore needs no restart between campaigns: the adapter keeps
the agent connected after ``Finished`` unless it was asked to run one campaign.
Each round ends with one ``round_done`` note (what was fetched, trained and
uploaded, and the receipt) that the adapter logs at INFO.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from fedsync.actions import Publish, Subscribe, Unsubscribe
from fedsync.codecs import get_codec
from fedsync.errors import ProtocolError
from fedsync.messages import ModelShard, RoundManifest, ShardAck, UpdateShard, decode, encode
from fedsync.params import (bitmap_indices, check_shard_layout, digest, flatten, shard_slices, unflatten,
                            update_digest, vector_digest)
from fedsync.signing import signing_message
from fedsync.topics import Topics


@dataclass(frozen=True, slots=True)
class Train:
    """Adapter: run the trainer on ``params`` and call ``on_trained``."""

    round_id: int
    params: dict[str, np.ndarray]
    hyper: dict[str, float]


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """A finished update as persisted on the device before upload (see outbox.py)."""

    round_id: int
    update_id: str
    qos: int
    topics: tuple[str, ...]
    payloads: tuple[bytes, ...]
    retries: int = 0


@dataclass(frozen=True, slots=True)
class SaveOutbox:
    """Adapter: persist this record durably before carrying out the actions after it."""

    record: OutboxRecord


@dataclass(frozen=True, slots=True)
class ClearOutbox:
    """Adapter: the update of this round needs no more sending; delete it."""

    round_id: int


@dataclass(frozen=True, slots=True)
class Finished:
    """The federation has finished; the adapter may stop."""


@dataclass(frozen=True, slots=True)
class CampaignStarted:
    """A new campaign began after one this agent saw finish (or lost track of)."""


@dataclass(frozen=True, slots=True)
class Note:
    """Something worth a log line (event name plus fields)."""

    event: str
    fields: dict = field(default_factory=dict)


@dataclass(slots=True)
class AgentStats:
    bytes_up: int = 0
    bytes_down: int = 0
    shards_sent: int = 0
    shards_resent: int = 0
    rounds_accepted: int = 0
    updates_rejected: int = 0
    model_fetches: int = 0
    delta_fetches: int = 0
    refetches: int = 0
    bad_messages: int = 0


@dataclass(slots=True)
class _Upload:
    round_id: int
    update_id: str
    payloads: list[bytes]
    topics: list[str]
    num_samples: int
    metrics: dict[str, float]
    delta: np.ndarray | None = None  # kept so a rejected update can be re-sent under a fresh id
    held: set[int] = field(default_factory=set)
    retries: int = 0

    def record(self, qos: int) -> OutboxRecord:
        return OutboxRecord(self.round_id, self.update_id, qos, tuple(self.topics), tuple(self.payloads), self.retries)


RESUME_GRACE = 1.0  # seconds to wait for the retained receipt before re-sending a restored upload


class AgentCore:
    """One device's side of the protocol.

    >>> core = AgentCore("dev-1", Topics("t"), random.Random(0))
    >>> [a.topic_filter for a in core.on_connect(now=0.0)]
    ['fedsync/t/manifest', 'fedsync/t/ack/dev-1']
    """

    def __init__(self, device_id: str, topics: Topics, rng: random.Random, *,
                 resend_after: float = 10.0, max_retries: int = 3, signer=None) -> None:
        self.device_id = device_id
        self.topics = topics
        self.rng = rng
        self.resend_after = resend_after
        self.max_retries = max_retries
        self.signer = signer  # fedsync.signing.HmacSigner / Ed25519Signer, or None
        self.state = "idle"
        self.manifest: RoundManifest | None = None  # the newest manifest seen
        self.job: RoundManifest | None = None  # the manifest of the work in hand (fetch, train, upload)
        self.stats = AgentStats()
        self._model: tuple[int, bytes, np.ndarray] | None = None  # version, digest, vector
        self._fetch: dict[int, np.ndarray] = {}
        self._fetch_base = -1  # >= 0 while fetching a delta from that version
        self._upload: _Upload | None = None
        self._progress_at = 0.0
        self.feedback = None  # fedsync.codecs.lossy.ErrorFeedback, for biased codecs (top-k)
        self._job_start = (0, 0)  # (bytes_down, bytes_up) when the current job began: the round's traffic
        self._skipped_round = -1

    # -- inputs -----------------------------------------------------------------

    def on_connect(self, now: float) -> list:
        self._progress_at = now  # give a resumed upload a full resend window
        return [Subscribe(self.topics.manifest, 1), Subscribe(self.topics.ack(self.device_id), 1)]

    def on_message(self, topic: str, payload: bytes, now: float) -> list:
        """Feed one broker message; bad input is counted and noted, never raised."""
        if not payload:
            return []  # a cleared retained message
        try:
            if topic == self.topics.manifest:
                return self._on_manifest(decode(payload, RoundManifest), now)
            if topic == self.topics.ack(self.device_id):
                return self._on_ack(decode(payload, ShardAck), now)
            if topic.startswith((self.topics.root + "/model/", self.topics.root + "/modeldelta/")):
                self.stats.bytes_down += len(payload)
                return self._on_model_shard(topic, decode(payload, ModelShard), now)
        except ProtocolError as err:
            self.stats.bad_messages += 1
            return [Note("bad_message", {"topic": topic, "error": str(err)})]
        return []  # not ours: every client filters by topic (amqtt leaks retained messages)

    def on_trained(self, round_id: int, params: dict[str, np.ndarray], num_samples: int,
                   metrics: dict[str, float], now: float) -> list:
        m = self.job
        if m is None or self.state != "training" or m.round_id != round_id or self._model is None:
            return [Note("update_dropped", {"round": round_id, "reason": "round closed"})]
        delta = flatten(params, m.param_spec) - self._model[2]
        codec = get_codec(m.update_codec)
        datas = None
        if codec.error_feedback:
            delta, datas = self._feedback_compensate(delta, codec, m)
        self._upload = self._encode(m, delta, num_samples, metrics, datas)
        self.state = "uploading"
        self._progress_at = now
        # Persist first: a crash after this line resumes the upload instead of retraining.
        return [SaveOutbox(self._upload.record(m.update_qos))] + self._send(range(len(self._upload.payloads)))

    def restore(self, record: OutboxRecord) -> None:
        """Resume an update persisted by an earlier run (call before ``on_connect``).

        Sending resumes once the retained manifest confirms the round is still open;
        if it is not, the update is dropped with a log line."""
        first = decode(record.payloads[0], UpdateShard)
        self._upload = _Upload(record.round_id, record.update_id, list(record.payloads), list(record.topics),
                               first.num_samples, dict(first.metrics), None, retries=record.retries)
        self.state = "restored"

    def _feedback_compensate(self, delta: np.ndarray, codec, m: RoundManifest) -> tuple[np.ndarray, list[bytes]]:
        """Error feedback for top-k (Karimireddy et al. 2019): send delta + residual; keep what
        the codec dropped for the next round. The residual lives on the device only.

        Returns what the coordinator will decode and the encoded shards themselves, so they
        are not encoded a second time."""
        from fedsync.codecs.lossy import ErrorFeedback

        if self.feedback is None or self.feedback.num_params != delta.size:
            self.feedback = ErrorFeedback(delta.size)
        compensated = self.feedback.compensate(delta)
        slices = shard_slices(m.num_params, m.shard_values)
        datas = [codec.encode(compensated[o:o + n]) for o, n in slices]
        decoded = np.concatenate([codec.decode(d, n) for d, (_, n) in zip(datas, slices)])
        self.feedback.update(compensated, decoded)
        return decoded, datas

    def tick(self, now: float) -> list:
        if self.state == "fetching" and self.job is not None and now - self._progress_at >= self.resend_after:
            # No model shard for a while (lost in a reset, or a broker that dropped it):
            # subscribe again, and the broker re-sends the retained shards.
            self._progress_at = now
            self.stats.refetches += 1
            flt = self._fetch_filter(self.job)
            return [Note("refetch", {"round": self.job.round_id, "have": len(self._fetch)}),
                    Unsubscribe(flt), Subscribe(flt, 1)]
        up = self._upload
        if self.state != "uploading" or up is None or now - self._progress_at < self.resend_after:
            return []
        self._progress_at = now
        missing = [i for i in range(len(up.payloads)) if i not in up.held]
        self.stats.shards_resent += len(missing)
        return [Note("resend", {"round": up.round_id, "update": up.update_id, "shards": len(missing)})] + self._send(missing)

    # -- manifest -------------------------------------------------------------------

    def _on_manifest(self, m: RoundManifest, now: float) -> list:
        if m.federation != self.topics.federation:
            raise ProtocolError("federation", "value", f"{m.federation!r} is not {self.topics.federation!r}")
        out = self._new_campaign(m) if self.manifest is not None else []
        self.manifest = m
        if m.state == "finished":
            self.state = "finished"
            return out + self._stop_fetch() + [Finished()]  # a pending upload still takes its late receipt
        if out:
            return out + self._next_job(now)
        up = self._upload
        if up is not None and up.round_id == m.round_id and m.state == "open":
            # Same round (a redelivery, a coordinator restart, or our own restart from the outbox):
            # keep uploading; the coordinator's receipt says which shards it holds.
            self.job = m
            if self.state != "uploading":
                self.state = "uploading"
                self._progress_at = now - self.resend_after + RESUME_GRACE
            return []
        job = self.job
        if job is not None and job.round_id == m.round_id and self.state in ("fetching", "training", "done"):
            self.job = m  # nothing changed for us (a redelivery or a coordinator restart)
            return []
        if m.mode == "async" and self.state in ("training", "uploading"):
            return []  # FedBuff: work on an older model still counts; the next job starts when it ends
        return self._next_job(now)

    def _new_campaign(self, m: RoundManifest) -> list:
        """``[CampaignStarted, ...]`` if ``m`` starts another campaign than the last manifest's, else []."""
        last = self.manifest
        assert last is not None
        if last.state == "finished" and m.state != "finished":
            why = "previous campaign finished"
        elif m.incarnation != last.incarnation and (m.round_id < last.round_id or m.model_version < last.model_version):
            why = "the coordinator started over"  # round ids and versions only grow within a campaign
        else:
            return []
        out: list = [CampaignStarted(), Note("campaign_started", {"reason": why, "round": m.round_id,
                                                                  "version": m.model_version})]
        out += self._stop_fetch()
        if self._upload is not None:
            out.append(ClearOutbox(self._upload.round_id))
        self.state, self.job, self._upload, self._model, self.feedback = "idle", None, None, None, None
        self._skipped_round = -1
        return out

    def _next_job(self, now: float) -> list:
        """Drop work for a closed round and start on the newest manifest, if it selects us."""
        m = self.manifest
        out = self._stop_fetch()
        up = self._upload
        if up is not None:
            out += [Note("update_dropped", {"round": up.round_id, "reason": "round closed"}), ClearOutbox(up.round_id)]
            self._upload = None
        self.state = "idle"
        if m is None or m.state != "open":
            return out
        if self.device_id not in m.selected:
            if self._skipped_round != m.round_id:
                self._skipped_round = m.round_id
                out.append(Note("round_skipped", {"round": m.round_id, "reason": "not selected",
                                                  "selected": len(m.selected)}))
            return out
        if self.job is not None and (self.job.round_id, self.job.model_digest) == (m.round_id, m.model_digest):
            return out  # already did this round's work
        self.job = m
        self._job_start = (self.stats.bytes_down, self.stats.bytes_up)
        if self._model is not None and self._model[:2] == (m.model_version, m.model_digest):
            return out + self._train(m)
        self.state = "fetching"
        self._fetch = {}
        self.stats.model_fetches += 1
        self._progress_at = now
        # One version behind and a delta is published: fetch only the difference.
        have = self._model[0] if self._model is not None else -1
        self._fetch_base = m.delta_from if m.delta_from >= 0 and have == m.delta_from else -1
        self.stats.delta_fetches += self._fetch_base >= 0
        return out + [Subscribe(self._fetch_filter(m), 1)]

    def _stop_fetch(self) -> list:
        if self.state == "fetching" and self.job is not None:
            self._fetch = {}
            return [Unsubscribe(self._fetch_filter(self.job))]
        return []

    def _on_model_shard(self, topic: str, s: ModelShard, now: float) -> list:
        m = self.job
        version, index, base = self.topics.parse_model(topic)
        if self.state != "fetching" or m is None or version != m.model_version or base != self._fetch_base:
            return []  # an old version's shard, or one we no longer need
        if (s.version, s.index, s.base) != (version, index, base):
            raise ProtocolError("index", "topic_mismatch", f"shard {s.version}/{s.index} on topic {version}/{index}")
        if s.num_params != m.num_params or s.count != m.model_shards or s.codec != m.model_codec:
            raise ProtocolError("model", "layout", "shard does not match the manifest")
        check_shard_layout(s.offset, s.length, s.index, m.shard_values, m.num_params)
        if digest(s.data) != s.digest:
            raise ProtocolError("digest", "digest", f"model shard {index}")
        self._fetch[index] = get_codec(s.codec).decode(s.data, s.length)
        self._progress_at = now
        if len(self._fetch) < m.model_shards:
            return []
        vector = np.concatenate([self._fetch[i] for i in range(m.model_shards)])
        self._fetch = {}
        out: list = [Unsubscribe(self._fetch_filter(m))]
        if base >= 0:
            assert self._model is not None and self._model[0] == base
            vector = (self._model[2] + vector).astype(np.float32)  # exact: see coordinator/model_store.py
        if vector_digest(vector) != m.model_digest:
            out.append(Note("model_digest_mismatch", {"version": version, "delta_from": base}))
            if base >= 0:  # fall back to the full model
                self._fetch_base = -1
                return out + [Subscribe(self.topics.model_filter(m.model_version), 1)]
            self.state = "idle"
            return out
        self._model = (m.model_version, m.model_digest, vector)
        return out + self._train(m)

    def _fetch_filter(self, m: RoundManifest) -> str:
        if self._fetch_base >= 0:
            return self.topics.model_delta_filter(self._fetch_base, m.model_version)
        return self.topics.model_filter(m.model_version)

    def _train(self, m: RoundManifest) -> list:
        assert self._model is not None
        self.state = "training"
        return [Train(m.round_id, unflatten(self._model[2], m.param_spec), dict(m.hyper))]

    # -- upload -----------------------------------------------------------------

    def _encode(self, m: RoundManifest, delta: np.ndarray, num_samples: int, metrics: dict[str, float],
                datas: list[bytes] | None = None) -> _Upload:
        """Shard, digest and (optionally) sign an update; ``datas`` are the shards already
        encoded with the round's codec (error feedback encodes them), else they are encoded here."""
        codec = get_codec(m.update_codec)
        update_id = f"u{self.rng.getrandbits(48):012x}"
        slices = shard_slices(m.num_params, m.shard_values)
        if datas is None:
            datas = [codec.encode(delta[off:off + n]) for off, n in slices]
        digests = [digest(d) for d in datas]
        whole = update_digest(digests)
        signature = b""
        if self.signer is not None:
            signature = self.signer.sign(signing_message(self.topics.federation, self.device_id, m.round_id,
                                                         update_id, whole, num_samples))
        payloads, topics = [], []
        for i, ((off, n), data, dg) in enumerate(zip(slices, datas, digests)):
            shard = UpdateShard(self.device_id, m.round_id, update_id, m.model_version, i, len(slices), off, n,
                                m.num_params, codec.name, num_samples, dg, whole, data, metrics, signature)
            payloads.append(encode(shard))
            topics.append(self.topics.up(self.device_id, m.round_id, update_id, i))
        return _Upload(m.round_id, update_id, payloads, topics, num_samples, metrics, delta)

    def _send(self, indices) -> list:
        up = self._upload
        assert up is not None and self.job is not None
        qos = self.job.update_qos
        out = []
        for i in indices:
            out.append(Publish(up.topics[i], up.payloads[i], qos, False))
            self.stats.bytes_up += len(up.payloads[i])
            self.stats.shards_sent += 1
        return out

    def _on_ack(self, ack: ShardAck, now: float) -> list:
        up = self._upload
        if ack.device != self.device_id:
            raise ProtocolError("device", "topic_mismatch", f"ack for {ack.device!r}")
        if up is None or (ack.round_id, ack.update_id) != (up.round_id, up.update_id):
            return []  # an old round's receipt (retained), or one for an update we replaced
        if ack.count != len(up.payloads):
            raise ProtocolError("count", "mismatch", f"ack for {ack.count} shards, update has {len(up.payloads)}")
        held = set(bitmap_indices(ack.held, ack.count))
        if len(held) > len(up.held):
            self._progress_at = now
        up.held = held
        if ack.status in ("accepted", "duplicate", "closed", "refused"):
            # The receipt may arrive after the final manifest (no ordering across topics).
            self.state = "finished" if self.state == "finished" else "done"
            self._upload = None
            if ack.status == "accepted":
                self.stats.rounds_accepted += 1
            out = [self._round_done(ack, up), ClearOutbox(ack.round_id)]
            if self.state == "done" and self.manifest is not None and self.manifest.round_id != ack.round_id:
                out += self._next_job(now)  # async: a newer model is already out
            return out
        if ack.status == "rejected":
            self.stats.updates_rejected += 1
            if up.retries >= self.max_retries or self.state == "finished":
                self.state, self._upload = ("finished" if self.state == "finished" else "done"), None
                return [Note("update_given_up", {"round": ack.round_id, "reason": ack.reason}),
                        ClearOutbox(ack.round_id)]
            # The coordinator forgot the bad update; send the same delta under a fresh id.
            return [Note("update_rejected", {"round": ack.round_id, "reason": ack.reason})] + self._reencode(now)
        return []

    def _round_done(self, ack: ShardAck, up: _Upload) -> Note:
        down0, up0 = self._job_start
        fields = {"round": ack.round_id, "status": ack.status, "fetched_bytes": self.stats.bytes_down - down0,
                  "samples": up.num_samples, "shards": len(up.payloads), "uploaded_bytes": self.stats.bytes_up - up0}
        if "train_loss" in up.metrics:
            fields["train_loss"] = up.metrics["train_loss"]
        if ack.reason:
            fields["reason"] = ack.reason
        return Note("round_done", fields)

    def _reencode(self, now: float) -> list:
        up = self._upload
        assert up is not None and self.job is not None
        delta = up.delta if up.delta is not None else self._decode_upload(up)
        fresh = self._encode(self.job, delta, up.num_samples, up.metrics)
        fresh.retries = up.retries + 1
        self._upload = fresh
        self._progress_at = now
        return [SaveOutbox(fresh.record(self.job.update_qos))] + self._send(range(len(fresh.payloads)))

    def _decode_upload(self, up: _Upload) -> np.ndarray:
        shards = [decode(p, UpdateShard) for p in up.payloads]
        codec = get_codec(shards[0].codec)
        return np.concatenate([codec.decode(s.data, s.length) for s in shards])
