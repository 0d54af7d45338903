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

Round state machine: one round at a time; the phase (waiting, open, finished) changes
only by an event looked up in the transition table of ``coordinator/round_state.py``
(the table in docs/protocol.md is checked against it), and an event the table has no
row for raises ``IllegalTransition``. The guards are evaluated here, with the mode's
rules (``coordinator/policy.py``) and who is presumed alive (``coordinator/presence.py``);
a commit aggregates, publishes model v+1 and the next manifest, then clears model v.

Parallel work (an update's decode, FedAvg's fold) runs through the ``executor`` the core
was given (``fedsync.executor``: inline unless the service hands it the helper thread).

The round core is split by concern (policy, round_state, presence, model_publication,
events, receipts: each module says what it holds); this module ties them together in
:class:`CoordinatorCore` and re-exports their public names (``__all__``).
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np

from fedsync.coordinator import model_store
from fedsync.coordinator.aggregate import FedAvg, factory_state, load_factory_state, use_executor
from fedsync.coordinator.assembler import RoundLayout, ShardAssembler, ShardOutcome
from fedsync.coordinator.events import (CheckedShard, Checkpoint, CoordinatorStats, DeviceOffline, JournalShard,
                                        RejectedInput, RoundClosed, RoundOpened, WAITING_REPEAT, WaitingForDevices,
                                        WaitingNotice, check_shard, mean_metrics)
from fedsync.coordinator.hardening import NON_FINITE_MODEL, UpdateScreen, model_is_finite
from fedsync.coordinator.model_publication import RetainedModel
from fedsync.coordinator.policy import MODES, ModeRules, RoundPolicy
from fedsync.coordinator.presence import OFFLINE_SETTLE, PRESENCE_SETTLE, RECONNECT_SETTLE, Presence
from fedsync.coordinator.receipts import InputReceipts
from fedsync.coordinator.round_state import (CLOSE_REASON, ROUND_TRANSITIONS, OpenRound, RoundEvent,
                                             RoundPhase)
from fedsync.actions import Publish
from fedsync.codecs import get_codec
from fedsync.errors import ProtocolError
from fedsync.executor import INLINE, Executor
from fedsync.messages import PeerStatus, RoundManifest, ShardAck, UpdateShard, decode, encode
from fedsync.params import ParamSpec, bitmap, vector_digest
from fedsync.receipts import rejection
from fedsync.topics import Topics


__all__ = [
    "CLOSE_REASON", "DEFAULT_SCREEN", "MODES", "OFFLINE_SETTLE", "PRESENCE_SETTLE", "RECENT_ROUNDS",
    "RECONNECT_SETTLE", "ROUND_TRANSITIONS", "WAITING_REPEAT", "CheckedShard", "Checkpoint", "CoordinatorCore",
    "CoordinatorStats", "DeviceOffline", "JournalShard", "ModeRules", "OpenRound", "Presence", "RejectedInput",
    "RetainedModel", "RoundClosed", "RoundEvent", "RoundOpened", "RoundPhase", "RoundPolicy", "WaitingForDevices",
    "check_shard", "mean_metrics",
]

RECENT_ROUNDS = 4  # closed rounds whose accepted update ids are remembered
DEFAULT_SCREEN = "default"  # CoordinatorCore(screen=...): UpdateScreen() with its default bounds


