"""The coordinator's MQTT adapter: broker events in, core actions out.

One thread (the caller's, or the one ``start()`` makes) owns the core. paho's
thread only puts messages on a queue. The loop drains the queue in batches,
feeds the core, ticks it every ``tick_interval`` and carries out the actions
in this order:

1. durability: checkpoints written atomically, round journals opened, newly
   held shards appended — then one fsync for the batch;
2. broker acknowledgements (paho manual ack): the PUBACK/PUBCOMP for a shard
   goes out only once the shard is on disk, so a ``kill -9`` at any point
   loses nothing the broker considers delivered;
3. publishes (receipts, models, manifests). Receipts are coalesced per device
   within a batch: each is a full retained snapshot, so only the newest matters.

On the first connection the service recovers from its journal (if it has a
``state_dir``); on a reconnect to a broker that lost our session (restart
without persistence, or amqtt) it republishes its retained state. After every
connection, whatever ``session_present`` said, it also audits what the broker
retains against what it published and repairs the difference, deletes updates
devices published retained, and counts shards lost on the way
(coordinator/broker_watch.py, fed the messages the core never sees).

One coordinator per federation. Every connection starts behind an ownership
gate: nothing is fed to the core, acknowledged or published until the service
has read the retained ``coordinator/status``. It knows it has seen it (or
that there is none) when its probe, a message to itself published after the
subscription, comes back. Own incarnation, ``offline`` or nothing: go on.
Another incarnation ``online``: at start-up this is a rival, unless the
operator passed ``takeover``. A live rival shows itself by reconnecting, which
kicks us off its session (mosquitto and amqtt fire no will on such a
takeover, so the retained status stays ``online``); we then stand down with
the broker told DISCONNECT and never reconnect. No kick within
``LIVENESS_WAIT`` means the status is stale (a peer frozen before its will
fired) and we go on. Seen on a reconnect while running, another incarnation
means we were taken over: stand down the same way, publishing nothing.

Parallel work: the service hands its core the helper thread of
:mod:`fedsync.transport.parallel` (``executor``, ``HELPER_THREAD`` unless told otherwise),
so the core's assemblers and strategies decode and fold half their work on a second core,
and it decodes and hashes each batch's shards through the same executor. The core itself
starts no thread: built without a service it runs everything inline.

Supervision: an exception escaping the loop is logged with its traceback, the
socket is dropped without DISCONNECT (so the broker fires the last will), and
``done`` is set with ``failed`` holding the error; the CLI exits non-zero.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Callable

from fedsync.coordinator.core import (Checkpoint, CoordinatorCore, DeviceOffline, JournalShard, RejectedInput, RoundClosed,
                              RoundOpened, WaitingForDevices, check_shard)
from fedsync.coordinator.broker_watch import BrokerWatch, WatchNote
from fedsync.coordinator.events import metric_fields
from fedsync.coordinator.journal import Journal
from fedsync.actions import Publish, Subscribe, Unsubscribe
from fedsync.errors import ProtocolError
from fedsync.executor import Executor
from fedsync.log import log_event
from fedsync.messages import PeerStatus, decode, encode
from fedsync.address import Credentials
from fedsync.transport import paho_fast
from fedsync.transport.mqtt import MqttLink
from fedsync.transport.parallel import HELPER_THREAD

log = logging.getLogger("fedsync.coordinator")

EventHandler = Callable[[object], None]

PROBE_WAIT = 3.0  # seconds to wait for our probe to come back before deciding without it
LIVENESS_WAIT = 3.0  # seconds a live rival needs to reconnect (its backoff starts at <= 0.2 s)


def describe_incarnation(status: PeerStatus) -> str:
    """``incarnation N, started <UTC time>``: a coordinator's incarnation is its start time in ns."""
    started = datetime.fromtimestamp(status.incarnation / 1e9, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"incarnation {status.incarnation}, started {started}"


@dataclass(slots=True)
class _Gate:
    """One connection's ownership check (see the module docstring)."""

    session_present: bool
    deadline: float
    probe_back: bool = False
    status: PeerStatus | None = None
    rival_until: float | None = None  # waiting this long for a live rival to kick us off
    held: list = field(default_factory=list)


class CoordinatorService:
    """Runs a :class:`CoordinatorCore` against a broker.

    ``on_event`` receives every reported event (``RoundClosed``,
    ``RejectedInput``, ``DeviceOffline``) on the service thread.
    ``state_dir`` turns on the journal: durable shards before acks,
    checkpoints at every round close, recovery on start. ``executor``: where the
    core's parallel work runs (the helper thread; the core is given it here).
    """

    def __init__(self, core: CoordinatorCore, broker: str, *, credentials: Credentials = Credentials(),
                 client_id: str = "coordinator", keepalive: int = 15, tick_interval: float = 0.1,
                 on_event: EventHandler | None = None, state_dir: str | None = None,
                 clock: Callable[[], float] = time.time, takeover: bool = False,
                 executor: Executor = HELPER_THREAD) -> None:
        self.core = core
        self.executor = executor
        core.use_executor(executor)
        self.clock = clock
        self.tick_interval = tick_interval
        self.on_event = on_event
        self.journal = Journal(state_dir) if state_dir else None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._up_prefix = core.topics.root + "/up/"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        t = core.topics
        will = (t.coordinator_status, encode(PeerStatus("coordinator", "offline", core.incarnation)), 1, True)
        # one payload copy per received PUBLISH instead of three (fedsync/transport/paho_fast.py)
        paho_fast.install()
        self.link = MqttLink(client_id, broker, on_message=self._enqueue, on_connect=self._connected,
                             will=will, credentials=credentials, keepalive=keepalive, manual_ack=True,
                             on_disconnect=lambda: self._inbox.put(("disconnect",)),
                             on_retained=lambda topic, payload, token: self._inbox.put(("retained", topic, payload,
                                                                                      token)))
        self.link.subscribe(t.coordinator_status, 1)  # first: its retained message comes before the probe's echo
        self.link.subscribe(t.coordinator_probe, 1)
        self.link.subscribe(t.up_filter, 2)  # granted QoS caps delivery: 2 keeps the sender's QoS 1 or 2
        self.link.subscribe(t.status_filter, 1)
        self.started = threading.Event()
        self.takeover = takeover
        self._gate: _Gate | None = None
        self.done = threading.Event()  # the loop has ended: stopped, failed or stood down
        self.failed: BaseException | None = None  # an internal error that ended the loop
        self.conflict: str | None = None  # why this coordinator stood down for another one
        self.watch = BrokerWatch(t, core.incarnation)  # the broker's retained store and queue
        self.broker_stats = self.watch.stats

    def _enqueue(self, topic: str, payload: bytes, token) -> None:
        self._inbox.put(("msg", topic, payload, token))

    def call(self, fn) -> None:
        """Run ``fn(core, now) -> actions`` on the service thread (the only thread that owns the core)."""
        self._inbox.put(("call", fn))

    def _connected(self, session_present: bool) -> None:
        self._inbox.put(("connect", session_present))

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> "CoordinatorService":
        self._thread = threading.Thread(target=self.run, name="coordinator", daemon=True)
        self._thread.start()
        return self

    def stop(self, graceful: bool = True) -> None:
        """Stop. ``graceful=False`` imitates a crash: no offline status, no DISCONNECT, no flush."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.conflict is not None or self.failed is not None:
            return  # the loop already left the broker as it had to
        if graceful and self.link.connected.is_set():
            t = self.core.topics
            self.link.publish(t.coordinator_status, encode(PeerStatus("coordinator", "offline", self.core.incarnation)), 1, True)
        self.link.stop(disconnect=graceful)
        if self.journal is not None and graceful:
            self.journal.close()

    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - supervision: log, let the will fire, end loudly
            self.failed = exc
            log.exception("coordinator_failed error=%s", type(exc).__name__)
            self.link.hold_reconnect.set()
            self.link.stop(disconnect=False)
        finally:
            self.done.set()

    def _loop(self) -> None:
        self.link.start()
        next_tick = self.clock()
        while not self._stop.is_set():
            batch = []
            try:
                batch.append(self._inbox.get(timeout=max(0.0, min(next_tick - self.clock(), 0.1))))
                while len(batch) < 512:
                    batch.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            self._process(batch)
            if self._gate is None:
                self._execute(self.watch.poll(self.link.published_ok, self.clock()), [])
            if self._gate is not None:
                held = self._check_gate(self.clock())
                if held:
                    self._process(held)
            elif self.started.is_set() and self.clock() >= next_tick:
                self._execute(self.core.tick(self.clock()), [])
                next_tick = self.clock() + self.tick_interval
            elif self.clock() >= next_tick:
                next_tick = self.clock() + self.tick_interval

    def _process(self, batch: list) -> None:
        actions: list = []
        tokens = []
        # Decode and hash the batch's update shards first, half of them on a second core.
        ups = [i for i, item in enumerate(batch) if item[0] == "msg" and item[1].startswith(self._up_prefix)]
        checks = {}
        if self._gate is None:
            checks = dict(zip(ups, self.executor.split_map(check_shard, [batch[i][2] for i in ups])))
        t = self.core.topics
        for i, item in enumerate(batch):
            now = self.clock()
            kind = item[0]
            if kind == "connect":
                self._gate = _Gate(item[1], now + PROBE_WAIT)
                self.link.publish(t.coordinator_probe, str(self.core.incarnation).encode(), 1, False)
            elif kind == "disconnect":
                self._on_disconnect()
            elif kind == "call":
                actions += item[1](self.core, now)
            elif item[1] in (t.coordinator_status, t.coordinator_probe):
                tokens.append(item[3])
                self._on_ownership_message(item[1], item[2], now)
            elif self._gate is not None:
                self._gate.held.append(item)
            elif (aside := self._set_aside(kind, item[1], item[2])) is not None:
                actions += aside  # an audit's reading, a parked upload, the echo of its deletion
                tokens.append(item[3])
            else:
                if i in checks:
                    self.watch.upload(item[1], checks[i])
                actions += self.core.on_message(item[1], item[2], now, checks.get(i))
                tokens.append(item[3])
            if self._stop.is_set():
                return  # stood down: acknowledge and publish nothing more
            if self._gate is not None:
                held = self._check_gate(now)
                if held is not None:
                    # The gate opened mid-batch: what came before, then the held messages, in order.
                    self._execute(actions, tokens)
                    return self._process(held + batch[i + 1:])
        self._execute(actions, tokens)

    def _set_aside(self, kind: str, topic: str, payload: bytes) -> list | None:
        """The actions for a message that is not the core's (coordinator/broker_watch.py), else None."""
        if kind == "retained":
            return self.watch.retained(topic, payload)
        return [] if self.watch.live(topic, payload) else None

    # -- ownership (one coordinator per federation) --------------------------------------

    def _on_ownership_message(self, topic: str, payload: bytes, now: float) -> None:
        g = self._gate
        if topic == self.core.topics.coordinator_probe:
            if g is not None and payload == str(self.core.incarnation).encode():
                g.probe_back = True
            elif g is None and (audit := self.watch.probe_back(payload)) is not None:
                self._execute(audit, [])
            return
        try:
            status = decode(payload, PeerStatus) if payload else None
        except ProtocolError:
            status = None  # not a coordinator's status: nothing to defer to
        if g is not None:
            g.status = status
        elif status is not None and self._is_rival(status):
            self._stand_down(f"replaced by another coordinator of federation {self.core.topics.federation!r} "
                             f"({describe_incarnation(status)}) that took over; standing down", status)

    def _is_rival(self, status: PeerStatus) -> bool:
        return status.state == "online" and status.incarnation != self.core.incarnation

    def _check_gate(self, now: float) -> list | None:
        """Decide the open gate if its evidence is in: the messages it held once it opens, else None."""
        g = self._gate
        assert g is not None
        if g.rival_until is not None:
            if now < g.rival_until:
                return None
            log_event(log, "stale_coordinator_status", logging.WARNING, other=describe_incarnation(g.status),
                      note=f"no live coordinator kicked us within {LIVENESS_WAIT:g} s; taking over")
        elif not g.probe_back and now < g.deadline:
            return None
        elif g.status is not None and self._is_rival(g.status):
            if self.started.is_set():
                self._stand_down(f"replaced by another coordinator of federation {self.core.topics.federation!r} "
                                 f"({describe_incarnation(g.status)}) that took over; standing down", g.status)
                return None
            if not self.takeover:
                g.rival_until = now + LIVENESS_WAIT
                return None
            log_event(log, "taking_over", logging.WARNING, other=describe_incarnation(g.status))
        self._gate = None
        self._execute(self._on_connect(g.session_present, now), [])
        self.watch.connected(self.link.published, now)  # audit once these are acknowledged
        return g.held

    def _on_disconnect(self) -> None:
        self.core.link_lost(self.clock())
        self.watch.disconnected()
        g = self._gate
        if g is not None and g.rival_until is not None:
            # The rival took its session back: it is alive. Never reconnect to fight it.
            self._stand_down(f"another coordinator is running on federation {self.core.topics.federation!r} "
                             f"({describe_incarnation(g.status)}); stop it first, or pass --takeover", g.status)

    def _stand_down(self, message: str, other: PeerStatus) -> None:
        self.link.hold_reconnect.set()
        self.conflict = message
        log_event(log, "standing_down", logging.DEBUG, other=other.incarnation, note=message)  # the CLI prints it
        self._stop.set()
        self.link.stop(disconnect=True)  # DISCONNECT: no will, so the other's online status stands

    def _on_connect(self, session_present: bool, now: float) -> list:
        if not self.started.is_set():
            actions = self._recover(now) + self.core.start(now)
            self.started.set()
            return actions
        self.core.link_restored(now)
        if not session_present:
            log_event(log, "broker_lost_session", note="republishing retained state")
            return self.core.retained_state(now)
        # A will may have been published while we were away: say we are here again.
        status = PeerStatus("coordinator", "online", self.core.incarnation)
        return [Publish(self.core.topics.coordinator_status, encode(status), 1, True)]

    def _recover(self, now: float) -> list:
        if self.journal is None:
            return []
        rec = self.journal.load()
        if rec.checkpoint is not None:
            self.core.restore(rec.checkpoint)
        actions: list = []
        if rec.manifest is not None:
            manifest = rec.manifest
            if manifest.delta_from >= 0:
                # The delta into this version is not in the checkpoint, so this process publishes
                # the model whole: a crash between the checkpoint and the delta's publish must not
                # leave the manifest sending devices to a delta that never comes (the audit
                # clears one that did go out).
                manifest = replace(manifest, delta_from=-1)
            self.core.resume_round(manifest, now)
            self.journal.open_round(manifest)  # an existing round journal keeps its first manifest
            for topic, payload in rec.shards:
                # Replay through the ordinary path: dedup makes it idempotent. Already durable.
                actions += [a for a in self.core.on_message(topic, payload, now) if not isinstance(a, JournalShard)]
        log_event(log, "recovered", version=self.core.version, next_round=self.core.next_round_id,
                  open_round=rec.manifest.round_id if rec.manifest else None, shards=len(rec.shards),
                  torn_tail=rec.torn_tail)
        return actions

    # -- carrying out actions ---------------------------------------------------------------

    def _execute(self, actions: list, tokens: list) -> None:
        j = self.journal
        dirty = False
        for a in actions:
            if j is None:
                break
            if isinstance(a, Checkpoint):
                j.write_checkpoint(a)
            elif isinstance(a, RoundOpened):
                j.open_round(a.manifest)
            elif isinstance(a, JournalShard):
                j.append(a.topic, a.payload)
                dirty = True
        if dirty:
            j.sync()  # type: ignore[union-attr]
        for token in tokens:
            self.link.ack(token)
        last_ack: dict[str, int] = {}
        ack_prefix = self.core.topics.root + "/ack/"
        for i, a in enumerate(actions):
            if isinstance(a, Publish) and a.topic.startswith(ack_prefix):
                last_ack[a.topic] = i
        for i, a in enumerate(actions):
            if isinstance(a, Publish):
                if a.topic.startswith(ack_prefix) and last_ack[a.topic] != i:
                    continue
                self.link.publish(a.topic, a.payload, a.qos, a.retain)
                self.watch.published(a)
            elif isinstance(a, Subscribe):
                self.link.subscribe(a.topic_filter, a.qos)
            elif isinstance(a, Unsubscribe):
                self.link.unsubscribe(a.topic_filter)
            elif isinstance(a, WatchNote):
                log_event(log, a.event, a.level, **a.fields)
            elif not isinstance(a, (Checkpoint, RoundOpened, JournalShard)):
                self._report(a)

    def _report(self, event: object) -> None:
        if isinstance(event, RoundClosed):
            log_event(log, f"round_{event.outcome}", round=event.round_id, version=event.model_version,
                      accepted=len(event.accepted), selected=len(event.selected), reason=event.reason,
                      seconds=event.closed_at - event.started_at, **metric_fields(event.metrics))
            self._execute(self.watch.round_closed(event.round_id, self.clock()), [])
        elif isinstance(event, RejectedInput):
            log_event(log, "input_rejected", logging.WARNING, topic=event.topic, field=event.field,
                      reason=event.reason, detail=event.detail)
        elif isinstance(event, DeviceOffline):
            log_event(log, "device_offline", device=event.device)
        elif isinstance(event, WaitingForDevices):
            log_event(log, "waiting_for_devices", online=event.online, needed=event.needed)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - an observer must not stop the coordinator
                log.exception("event_handler_failed")
