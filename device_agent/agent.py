"""The device agent's protocol logic, with no I/O.

Theory of operation
-------------------
:class:`AgentCore` follows the retained manifest. For a round that selects
this device it fetches the global model (retained shards on their exact topics
``model/{version}/{i}``, :mod:`fedsync.device_agent.model_fetch`, verified shard by shard
and then as a whole against the manifest's digest), asks its adapter to train (a
:class:`Train` action; the adapter calls :meth:`AgentCore.on_trained` when done), encodes
the delta ``local - global`` with the round's codec into shards and publishes them.
It then waits for the coordinator's retained ``ack/{device}``: ``accepted``,
``duplicate``, ``closed`` or ``refused`` end the round for this device; ``rejected``
re-encodes under a fresh update id if its reason is retryable (:mod:`fedsync.receipts`)
and retries are left, else gives the update up (``update_given_up``, counted);
``partial`` records progress. If no progress is seen for ``resend_after`` seconds (the
manifest's, else the agent's own) the shards the coordinator does not hold are sent again
(the coordinator drops duplicates, so resending is always safe). A manifest of a schema
version this agent does not read is ignored, with one note, until a readable one arrives.

The agent's state (:class:`AgentState`: idle, restored, fetching, training, uploading,
done, finished) changes only by an event looked up in the transition table of
``device_agent/agent_state.py``; the table in docs/protocol.md is checked against it, and
an event the table has no row for raises ``IllegalTransition``. After a restart with an
update in the outbox the agent is ``restored`` until the manifest says whether that
round is still open (resume the upload) or not (drop it).

A standing fleet therefore needs no restart between campaigns: the adapter keeps
the agent connected after ``Finished`` unless it was asked to run one campaign.
Each round ends with one ``round_done`` note (what was fetched, trained and
uploaded, and the receipt) that the adapter logs at INFO.
It also reads its own ``status/{device}``, to tell a second process on the same device
id (``device_agent/identity.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from fedsync.actions import Publish, Subscribe
# The adapter's actions live beside the core and are imported from here too.
from fedsync.device_agent.agent_actions import (CampaignStarted, ClearOutbox, DuplicateDevice,  # noqa: F401
                                                Finished, Note, OutboxRecord, SaveOutbox, Train)
from fedsync.device_agent.agent_state import AGENT_TRANSITIONS, AgentEvent, AgentState
from fedsync.device_agent.identity import OwnStatus
from fedsync.device_agent.model_fetch import ModelFetch
from fedsync.device_agent.upload import Upload, decode_upload, encode_update
from fedsync.codecs import get_codec
from fedsync.errors import ProtocolError
from fedsync.executor import INLINE, Executor
from fedsync.messages import ModelShard, PeerStatus, RoundManifest, ShardAck, decode
from fedsync.params import bitmap_indices, flatten, shard_slices, unflatten, vector_digest
from fedsync.receipts import STATUS_UPDATE_ID, retryable
from fedsync.topics import Topics


@dataclass(slots=True)
class AgentStats:
    bytes_up: int = 0
    bytes_down: int = 0  # model (or delta) bytes taken into a fetch, each shard once
    model_bytes_ignored: int = 0  # model shards received but not used: old, unwanted or repeated
    shards_sent: int = 0
    shards_resent: int = 0
    rounds_accepted: int = 0
    updates_rejected: int = 0  # rejected receipts for our updates (retried or not)
    updates_given_up: int = 0  # updates dropped on a final rejection or with no retries left
    inputs_rejected: int = 0  # rejected receipts about our status messages
    model_fetches: int = 0
    delta_fetches: int = 0
    refetches: int = 0
    bad_messages: int = 0


RESUME_GRACE = 1.0  # seconds to wait for the retained receipt before re-sending a restored upload
# A restored upload re-sends as soon as it has both the open manifest and the retained receipt
# (they come on two topics, in either order); without a receipt, after RESUME_GRACE.


class AgentCore:
    """One device's side of the protocol.

    >>> core = AgentCore("dev-1", Topics("t"), random.Random(0))
    >>> [a.topic_filter for a in core.on_connect(now=0.0)]
    ['fedsync/t/manifest', 'fedsync/t/ack/dev-1']
    """

    def __init__(self, device_id: str, topics: Topics, rng: random.Random, *,
                 resend_after: float = 10.0, max_retries: int = 3, signer=None,
                 executor: Executor = INLINE, incarnation: int = 0) -> None:
        self.device_id = device_id
        self.own_status = OwnStatus(device_id, incarnation)  # a second process on our id (identity.py)
        self.topics = topics
        self.rng = rng
        self.resend_after = resend_after
        self.max_retries = max_retries
        self.signer = signer  # fedsync.signing.HmacSigner / Ed25519Signer, or None
        self.executor = executor  # encodes an update's shards (fedsync.executor; inline unless given one)
        self.state = AgentState.IDLE  # changed only by _fire (device_agent/agent_state.py)
        self.manifest: RoundManifest | None = None  # the newest manifest seen
        self.job: RoundManifest | None = None  # the manifest of the work in hand (fetch, train, upload)
        self.stats = AgentStats()
        self._model: tuple[int, bytes, np.ndarray] | None = None  # version, digest, vector
        self._fetch: ModelFetch | None = None  # the download in hand while fetching
        self._upload: Upload | None = None
        self._progress_at = 0.0
        self.feedback = None  # fedsync.codecs.lossy.ErrorFeedback, for biased codecs (top-k)
        self._job_start = (0, 0)  # (bytes_down, bytes_up) when the current job began: the round's traffic
        self._skipped_round = -1
        self._noted_status: tuple | None = None  # the status rejection last noted
        self._noted_version: str | None = None  # the unreadable manifest version last noted

    def _fire(self, event: AgentEvent) -> None:
        """Take the transition ``event`` names; raises ``IllegalTransition`` if there is none."""
        self.state = AGENT_TRANSITIONS.next(self.state, event)

    # -- inputs -----------------------------------------------------------------

    def on_connect(self, now: float) -> list:
        self._progress_at = now  # give a resumed upload a full resend window
        subs = [Subscribe(self.topics.manifest, 1), Subscribe(self.topics.ack(self.device_id), 1)]
        if self.own_status.incarnation:  # with one: tell a second process on our id (identity.py)
            subs.append(Subscribe(self.topics.status(self.device_id), 1))
        return subs

    def on_message(self, topic: str, payload: bytes, now: float) -> list:
        """Feed one broker message; bad input is counted and noted, never raised."""
        if not payload:
            return []  # a cleared retained message
        try:
            if topic == self.topics.manifest:
                return self._on_manifest(decode(payload, RoundManifest), now)
            if topic == self.topics.ack(self.device_id):
                return self._on_ack(decode(payload, ShardAck), now)
            if topic == self.topics.status(self.device_id):
                duplicate = self.own_status.seen(decode(payload, PeerStatus))
                return [duplicate] if duplicate is not None else []
            if topic.startswith((self.topics.root + "/model/", self.topics.root + "/modeldelta/")):
                return self._on_model_shard(topic, payload, now)
        except ProtocolError as err:
            self.stats.bad_messages += 1
            if topic == self.topics.manifest and err.field == "v":
                # A newer coordinator's manifest (docs/protocol.md, "Versions"): ignored, noted once.
                if self._noted_version == err.detail:
                    return []
                self._noted_version = err.detail
                return [Note("manifest_unsupported", {"error": str(err)})]
            return [Note("bad_message", {"topic": topic, "error": str(err)})]
        return []  # not ours: every client filters by topic (amqtt leaks retained messages)

    @property
    def resend_window(self) -> float:
        """Seconds without progress before a re-send or re-fetch: the manifest's, else our own."""
        m = self.job or self.manifest
        return m.resend_after if m is not None and m.resend_after is not None else self.resend_after

    def on_trained(self, round_id: int, params: dict[str, np.ndarray], num_samples: int,
                   metrics: dict[str, float], now: float) -> list:
        m = self.job
        if m is None or self.state is not AgentState.TRAINING or m.round_id != round_id or self._model is None:
            return [Note("update_dropped", {"round": round_id, "reason": "round closed"})]
        delta = flatten(params, m.param_spec) - self._model[2]
        codec = get_codec(m.update_codec)
        datas = None
        if codec.error_feedback:
            delta, datas = self._feedback_compensate(delta, codec, m)
        self._upload = self.encode_update(m, delta, num_samples, metrics, datas)
        self._fire(AgentEvent.TRAINED)
        self._progress_at = now
        # Persist first: a crash after this line resumes the upload instead of retraining.
        return [SaveOutbox(self._upload.record(m.update_qos))] + self._send(range(len(self._upload.payloads)))

    def on_fit_failed(self, round_id: int, reason: str, now: float) -> list:
        """The adapter's trainer failed on this round's model (it raised, or its result or delta
        is not finite: device_agent/fit_check.py). Nothing is uploaded and the round is over
        for this device; a degenerate global model costs a round, never the agent."""
        m = self.job
        if m is None or self.state is not AgentState.TRAINING or m.round_id != round_id:
            return []  # the round moved on while it trained
        self._fire(AgentEvent.FIT_FAILED)
        return [Note("round_done", {"round": round_id, "status": "fit_failed", "reason": reason})]

    def restore(self, record: OutboxRecord) -> None:
        """Resume an update persisted by an earlier run (call before ``on_connect``).

        Sending resumes once the retained manifest confirms the round is still open;
        if it is not, the update is dropped with a log line."""
        upload = Upload.restored_from(record)  # decodes its first shard: a bad record raises here
        self._fire(AgentEvent.RESTORE)
        self._upload = upload

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
        datas = self.executor.split_map(lambda sl: codec.encode(compensated[sl[0]:sl[0] + sl[1]]), slices)
        decoded = np.concatenate([codec.decode(d, n) for d, (_, n) in zip(datas, slices)])
        self.feedback.update(compensated, decoded)
        return decoded, datas

    def tick(self, now: float) -> list:
        window = self.resend_window
        fetch = self._fetch
        if self.state is AgentState.FETCHING and fetch is not None and now - self._progress_at >= window:
            # No model shard for a while (lost in a reset, or a broker that dropped it):
            # subscribe again to the missing ones, and the broker re-sends their retained copies.
            self._fire(AgentEvent.MODEL_SILENT)
            self._progress_at = now
            self.stats.refetches += 1
            note = Note("refetch", {"round": fetch.manifest.round_id, "have": len(fetch.values)})
            if fetch.base >= 0:
                # A delta that does not come (its coordinator was killed before publishing it, a
                # broker lost it): the full model is always retained, fetch that instead.
                self._fetch = ModelFetch(self.topics, fetch.manifest)
                return [note] + fetch.stop() + self._fetch.start()
            return [note] + fetch.refetch()
        up = self._upload
        if self.state is not AgentState.UPLOADING or up is None or now - self._progress_at < window:
            return []
        self._fire(AgentEvent.ACK_SILENT)
        return self._resend_missing(up, now)

    # -- manifest -------------------------------------------------------------------

    def _on_manifest(self, m: RoundManifest, now: float) -> list:
        if m.federation != self.topics.federation:
            raise ProtocolError("federation", "value", f"{m.federation!r} is not {self.topics.federation!r}")
        last = self.manifest
        if last is not None and m.incarnation == last.incarnation and (
                (m.round_id, m.model_version) < (last.round_id, last.model_version)):
            # Older than one already acted on (round ids and versions only grow within an
            # incarnation): a broker restarted from a stale persistence file. Keep the work in
            # hand; the coordinator republishes the current manifest (docs/protocol.md).
            return [Note("stale_manifest", {"round": m.round_id, "version": m.model_version,
                                            "current_round": last.round_id})]
        out = self._new_campaign(m) if self.manifest is not None else []
        self.manifest = m
        if m.state == "finished":
            self._fire(AgentEvent.MANIFEST_FINISHED)
            return out + self._stop_fetch() + [Finished()]  # a pending upload still takes its late receipt
        if out:
            return out + self._next_job(now)
        up = self._upload
        if up is not None and up.round_id == m.round_id and m.state == "open":
            # Same round (a redelivery, a coordinator restart, or our own restart from the outbox):
            # keep uploading; the coordinator's receipt says which shards it holds.
            self.job = m
            if self.state is not AgentState.UPLOADING:
                self._fire(AgentEvent.RESUME)
                if up.receipt_seen:
                    return self._resend_missing(up, now)
                self._progress_at = now - self.resend_window + RESUME_GRACE
            return []
        job = self.job
        if job is not None and (job.round_id, job.model_digest) == (m.round_id, m.model_digest) and self.state in (
                AgentState.FETCHING, AgentState.TRAINING, AgentState.DONE):
            self.job = m  # nothing changed for us (a redelivery or a coordinator restart)
            return []
        if m.mode == "async" and self.state in (AgentState.TRAINING, AgentState.UPLOADING):
            return []  # FedBuff: work on an older model still counts; the next job starts when it ends
        return self._next_job(now)

    def _new_campaign(self, m: RoundManifest) -> list:
        """``[CampaignStarted, ...]`` if ``m`` starts another campaign than the last manifest's, else []."""
        last = self.manifest
        assert last is not None
        if last.state == "finished" and m.state != "finished":
            event, why = AgentEvent.NEW_CAMPAIGN, "previous campaign finished"
        elif m.incarnation != last.incarnation and (m.round_id < last.round_id or m.model_version < last.model_version):
            # round ids and versions only grow within a campaign
            event, why = AgentEvent.STARTED_OVER, "the coordinator started over"
        else:
            return []
        out: list = [CampaignStarted(), Note("campaign_started", {"reason": why, "round": m.round_id,
                                                                  "version": m.model_version})]
        out += self._stop_fetch()
        if self._upload is not None:
            out.append(ClearOutbox(self._upload.round_id))
        self._fire(event)
        self.job, self._upload, self._model, self.feedback = None, None, None, None
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
        self._fire(AgentEvent.OTHER_ROUND)
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
            return out + self._train(m, AgentEvent.SELECTED_CACHED)
        self._fire(AgentEvent.SELECTED)
        self.stats.model_fetches += 1
        self._progress_at = now
        # One version behind and a delta is published: fetch only the difference.
        have = self._model[0] if self._model is not None else -1
        self._fetch = ModelFetch(self.topics, m, m.delta_from if m.delta_from >= 0 and have == m.delta_from else -1)
        self.stats.delta_fetches += self._fetch.base >= 0
        return out + self._fetch.start()

    def _stop_fetch(self) -> list:
        fetch, self._fetch = self._fetch, None
        return fetch.stop() if self.state is AgentState.FETCHING and fetch is not None else []

    def _on_model_shard(self, topic: str, payload: bytes, now: float) -> list:
        m, fetch = self.job, self._fetch
        version, index, base = self.topics.parse_model(topic)
        if (self.state is not AgentState.FETCHING or m is None or fetch is None or not fetch.wants(version, base)
                or index in fetch.values):
            # An old version's shard, one we no longer need, or a second copy (a broker may hand a
            # retained shard over twice): not the model's bytes, counted apart.
            self.stats.model_bytes_ignored += len(payload)
            return []
        self.stats.bytes_down += len(payload)
        s = decode(payload, ModelShard)
        vector = fetch.add(index, s)
        self._progress_at = now
        if vector is None:
            return []
        self._fetch = None
        out: list = fetch.stop()
        if base >= 0:
            assert self._model is not None and self._model[0] == base
            vector = (self._model[2] + vector).astype(np.float32)  # exact: see coordinator/model_store.py
        if vector_digest(vector) != m.model_digest:
            out.append(Note("model_digest_mismatch", {"version": version, "delta_from": base}))
            if base >= 0:  # fall back to the full model
                self._fire(AgentEvent.DELTA_BAD)
                self._fetch = ModelFetch(self.topics, m)
                return out + self._fetch.start()
            self._fire(AgentEvent.MODEL_BAD)
            return out
        self._model = (m.model_version, m.model_digest, vector)
        return out + self._train(m, AgentEvent.MODEL_OK)

    def _train(self, m: RoundManifest, event: AgentEvent) -> list:
        assert self._model is not None
        self._fire(event)
        return [Train(m.round_id, unflatten(self._model[2], m.param_spec), dict(m.hyper))]

    # -- upload -----------------------------------------------------------------

    def encode_update(self, m: RoundManifest, delta: np.ndarray, num_samples: int, metrics: dict[str, float],
                      datas: list[bytes] | None = None) -> Upload:
        """This device's update of round ``m`` under a fresh update id (device_agent/upload.py)."""
        return encode_update(m, delta, num_samples, metrics, device_id=self.device_id, topics=self.topics,
                             update_id=f"u{self.rng.getrandbits(48):012x}", signer=self.signer,
                             executor=self.executor, datas=datas)

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
        if ack.update_id == STATUS_UPDATE_ID:
            return self._status_rejected(ack)
        if up is None or (ack.round_id, ack.update_id) != (up.round_id, up.update_id):
            return []  # an old round's receipt (retained), or one for an update we replaced
        if ack.status == "rejected":
            return self._rejected(ack, up, now)  # holds nothing; its count may be the round's, not ours
        if ack.count != len(up.payloads):
            raise ProtocolError("count", "mismatch", f"ack for {ack.count} shards, update has {len(up.payloads)}")
        held = set(bitmap_indices(ack.held, ack.count))
        if len(held) > len(up.held):
            self._progress_at = now
        up.held = held
        up.receipt_seen = True
        if ack.status in ("accepted", "duplicate", "closed", "refused"):
            # The receipt may arrive after the final manifest (no ordering across topics): finished stays.
            self._fire(AgentEvent.ACK_FINAL)
            self._upload = None
            if ack.status == "accepted":
                self.stats.rounds_accepted += 1
            return [self._round_done(ack, up), ClearOutbox(ack.round_id)] + self._after_settled(ack, now)
        self._fire(AgentEvent.ACK_PARTIAL)  # "partial": the held shards are recorded above
        if up.restored and self.state is AgentState.UPLOADING:
            return self._resend_missing(up, now)  # the receipt a resumed upload waited for
        return []

    def _resend_missing(self, up: Upload, now: float) -> list:
        """Re-send the shards the coordinator's receipts do not list: after a silence, or for a
        restored upload once the manifest says its round is open and the retained receipt
        says which shards are held."""
        up.restored = False
        self._progress_at = now
        missing = [i for i in range(len(up.payloads)) if i not in up.held]
        self.stats.shards_resent += len(missing)
        note = Note("resend", {"round": up.round_id, "update": up.update_id, "shards": len(missing)})
        return [note] + self._send(missing)

    def _rejected(self, ack: ShardAck, up: Upload, now: float) -> list:
        """The coordinator will never accept this update: send a fresh one if the reason is
        retryable (fedsync/receipts.py) and retries are left, else give it up."""
        self.stats.updates_rejected += 1
        final = not retryable(ack.reason)
        if final or up.retries >= self.max_retries or self.state is not AgentState.UPLOADING:
            # Also when restored (no job to re-encode for) or after the campaign finished.
            self._fire(AgentEvent.ACK_GIVEN_UP)
            self._upload = None
            self.stats.updates_given_up += 1
            note = Note("update_given_up", {"round": ack.round_id, "update": ack.update_id, "reason": ack.reason,
                                            "final": final})
            return [note, ClearOutbox(ack.round_id)] + self._after_settled(ack, now)
        # The coordinator forgot the bad update; send the same delta under a fresh id.
        self._fire(AgentEvent.ACK_REJECTED)
        return [Note("update_rejected", {"round": ack.round_id, "reason": ack.reason})] + self._reencode(now)

    def _after_settled(self, ack: ShardAck, now: float) -> list:
        if self.state is AgentState.DONE and self.manifest is not None and self.manifest.round_id != ack.round_id:
            return self._next_job(now)  # async: a newer model is already out
        return []

    def _status_rejected(self, ack: ShardAck) -> list:
        """The coordinator could not read our status message (it does not see us online): noted once."""
        key = (ack.round_id, ack.reason)
        if ack.status != "rejected" or self._noted_status == key:
            return []
        self._noted_status = key
        self.stats.inputs_rejected += 1
        return [Note("status_rejected", {"round": ack.round_id, "reason": ack.reason})]

    def _round_done(self, ack: ShardAck, up: Upload) -> Note:
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
        delta = up.delta if up.delta is not None else decode_upload(up)
        fresh = self.encode_update(self.job, delta, up.num_samples, up.metrics)
        fresh.retries = up.retries + 1
        self._upload = fresh
        self._progress_at = now
        return [SaveOutbox(fresh.record(self.job.update_qos))] + self._send(range(len(fresh.payloads)))