class CoordinatorCore:
    """Runs synchronous federated rounds over the topic tree of ``topics``.

    >>> core = CoordinatorCore(Topics("t"), {"w": np.zeros(3, np.float32)}, RoundPolicy(rounds=1),
    ...                        hyper={}, incarnation=1, seed=0)
    >>> [getattr(a, "topic", type(a).__name__) for a in core.start(now=0.0)]
    ['fedsync/t/coordinator/status', 'fedsync/t/model/0/0', 'fedsync/t/manifest', 'WaitingForDevices']
    """

    def __init__(self, topics: Topics, params: dict[str, np.ndarray], policy: RoundPolicy, *,
                 hyper: dict[str, float], incarnation: int, seed: int,
                 strategy_factory=None, first_round_id: int = 1, model_version: int = 0,
                 screen=DEFAULT_SCREEN, verifier=None, driven: bool = False, executor: Executor = INLINE) -> None:
        from fedsync.params import flatten, spec_of

        self.topics = topics
        self.policy = policy
        self.rules: ModeRules = policy.rules  # the mode's rules, chosen once (coordinator/policy.py)
        self.hyper = dict(hyper)
        self.incarnation = incarnation
        self.seed = seed
        self.spec: ParamSpec = spec_of(params)
        self.vector = flatten(params, self.spec)
        self.version = model_version
        self.stats = CoordinatorStats()
        self.presence = Presence(policy.offline_grace)  # who is online, who is presumed alive
        self.phase = RoundPhase.WAITING  # changed only by _fire (coordinator/round_state.py)
        self.round: OpenRound | None = None  # the open round: not None exactly while the phase is open
        self.next_round_id = first_round_id
        self.closed_through = first_round_id - 1  # id of the last round that closed
        # Its state across rounds (a server optimiser's moments, a noise generator) is in checkpoints.
        self._strategy_factory = strategy_factory or (lambda n: FedAvg(n))
        # Accepted update ids of the last few closed rounds, so late redeliveries count as duplicates.
        self._recent: dict[int, dict[str, str]] = {}
        # async: closed rounds whose updates are still welcome (within max_staleness), by round id.
        self._past: dict[int, OpenRound] = {}
        # (vector, num_samples, model) -> refusal or None; its state is checkpointed. The default
        # is the bounds the CLI applies with no configuration (hardening.py); None turns it off.
        self.screen = UpdateScreen() if screen is DEFAULT_SCREEN else screen
        if hasattr(self.screen, "load_state"):
            self.screen.load_state({})
        self.verifier = verifier  # fedsync.signing verifier, or None: updates need not be signed
        # driven: rounds open only when adopt() hands in a model (an edge coordinator, driven from upstream)
        self.driven = driven
        self._adopted = False
        # The retained model and its delta (coordinator/model_publication.py).
        self.models = RetainedModel(topics, policy.shard_values, policy.model_codec)
        # Where each round's assembler and strategy run their parallel work (fedsync.executor):
        # inline here; the coordinator service passes its helper thread (use_executor).
        self.executor: Executor = executor
        self.receipts = InputReceipts(topics, -(-self.vector.size // policy.shard_values), self.stats)
        self._waiting = WaitingNotice()  # why no round opens, said when it is news (events.py)
        get_codec(policy.model_codec), get_codec(policy.update_codec)  # fail fast on a bad name

    @property
    def finished(self) -> bool:
        """Every round ran (the phase is ``finished``)."""
        return self.phase is RoundPhase.FINISHED

    def _fire(self, event: RoundEvent) -> None:
        """Take the transition ``event`` names; raises ``IllegalTransition`` if there is none."""
        self.phase = ROUND_TRANSITIONS.next(self.phase, event)

    @property
    def online(self) -> set[str]:
        """The devices whose retained status is ``online``."""
        return self.presence.online

    def use_executor(self, executor: Executor) -> None:
        """Run the parallel work of this and every later round through ``executor``."""
        self.executor = executor
        if self.round is not None:
            self.round.assembler.executor = executor
            use_executor(self.round.strategy, executor)

    # -- durability ----------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        """The committed state. ``_close`` takes it right after the strategy's ``finish``, so the
        strategy state in it is the state after that round's step (an abandoned round takes none)."""
        return Checkpoint(self.version, self.vector.copy(), self.next_round_id, self.closed_through, self.finished,
                          {r: dict(d) for r, d in self._recent.items()}, self.stats.snapshot(),
                          factory_state(self._strategy_factory),
                          self.screen.state() if hasattr(self.screen, "state") else {})

    def restore(self, ck: Checkpoint) -> None:
        """Load a checkpoint written by an earlier incarnation (before ``start``)."""
        if ck.vector.size != self.vector.size:
            raise ValueError(f"checkpoint has {ck.vector.size} params, the model has {self.vector.size}")
        # First: state of another strategy raises ValueError before anything else is restored.
        load_factory_state(self._strategy_factory, ck.strategy_state)
        if hasattr(self.screen, "load_state"):
            self.screen.load_state(ck.screen_state)
        self.version, self.vector = ck.version, ck.vector.astype(np.float32)
        self.next_round_id = ck.next_round_id
        # Loading the committed state (before start), not a transition: the phase is what it was.
        self.phase = RoundPhase.FINISHED if ck.finished else RoundPhase.WAITING
        self.closed_through = ck.closed_through
        self._recent = {int(r): dict(d) for r, d in ck.recent.items()}
        self.stats.load(ck.stats)

    def resume_round(self, manifest: RoundManifest, now: float) -> None:
        """Re-open the round a crashed incarnation had open (same id, selection and deadline).

        The journalled shards are then replayed through :meth:`on_message`.
        """
        if manifest.model_version != self.version or manifest.num_params != self.vector.size:
            raise ValueError("round journal does not match the checkpointed model")
        self._fire(RoundEvent.RESUME)
        layout = RoundLayout(manifest.round_id, self.version, self.vector.size, manifest.shard_values,
                             manifest.update_codec, manifest.model_digest)
        self.round = self._new_round(manifest, layout)
        self.next_round_id = max(self.next_round_id, manifest.round_id + 1)
        self.presence.started(now)  # presence is unknown until the retained statuses arrive

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
        if self.presence.started_at is not None:  # an adopted model has no delta: devices fetch it whole
            out = self.models.adopted(old_version, self.version, self.vector)
        else:
            out, self.models.delta_from = [], -1
        return self._count_out(out + self._maybe_open(now))

    def retained_state(self, now: float) -> list:
        """Everything the coordinator keeps retained on the broker, to (re)publish it."""
        status = PeerStatus("coordinator", "online", self.incarnation)
        out: list = [Publish(self.topics.coordinator_status, encode(status), 1, True)]
        out += self.models.full(self.version, self.vector)
        if self.round is not None:
            # Same round, new incarnation: devices learn of the restart and keep going.
            out.append(self._manifest_publish(replace(self.round.manifest, incarnation=self.incarnation)))
        elif self.finished:
            out.append(self._manifest_publish(self._idle_manifest(now, "finished")))
        return out

    # -- inputs -------------------------------------------------------------

    def start(self, now: float) -> list:
        self.presence.started(now)
        out = self.retained_state(now)
        if self.round is None and not self.finished:
            out += self._maybe_open(now) or [self._manifest_publish(self._idle_manifest(now))]
        return self._count_out(out)

    def tick(self, now: float) -> list:
        out: list = []
        r = self.round
        if r is not None and now >= r.manifest.deadline:
            out += self._close(now, RoundEvent.DEADLINE_COMMIT if self._commits(r) else RoundEvent.DEADLINE_ABANDON)
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
            # The device its topic names is told (coordinator/receipts.py), at most once a second.
            ack = self.receipts.answer(topic, err, self.round.manifest.round_id if self.round else
                                       max(0, self.next_round_id - 1), now)
            return self._count_out([RejectedInput(topic, err.field, err.reason, str(err))]
                                   + ([self._ack_publish(ack)] if ack is not None else []))
        return self._count_out(out)

    # -- updates --------------------------------------------------------------

    def _on_update(self, topic: str, payload: bytes, now: float, checked: CheckedShard) -> list:
        self.stats.bytes_in += len(payload)
        where = self.topics.parse_up(topic)
        shard = checked.shard
        if shard is None:
            raise checked.error  # type: ignore[misc]  # the payload did not decode
        if (shard.device, shard.round_id, shard.update_id, shard.index) != (
                where.device, where.round_id, where.update_id, where.shard):
            raise ProtocolError("topic", "topic_mismatch", "payload names another device, round, update or shard")
        if checked.error is not None:
            raise checked.error  # the shard's digest does not match its data
        r = self.round
        if self.rules.fedbuff and shard.round_id in self._past and r is not None:
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
        return self._after_shard(r, shard, outcome, now, payload)

    def _after_shard(self, r: OpenRound, shard: UpdateShard, o: ShardOutcome, now: float, payload: bytes) -> list:
        out: list = []
        status = {"accepted": "partial", "complete": "accepted", "duplicate": "partial", "rejected": "partial"}[o.kind]
        if o.kind in ("accepted", "complete"):
            out.append(JournalShard(self.topics.up(shard.device, shard.round_id, shard.update_id, shard.index),
                                    payload))
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
                                     o.field or "shard", o.reason, f"{shard.device} shard {shard.index}: {o.reason}"))
            status = "rejected"  # never accepted as sent: a final receipt naming the field (fedsync/receipts.py)
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
        reason = rejection(o.field, o.reason) if status == "rejected" else o.reason if status == "refused" else ""
        out.append(self._ack_publish(ShardAck(shard.device, shard.round_id, shard.update_id,
                                              shard.count, held, status, reason)))
        if o.kind in ("complete", "refused"):
            out += self._check_early_close(now)
        return out

    def _screen(self, r: OpenRound, u) -> str | None:
        staleness = self.version - r.manifest.model_version
        if staleness > self.policy.max_staleness:
            return "too_stale"
        return self.screen(u.vector, u.num_samples, self.vector) if self.screen is not None else None

    def _fold(self, r: OpenRound, u) -> None:
        """Add a verified update to the open round's aggregate (async: with its staleness weight)."""
        target = self.round if self.round is not None else r
        weight = self.rules.weight(u.num_samples, self.version - r.manifest.model_version,
                                   self.policy.staleness_exponent)
        if self.rules.fedbuff:
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
            self.presence.came_online(device)
            return [] if self.round else self._maybe_open(now)
        if self.presence.went_offline(device, now):
            self.stats.devices_offline_detected += 1
            return [DeviceOffline(device, now)] + self._check_early_close(now)
        return []

    # -- round lifecycle --------------------------------------------------------

    def _maybe_open(self, now: float) -> list:
        p = self.policy
        if self.phase is not RoundPhase.WAITING or (self.driven and not self._adopted):
            return []
        if p.rounds and self.stats.rounds_committed >= p.rounds:
            self._fire(RoundEvent.FINISH)
            return [self._manifest_publish(self._idle_manifest(now, "finished"))]
        needed = max(1, p.min_devices, p.quorum)
        if len(self.online) < needed:  # quorum is a floor for opening too: a round that cannot commit is not started
            self._waiting.found(WaitingForDevices(len(self.online), needed), now)
            return []
        self._waiting.round_opened()
        candidates = sorted(self.online)
        k = self.rules.selection_size(len(candidates), p.target, p.over_select)
        # Selection depends only on (seed, round id, who is online): a restarted coordinator picks the same.
        rng = random.Random(f"{self.seed}:{self.next_round_id}")
        selected = tuple(sorted(rng.sample(candidates, k)))
        target = min(p.target, k)
        manifest = self._manifest(now, "open", selected, target, min(p.quorum, target))
        layout = RoundLayout(manifest.round_id, self.version, self.vector.size, p.shard_values, p.update_codec,
                             manifest.model_digest)
        self._fire(RoundEvent.OPEN)
        self.round = self._new_round(manifest, layout)
        self.next_round_id += 1
        self._adopted = False
        return [RoundOpened(manifest), self._manifest_publish(manifest)]

    def _new_round(self, manifest: RoundManifest, layout: RoundLayout) -> OpenRound:
        strategy = self._strategy_factory(self.vector.size)
        use_executor(strategy, self.executor)
        assembler = ShardAssembler(layout, self.verifier, self.topics.federation, executor=self.executor)
        return OpenRound(manifest, assembler, strategy, frozenset(manifest.selected))

    def _check_early_close(self, now: float) -> list:
        r = self.round
        if r is None:
            return []
        accepted = r.assembler.accepted_devices

        def live_pending() -> bool:
            pending = r.selected - accepted - r.assembler.refused_devices
            return any(self.presence.presumed_alive(d, now) for d in pending)

        event = self.rules.early_close(len(accepted), r.buffered, r.manifest.target, r.manifest.quorum, live_pending)
        return self._close(now, event) if event is not None else []

    def link_lost(self, now: float) -> None:
        """The coordinator's own broker connection dropped: presence is unknown until it is back."""
        self.presence.link_lost()

    def link_restored(self, now: float) -> None:
        """Connected again: the outage's wills are forgotten (coordinator/presence.py)."""
        self.presence.link_restored(now)

    def _commits(self, r: OpenRound) -> bool:
        """Whether closing ``r`` now commits it (a strategy that returns no model still abandons it)."""
        return self.rules.commits(len(r.contributors), r.buffered, r.manifest.quorum)

    def _close(self, now: float, event: RoundEvent) -> list:
        self._fire(event)
        r, reason = self.round, CLOSE_REASON[event]
        assert r is not None  # every close leaves the open phase, and the round is open exactly then
        self.round = None
        accepted = tuple(sorted(r.contributors))
        self._recent[r.manifest.round_id] = {d: r.assembler.accepted_update(d) for d in r.assembler.accepted_devices}
        for old_round in sorted(self._recent)[:-RECENT_ROUNDS]:
            del self._recent[old_round]
        committed = self._commits(r)
        if self.rules.fedbuff:  # its late updates stay welcome for max_staleness rounds
            self._past[r.manifest.round_id] = r
            for old_round in sorted(self._past)[:-max(1, self.policy.max_staleness)]:
                del self._past[old_round]
        new_vector = r.strategy.finish(self.vector) if committed else None
        if new_vector is not None and not model_is_finite(new_vector):
            # Never publish a model no device can train on: the round is abandoned (docs/protocol.md).
            new_vector, reason = None, NON_FINITE_MODEL
            self.stats.rejected_by_reason[NON_FINITE_MODEL] += 1
        self.closed_through = r.manifest.round_id
        out: list = []
        if new_vector is not None:
            old_version, old_vector = self.version, self.vector
            _, exact = model_store.exact_step(old_vector, new_vector)
            self.vector, self.version = exact, self.version + 1
            self.stats.rounds_committed += 1
            # Checkpoint before anything is published: the service makes it durable first.
            out += [self.checkpoint()]
            publish, retire = self.models.commit(old_version, old_vector, self.vector)
            out += publish
            event = RoundClosed(r.manifest.round_id, "committed", self.version, tuple(sorted(r.selected)),
                                accepted, r.manifest.issued_at, now, reason, self.vector, mean_metrics(r.metrics),
                                int(sum(m.get("num_samples", 0.0) for m in r.metrics)))
            out += self._maybe_open(now) or [self._manifest_publish(self._idle_manifest(now))]
            out += retire  # model v goes only once the manifest names v+1
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
            delta_from=self.models.delta_from, resend_after=p.resend_after)

    def _idle_manifest(self, now: float, state: str = "waiting") -> RoundManifest:
        return self._manifest(now, state, (), 0, 0)

    def _manifest_publish(self, m: RoundManifest) -> Publish:
        return Publish(self.topics.manifest, encode(m), 1, True)

    def _ack_publish(self, ack: ShardAck) -> Publish:
        return Publish(self.topics.ack(ack.device), encode(ack), 1, True)

    def _reject(self, reason: str) -> None:
        self.stats.shards_rejected += 1
        self.stats.rejected_by_reason[reason] += 1

    def _count_out(self, actions: list) -> list:
        self.stats.bytes_out += sum(len(a.payload) for a in actions if isinstance(a, Publish))
        return actions + self._waiting.news(round_open=self.round is not None)
