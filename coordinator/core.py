"""The coordinator's round logic, with no I/O.

Theory of operation
-------------------
:class:`CoordinatorCore` is fed three kinds of input — a broker message
(``on_message``), the passage of time (``tick``) and its own start
(``start``) — each with ``now`` as an argument, and returns a list of
:mod:`fedsync.actions` (mostly ``Publish``) plus :class:`RoundClosed` events.
Randomness (device selection) comes from ``random.Random(f"{seed}:{round_id}")``,
so a coordinator restarted from its journal selects exactly as before.

Durability (see ``coordinator/journal.py``): the core emits ``JournalShard``
for every shard it newly holds, ``RoundOpened`` when a round opens and
``Checkpoint`` whenever the committed state changes. The service makes the
first two durable before it acknowledges anything to the broker, and writes
checkpoints atomically; :meth:`CoordinatorCore.restore` and
:meth:`CoordinatorCore.resume_round` rebuild the core after a crash, and
replaying the journalled shards through ``on_message`` rebuilds the round.

Round state machine (one round at a time; see docs/protocol.md):

=========  ==========================================  ===========  ==========================================
state      event / guard                               next         actions
=========  ==========================================  ===========  ==========================================
waiting    tick, online >= max(min_devices, quorum)    open         select devices, publish manifest(open)
open       update complete, accepted >= target         waiting      commit: aggregate, publish model v+1,
                                                                    manifest, clear model v
open       device offline or update complete,          waiting      commit (no one alive left to wait for)
           accepted >= quorum, no live device pending
open       tick, now >= deadline, accepted >= quorum   waiting      commit
open       tick, now >= deadline, accepted < quorum    waiting      abandon: same model, next round id
waiting    committed rounds == rounds (when rounds>0)  finished     publish manifest(finished)
=========  ==========================================  ===========  ==========================================

``waiting`` is left again on the same call when enough devices are online, so
back-to-back rounds cost no extra tick.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from coordinator import model_store
from coordinator.aggregate import FedAvg, Strategy, factory_state, load_factory_state
from coordinator.assembler import RoundLayout, ShardAssembler, ShardOutcome
from fedsync.actions import Publish
from fedsync.codecs import get_codec
from fedsync.errors import ProtocolError
from fedsync.messages import ModelShard, PeerStatus, RoundManifest, ShardAck, UpdateShard, decode, encode
from fedsync.params import ParamSpec, bitmap, digest, shard_slices, spec_size, vector_digest
from fedsync.topics import Topics


RECENT_ROUNDS = 4  # closed rounds whose accepted update ids are remembered
PRESENCE_SETTLE = 2.0  # seconds after start before a device never heard from counts as gone
# A last will stops a round waiting for its device only after this long: a broker that shuts
# down publishes every client's will an instant before it drops our own connection too.
OFFLINE_SETTLE = 1.0
# After our own connection comes back, devices get this long to reconnect (their backoff grew
# while the broker was away) before a round stops waiting for them.
RECONNECT_SETTLE = 10.0


@dataclass(frozen=True, slots=True)
class RoundPolicy:
    """The knobs of the round rule (all documented in docs/protocol.md)."""

    mode: str = "sync"  # "sync" | "async" (FedBuff) | "semisync" (fixed period)
    rounds: int = 20  # committed rounds (async: aggregations) to run; 0 = run forever
    target: int = 10  # accepted updates that commit a round at once (async: the buffer size K)
    quorum: int = 1  # accepted updates needed to commit at the deadline
    over_select: float = 0.0  # select ceil(target * (1 + over_select)) devices
    min_devices: int = 1  # online devices needed before a round opens
    round_timeout: float = 60.0  # seconds from manifest to deadline
    shard_values: int = 65536  # float32 values per shard (256 KiB raw)
    model_codec: str = "zstd"
    update_codec: str = "zstd"
    update_qos: int = 1
    offline_grace: float = 0.0  # seconds a selected device may be offline before the round stops waiting
    staleness_exponent: float = 0.5  # async: an update s versions old weighs (1 + s) ** -a
    max_staleness: int = 4  # async: updates more than this many versions old are refused

    def __post_init__(self) -> None:
        if self.mode not in ("sync", "async", "semisync"):
            raise ValueError(f"round.mode: {self.mode!r} is not one of sync, async, semisync")


@dataclass(frozen=True, slots=True)
class RoundClosed:
    """Emitted when a round ends; ``vector`` is the new global model on commit."""

    round_id: int
    outcome: str  # "committed" | "abandoned"
    model_version: int
    selected: tuple[str, ...]
    accepted: tuple[str, ...]
    started_at: float
    closed_at: float
    reason: str
    vector: np.ndarray | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    total_samples: int = 0  # sum of the counted updates' num_samples (an edge's upstream weight)


@dataclass(slots=True)
class CoordinatorStats:
    """Counters the service exports as metrics (names in docs/protocol.md)."""

    updates_accepted: int = 0
    updates_refused: int = 0  # complete and verified, but refused by policy (norm bound, staleness, ...)
    duplicates_dropped: int = 0
    shards_accepted: int = 0
    shards_rejected: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    rounds_committed: int = 0
    rounds_abandoned: int = 0
    devices_offline_detected: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(slots=True)
class _Round:
    manifest: RoundManifest
    assembler: ShardAssembler
    strategy: Strategy
    selected: frozenset[str]
    metrics: list[dict[str, float]] = field(default_factory=list)
    buffered: int = 0  # async: updates folded into this round's buffer (from any recent round)
    contributors: list[str] = field(default_factory=list)  # devices whose updates were folded in


@dataclass(frozen=True, slots=True)
class CheckedShard:
    """An ``up/...`` payload decoded and its shard digest checked: the part of ingest
    that needs no coordinator state, and whose hashing runs without the GIL."""

    shard: UpdateShard | None  # None: the payload did not decode
    error: ProtocolError | None  # why it did not decode, or the digest mismatch of a decoded shard


def check_shard(payload: bytes) -> CheckedShard:
    """Decode an update payload and verify its shard digest; never raises."""
    try:
        shard = decode(payload, UpdateShard)
    except ProtocolError as err:
        return CheckedShard(None, err)
    if digest(shard.data) != shard.digest:
        return CheckedShard(shard, ProtocolError("digest", "digest",
                                                 f"{shard.device} round {shard.round_id} shard {shard.index}"))
    return CheckedShard(shard, None)


class CoordinatorCore:
    """Runs synchronous federated rounds over the topic tree of ``topics``.

    >>> core = CoordinatorCore(Topics("t"), {"w": np.zeros(3, np.float32)}, RoundPolicy(rounds=1),
    ...                        hyper={}, incarnation=1, seed=0)
    >>> [a.topic for a in core.start(now=0.0)][:2]
    ['fedsync/t/coordinator/status', 'fedsync/t/model/0/0']
    """

    def __init__(self, topics: Topics, params: dict[str, np.ndarray], policy: RoundPolicy, *,
                 hyper: dict[str, float], incarnation: int, seed: int,
                 strategy_factory=None, first_round_id: int = 1, model_version: int = 0,
                 screen=None, verifier=None, driven: bool = False) -> None:
        from fedsync.params import flatten, spec_of

        self.topics = topics
        self.policy = policy
        self.hyper = dict(hyper)
        self.incarnation = incarnation
        self.seed = seed
        self.spec: ParamSpec = spec_of(params)
        self.vector = flatten(params, self.spec)
        self.version = model_version
        self.stats = CoordinatorStats()
        self.online: set[str] = set()
        self.round: _Round | None = None
        self.next_round_id = first_round_id
        self.finished = False
        self.closed_through = first_round_id - 1  # id of the last round that closed
        # Its state across rounds (a server optimiser's moments, a noise generator) is in checkpoints.
        self._strategy_factory = strategy_factory or (lambda n: FedAvg(n))
        # Accepted update ids of the last few closed rounds, so late redeliveries count as duplicates.
        self._recent: dict[int, dict[str, str]] = {}
        # async: closed rounds whose updates are still welcome (within max_staleness), by round id.
        self._past: dict[int, _Round] = {}
        # screen(vector, num_samples) -> refusal reason or None (coordinator/hardening.py)
        self.screen = screen
        self.verifier = verifier  # fedsync.signing verifier, or None: updates need not be signed
        # driven: rounds open only when adopt() hands in a model (an edge coordinator, driven from upstream)
        self.driven = driven
        self._adopted = False
        self._delta_from = -1  # version whose delta to the current one is published, or -1
        self._offline_since: dict[str, float] = {}
        self._started_at: float | None = None
        self._link_down = False  # our own broker connection is down: presence is unknown
        self._reconnected_at: float | None = None
        self._last_model_publish: list[Publish] = []
        get_codec(policy.model_codec), get_codec(policy.update_codec)  # fail fast on a bad name

    # -- durability ----------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        """The committed state. ``_close`` takes it right after the strategy's ``finish``, so the
        strategy state in it is the state after that round's step (an abandoned round takes none)."""
        s = self.stats
        stats = {f: getattr(s, f) for f in s.__dataclass_fields__ if f != "rejected_by_reason"}
        stats["rejected_by_reason"] = dict(s.rejected_by_reason)
        return Checkpoint(self.version, self.vector.copy(), self.next_round_id, self.closed_through, self.finished,
                          {r: dict(d) for r, d in self._recent.items()}, stats,
                          factory_state(self._strategy_factory))

    def restore(self, ck: Checkpoint) -> None:
        """Load a checkpoint written by an earlier incarnation (before ``start``)."""
        if ck.vector.size != self.vector.size:
            raise ValueError(f"checkpoint has {ck.vector.size} params, the model has {self.vector.size}")
        # First: state of another strategy raises ValueError before anything else is restored.
        load_factory_state(self._strategy_factory, ck.strategy_state)
        self.version, self.vector = ck.version, ck.vector.astype(np.float32)
        self.next_round_id, self.finished = ck.next_round_id, ck.finished
        self.closed_through = ck.closed_through
        self._recent = {int(r): dict(d) for r, d in ck.recent.items()}
        for name, value in ck.stats.items():
            if name == "rejected_by_reason":
                self.stats.rejected_by_reason = Counter(value)
            elif name in self.stats.__dataclass_fields__:
                setattr(self.stats, name, value)

    def resume_round(self, manifest: RoundManifest, now: float) -> None:
        """Re-open the round a crashed incarnation had open (same id, selection and deadline).

        The journalled shards are then replayed through :meth:`on_message`.
        """
        if manifest.model_version != self.version or manifest.num_params != self.vector.size:
            raise ValueError("round journal does not match the checkpointed model")
        layout = RoundLayout(manifest.round_id, self.version, self.vector.size, manifest.shard_values,
                             manifest.update_codec)
        self.round = _Round(manifest, ShardAssembler(layout, self.verifier, self.topics.federation), self._strategy_factory(self.vector.size),
                            frozenset(manifest.selected))
        self.next_round_id = max(self.next_round_id, manifest.round_id + 1)
        self._started_at = now  # presence is unknown until the retained statuses arrive

    def adopt(self, vector: np.ndarray, hyper: dict[str, float], now: float) -> list:
        """Driven mode: take ``vector`` as the next global model and open one round on it.

        An edge coordinator calls this with the upstream model; when the round commits,
        its result (the weighted mean of its devices' models, and their total sample count)
        goes upstream as one update. See coordinator/edge.py."""
        if vector.size != self.vector.size:
            raise ValueError(f"adopt: {vector.size} params, the model has {self.vector.size}")
        old_version = self.version
        self.vector, self.version, self.hyper = vector.astype(np.float32), self.version + 1, dict(hyper)
        self._adopted = True
        out = self._publish_model() + self._clear_model(old_version) if self._started_at is not None else []
        self._delta_from = -1  # an adopted model has no published delta: devices fetch it whole
        return self._count_out(out + self._maybe_open(now))

    def retained_state(self, now: float) -> list:
        """Everything the coordinator keeps retained on the broker, to (re)publish it."""
        status = PeerStatus("coordinator", "online", self.incarnation)
        out: list = [Publish(self.topics.coordinator_status, encode(status), 1, True)]
        self._last_model_publish = self._publish_model()
        out += self._last_model_publish
        if self.round is not None:
            # Same round, new incarnation: devices learn of the restart and keep going.
            out.append(self._manifest_publish(replace(self.round.manifest, incarnation=self.incarnation)))
        elif self.finished:
            out.append(self._manifest_publish(self._idle_manifest(now, "finished")))
        return out

    # -- inputs -------------------------------------------------------------

    def start(self, now: float) -> list:
        self._started_at = now
        out = self.retained_state(now)
        if self.round is None and not self.finished:
            out += self._maybe_open(now) or [self._manifest_publish(self._idle_manifest(now))]
        return self._count_out(out)

    def tick(self, now: float) -> list:
        out: list = []
        r = self.round
        if r is not None and now >= r.manifest.deadline:
            out += self._close(now, "deadline")
        elif r is not None:
            out += self._check_early_close(now)  # a grace period may have run out
        else:
            out += self._maybe_open(now)
        return self._count_out(out)

    def on_message(self, topic: str, payload: bytes, now: float, checked: CheckedShard | None = None) -> list:
        """Feed one broker message. Bad input is counted and dropped, never raised.

        ``checked``: :func:`check_shard` of this payload, if the caller already ran it (the
        service does, for a whole batch, half of it on a second core)."""
        try:
            if topic.startswith(self.topics.root + "/up/") or topic == self.topics.root + "/up":
                # "up/#" also matches the bare "up" level (MQTT 3.1.1 §4.7.1.2): parse_up rejects it.
                out = self._on_update(topic, payload, now, checked or check_shard(payload))
            elif topic.startswith(self.topics.root + "/status/"):
                out = self._on_status(topic, payload, now)
            else:
                return []  # not ours (amqtt leaks retained messages; our own echoes)
        except ProtocolError as err:
            self._reject(err.reason)
            return [RejectedInput(topic, err.field, err.reason, str(err))]
        return self._count_out(out)

    # -- updates --------------------------------------------------------------

    def _on_update(self, topic: str, payload: bytes, now: float, checked: CheckedShard) -> list:
        self.stats.bytes_in += len(payload)
        where = self.topics.parse_up(topic)
        shard = checked.shard
        if shard is None:
            raise checked.error  # type: ignore[misc]  # the payload did not decode
        self._current_payload = payload
        if (shard.device, shard.round_id, shard.update_id, shard.index) != (
                where.device, where.round_id, where.update_id, where.shard):
            raise ProtocolError("topic", "topic_mismatch", "payload names another device, round, update or shard")
        if checked.error is not None:
            raise checked.error  # the shard's digest does not match its data
        r = self.round
        if self.policy.mode == "async" and shard.round_id in self._past and r is not None:
            r = self._past[shard.round_id]  # a late update to an older model: welcome within max_staleness
        if r is None or shard.round_id != r.manifest.round_id:
            if self._recent.get(shard.round_id, {}).get(shard.device) == shard.update_id:
                # A late redelivery of an update this coordinator already counted: a duplicate, not an attack.
                self.stats.duplicates_dropped += 1
                ack = ShardAck(shard.device, shard.round_id, shard.update_id, shard.count,
                               bitmap(range(shard.count), shard.count), "accepted")
                return [self._ack_publish(ack)]
            self._reject("stale_round")
            ack = ShardAck(shard.device, shard.round_id, shard.update_id, shard.count,
                           bytes((shard.count + 7) // 8), "closed", "round is not open")
            return [RejectedInput(topic, "round_id", "stale_round", f"round {shard.round_id} is not open"),
                    self._ack_publish(ack)]
        if shard.device not in r.selected:
            raise ProtocolError("device", "not_selected", f"{shard.device} is not selected for round {shard.round_id}")
        outcome = r.assembler.add(shard, digest_checked=True)
        return self._after_shard(r, shard, outcome, now)

    def _after_shard(self, r: _Round, shard: UpdateShard, o: ShardOutcome, now: float) -> list:
        out: list = []
        status = {"accepted": "partial", "complete": "accepted", "duplicate": "partial", "rejected": "partial"}[o.kind]
        if o.kind in ("accepted", "complete"):
            out.append(JournalShard(self.topics.up(shard.device, shard.round_id, shard.update_id, shard.index),
                                    self._current_payload))
        if o.kind == "accepted":
            self.stats.shards_accepted += 1
        elif o.kind == "duplicate":
            self.stats.duplicates_dropped += 1
            won = r.assembler.accepted_update(shard.device)
            if won is not None:  # this device is done for the round: tell it to stop sending
                status = "accepted" if won == shard.update_id else "duplicate"
            elif shard.device in r.assembler.refused_devices:
                status = "refused"
        elif o.kind == "rejected":
            self._reject(o.reason)
            out.append(RejectedInput(self.topics.up(shard.device, shard.round_id, shard.update_id, shard.index),
                                     "shard", o.reason, f"{shard.device} shard {shard.index}: {o.reason}"))
            if o.reason in ("update_digest", "inconsistent_update", "signature") or o.reason.startswith("decode_"):
                status = "rejected"
        elif o.kind == "complete":
            self.stats.shards_accepted += 1
            assert o.update is not None
            refusal = self._screen(r, o.update)
            if refusal is not None:
                # The shards were fine; the update is not: counted once, as a refused update.
                r.assembler.mark_refused(shard.device)
                self.stats.updates_refused += 1
                self.stats.rejected_by_reason[refusal] += 1
                status = "refused"
                o = ShardOutcome("refused", o.device, o.update_id, reason=refusal, held=o.held)
                out.append(RejectedInput(self.topics.up(shard.device, shard.round_id, shard.update_id, shard.index),
                                         "update", refusal, f"{shard.device} round {shard.round_id}: {refusal}"))
            else:
                self.stats.updates_accepted += 1
                self._fold(r, o.update)
        held = o.held or bytes((shard.count + 7) // 8)
        reason = o.reason if status in ("rejected", "refused") else ""
        out.append(self._ack_publish(ShardAck(shard.device, shard.round_id, shard.update_id,
                                              shard.count, held, status, reason)))
        if o.kind in ("complete", "refused"):
            out += self._check_early_close(now)
        return out

    def _screen(self, r: _Round, u) -> str | None:
        staleness = self.version - r.manifest.model_version
        if staleness > self.policy.max_staleness:
            return "too_stale"
        return self.screen(u.vector, u.num_samples) if self.screen is not None else None

    def _fold(self, r: _Round, u) -> None:
        """Add a verified update to the open round's aggregate (async: with its staleness weight)."""
        target = self.round if self.round is not None else r
        weight: float = u.num_samples
        if self.policy.mode == "async":
            staleness = self.version - r.manifest.model_version
            weight = u.num_samples * (1.0 + staleness) ** -self.policy.staleness_exponent
            target.buffered += 1
        target.strategy.add(u.vector, weight)
        target.contributors.append(u.device)
        target.metrics.append(dict(u.metrics, num_samples=float(u.num_samples)))

    # -- presence ---------------------------------------------------------------

    def _on_status(self, topic: str, payload: bytes, now: float) -> list:
        device = self.topics.parse_status(topic)
        if not payload:
            return []  # a cleared retained status
        status = decode(payload, PeerStatus)
        if status.peer != device:
            raise ProtocolError("peer", "topic_mismatch", f"status for {status.peer!r} on {device!r}'s topic")
        if status.state == "online":
            self.online.add(device)
            self._offline_since.pop(device, None)
            return [] if self.round else self._maybe_open(now)
        if device in self.online:
            self.online.discard(device)
            self._offline_since[device] = now
            self.stats.devices_offline_detected += 1
            return [DeviceOffline(device, now)] + self._check_early_close(now)
        return []

    # -- round lifecycle --------------------------------------------------------

    def _maybe_open(self, now: float) -> list:
        p = self.policy
        if self.finished or self.round is not None or (self.driven and not self._adopted):
            return []
        if p.rounds and self.stats.rounds_committed >= p.rounds:
            self.finished = True
            return [self._manifest_publish(self._idle_manifest(now, "finished"))]
        if len(self.online) < max(1, p.min_devices, p.quorum):
            return []  # quorum is a floor for opening too: a round that cannot commit is not started
        candidates = sorted(self.online)
        k = min(len(candidates), math.ceil(p.target * (1.0 + p.over_select)))
        if p.mode in ("async", "semisync"):
            k = len(candidates)  # everyone online trains; the buffer (async) or the period (semisync) decides
        # Selection depends only on (seed, round id, who is online): a restarted coordinator picks the same.
        rng = random.Random(f"{self.seed}:{self.next_round_id}")
        selected = tuple(sorted(rng.sample(candidates, k)))
        target = min(p.target, k)
        manifest = self._manifest(now, "open", selected, target, min(p.quorum, target))
        layout = RoundLayout(manifest.round_id, self.version, self.vector.size, p.shard_values, p.update_codec)
        self.round = _Round(manifest, ShardAssembler(layout, self.verifier, self.topics.federation), self._strategy_factory(self.vector.size),
                            frozenset(selected))
        self.next_round_id += 1
        self._adopted = False
        return [RoundOpened(manifest), self._manifest_publish(manifest)]

    def _check_early_close(self, now: float) -> list:
        r = self.round
        if r is None:
            return []
        accepted = r.assembler.accepted_devices
        if self.policy.mode == "async":
            return self._close(now, "buffer_full") if r.buffered >= r.manifest.target else []
        if len(accepted) >= r.manifest.target and self.policy.mode == "sync":
            return self._close(now, "target")
        pending_alive = {d for d in r.selected - accepted - r.assembler.refused_devices if self._presumed_alive(d, now)}
        if not pending_alive and len(accepted) >= r.manifest.quorum:
            return self._close(now, "quorum_no_live_pending")
        return []

    def link_lost(self, now: float) -> None:
        """The coordinator's own broker connection dropped: presence is unknown until it is back."""
        self._link_down = True

    def link_restored(self, now: float) -> None:
        """Connected again. Wills published while the broker went down say nothing about the
        devices (a broker restart fires them all), so they are forgotten, and the devices get
        RECONNECT_SETTLE seconds to come back online before a round stops waiting for them."""
        self._link_down = False
        self._offline_since.clear()
        self._reconnected_at = now

    def _presumed_alive(self, device: str, now: float) -> bool:
        """Online, or offline for less than ``max(offline_grace, OFFLINE_SETTLE)`` (a flaky
        link, a phone rebooting, a broker shutting down). Right after a (re)start, presence is
        still arriving as retained statuses: a device not yet heard from counts as alive for
        PRESENCE_SETTLE seconds, so a recovered round is not closed before anyone could say they
        are there; after our own reconnect, for RECONNECT_SETTLE."""
        if device in self.online or self._link_down:
            return True
        if self._reconnected_at is not None and now - self._reconnected_at < RECONNECT_SETTLE:
            return True
        since = self._offline_since.get(device)
        if since is not None:
            return now - since < max(self.policy.offline_grace, OFFLINE_SETTLE)
        return self._started_at is not None and now - self._started_at < max(PRESENCE_SETTLE, self.policy.offline_grace)

    def _close(self, now: float, reason: str) -> list:
        r = self.round
        assert r is not None
        self.round = None
        accepted = tuple(sorted(r.contributors))
        self._recent[r.manifest.round_id] = {d: r.assembler.accepted_update(d) for d in r.assembler.accepted_devices}
        for old_round in sorted(self._recent)[:-RECENT_ROUNDS]:
            del self._recent[old_round]
        if self.policy.mode == "async":
            committed = r.buffered >= 1
            self._past[r.manifest.round_id] = r
            for old_round in sorted(self._past)[:-max(1, self.policy.max_staleness)]:
                del self._past[old_round]
        else:
            committed = len(accepted) >= r.manifest.quorum
        new_vector = r.strategy.finish(self.vector) if committed else None
        self.closed_through = r.manifest.round_id
        out: list = []
        if new_vector is not None:
            old_version, old_vector, old_delta_from = self.version, self.vector, self._delta_from
            _, exact = model_store.exact_step(old_vector, new_vector)
            self.vector, self.version = exact, self.version + 1
            self.stats.rounds_committed += 1
            # Checkpoint before anything is published: the service makes it durable first.
            out += [self.checkpoint()]
            self._last_model_publish = self._publish_model()
            delta = self._publish_delta(old_vector)
            self._delta_from = old_version if delta else -1
            out += self._last_model_publish + delta
            event = RoundClosed(r.manifest.round_id, "committed", self.version, tuple(sorted(r.selected)),
                                accepted, r.manifest.issued_at, now, reason, self.vector, _mean_metrics(r.metrics),
                                int(sum(m.get("num_samples", 0.0) for m in r.metrics)))
            out += self._maybe_open(now) or [self._manifest_publish(self._idle_manifest(now))]
            self._delta_from = old_delta_from  # _clear_model retires the delta *into* old_version
            out += self._clear_model(old_version)
            self._delta_from = old_version if delta else -1
        else:
            self.stats.rounds_abandoned += 1
            event = RoundClosed(r.manifest.round_id, "abandoned", self.version, tuple(sorted(r.selected)),
                                accepted, r.manifest.issued_at, now, reason)
            out += [self.checkpoint()]
            out += self._maybe_open(now) or [self._manifest_publish(self._idle_manifest(now))]
        return out + [event]  # observers hear of the round after its messages are queued

    # -- message construction -------------------------------------------------

    def _manifest(self, now: float, state: str, selected: tuple[str, ...], target: int, quorum: int) -> RoundManifest:
        p = self.policy
        return RoundManifest(
            federation=self.topics.federation, round_id=self.next_round_id if state == "open" else
            self.next_round_id - 1, incarnation=self.incarnation, state=state, mode=p.mode,
            model_version=self.version, model_digest=vector_digest(self.vector), model_codec=p.model_codec,
            model_shards=-(-self.vector.size // p.shard_values), param_spec=self.spec,
            num_params=self.vector.size, shard_values=p.shard_values, update_codec=p.update_codec,
            update_qos=p.update_qos, deadline=now + (p.round_timeout if state == "open" else 0.0),
            issued_at=now, quorum=quorum, target=target, selected=selected, hyper=self.hyper,
            delta_from=self._delta_from)

    def _idle_manifest(self, now: float, state: str = "waiting") -> RoundManifest:
        return self._manifest(now, state, (), 0, 0)

    def _manifest_publish(self, m: RoundManifest) -> Publish:
        return Publish(self.topics.manifest, encode(m), 1, True)

    def _ack_publish(self, ack: ShardAck) -> Publish:
        return Publish(self.topics.ack(ack.device), encode(ack), 1, True)

    def _publish_model(self) -> list[Publish]:
        return model_store.model_shards(self.topics, self.version, self.vector, self.policy.shard_values,
                                        self.policy.model_codec)

    def _clear_model(self, version: int) -> list[Publish]:
        n = -(-self.vector.size // self.policy.shard_values)
        out = model_store.clear(self.topics, version, n)
        if self._delta_from >= 0:  # the delta into the version being retired
            out += model_store.clear(self.topics, version, n, base=self._delta_from)
        return out

    def _publish_delta(self, old: np.ndarray) -> list[Publish]:
        """The step old -> current, when it is smaller than the full model (else nothing)."""
        delta = (self.vector - old).astype(np.float32)  # exact: self.vector = old + delta (exact_step)
        shards = model_store.model_shards(self.topics, self.version, delta, self.policy.shard_values,
                                          self.policy.model_codec, base=self.version - 1)
        full = model_store.payload_bytes(self._last_model_publish)
        return shards if model_store.payload_bytes(shards) < full else []

    def _reject(self, reason: str) -> None:
        self.stats.shards_rejected += 1
        self.stats.rejected_by_reason[reason] += 1

    def _count_out(self, actions: list) -> list:
        self.stats.bytes_out += sum(len(a.payload) for a in actions if isinstance(a, Publish))
        return actions


@dataclass(frozen=True, slots=True)
class JournalShard:
    """Adapter: make this shard durable before acknowledging it to the broker."""

    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class RoundOpened:
    """Adapter: start a new round journal headed by this manifest."""

    manifest: RoundManifest


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The committed state of a coordinator: everything but the open round."""

    version: int
    vector: np.ndarray
    next_round_id: int
    closed_through: int  # rounds up to this id are settled
    finished: bool
    recent: dict[int, dict[str, str]]
    stats: dict[str, object]
    # The strategy factory's state across rounds (coordinator.aggregate.StatefulFactory): FedAvgM's
    # velocity, FedAdam's moments, dp_fedavg's noise generator; {} for the others and old checkpoints.
    strategy_state: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RejectedInput:
    """Event: a message was dropped (logged and counted by the service)."""

    topic: str
    field: str
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class DeviceOffline:
    device: str
    at: float


def _mean_metrics(items: list[dict[str, float]]) -> dict[str, float]:
    """Sample-weighted mean of the devices' reported metrics."""
    total = sum(m.get("num_samples", 1.0) for m in items)
    keys = {k for m in items for k in m if k != "num_samples"}
    return {k: sum(m.get(k, 0.0) * m.get("num_samples", 1.0) for m in items) / total for k in sorted(keys)} if total else {}
