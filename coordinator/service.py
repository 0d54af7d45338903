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
without persistence, or amqtt) it republishes its retained state.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from coordinator.core import (Checkpoint, CoordinatorCore, DeviceOffline, JournalShard, RejectedInput, RoundClosed,
                              RoundOpened, check_shard)
from coordinator.journal import Journal
from fedsync.actions import Publish
from fedsync.log import log_event
from fedsync.messages import PeerStatus, encode
from fedsync.mqtt import Credentials, MqttLink
from fedsync.parallel import split_map

log = logging.getLogger("fedsync.coordinator")

EventHandler = Callable[[object], None]


class CoordinatorService:
    """Runs a :class:`CoordinatorCore` against a broker.

    ``on_event`` receives every reported event (``RoundClosed``,
    ``RejectedInput``, ``DeviceOffline``) on the service thread.
    ``state_dir`` turns on the journal: durable shards before acks,
    checkpoints at every round close, recovery on start.
    """

    def __init__(self, core: CoordinatorCore, broker: str, *, credentials: Credentials = Credentials(),
                 client_id: str = "coordinator", keepalive: int = 15, tick_interval: float = 0.1,
                 on_event: EventHandler | None = None, state_dir: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.core = core
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
        self.link = MqttLink(client_id, broker, on_message=self._enqueue, on_connect=self._connected,
                             will=will, credentials=credentials, keepalive=keepalive, manual_ack=True)
        self.link.subscribe(t.up_filter, 2)  # granted QoS caps delivery: 2 keeps the sender's QoS 1 or 2
        self.link.subscribe(t.status_filter, 1)
        self.started = threading.Event()
        self.recovered_shards = 0

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
        if graceful and self.link.connected.is_set():
            t = self.core.topics
            self.link.publish(t.coordinator_status, encode(PeerStatus("coordinator", "offline", self.core.incarnation)), 1, True)
        self.link.stop(disconnect=graceful)
        if self.journal is not None and graceful:
            self.journal.close()

    def run(self) -> None:
        self.link.start()
        next_tick = self.clock()
        while not self._stop.is_set():
            batch = []
            try:
                batch.append(self._inbox.get(timeout=max(0.0, next_tick - self.clock())))
                while len(batch) < 512:
                    batch.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            actions: list = []
            tokens = []
            # Decode and hash the batch's update shards first, half of them on a second core.
            ups = [item[2] for item in batch if item[0] == "msg" and item[1].startswith(self._up_prefix)]
            checks = iter(split_map(check_shard, ups))
            for item in batch:
                now = self.clock()
                if item[0] == "connect":
                    actions += self._on_connect(item[1], now)
                elif item[0] == "call":
                    actions += item[1](self.core, now)
                else:
                    checked = next(checks) if item[1].startswith(self._up_prefix) else None
                    actions += self.core.on_message(item[1], item[2], now, checked)
                    tokens.append(item[3])
            if self.started.is_set() and self.clock() >= next_tick:
                actions += self.core.tick(self.clock())
                next_tick = self.clock() + self.tick_interval
            elif self.clock() >= next_tick:
                next_tick = self.clock() + self.tick_interval
            self._execute(actions, tokens)

    def _on_connect(self, session_present: bool, now: float) -> list:
        if not self.started.is_set():
            actions = self._recover(now) + self.core.start(now)
            self.started.set()
            return actions
        if not session_present:
            log_event(log, "broker_lost_session", note="republishing retained state")
            return self.core.retained_state(now)
        return []

    def _recover(self, now: float) -> list:
        if self.journal is None:
            return []
        rec = self.journal.load()
        if rec.checkpoint is not None:
            self.core.restore(rec.checkpoint)
        actions: list = []
        if rec.manifest is not None:
            self.core.resume_round(rec.manifest, now)
            self.journal.open_round(rec.manifest)
            for topic, payload in rec.shards:
                # Replay through the ordinary path: dedup makes it idempotent. Already durable.
                actions += [a for a in self.core.on_message(topic, payload, now) if not isinstance(a, JournalShard)]
            self.recovered_shards = len(rec.shards)
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
            elif not isinstance(a, (Checkpoint, RoundOpened, JournalShard)):
                self._report(a)

    def _report(self, event: object) -> None:
        if isinstance(event, RoundClosed):
            log_event(log, f"round_{event.outcome}", round=event.round_id, version=event.model_version,
                      accepted=len(event.accepted), selected=len(event.selected), reason=event.reason,
                      seconds=event.closed_at - event.started_at)
        elif isinstance(event, RejectedInput):
            log_event(log, "input_rejected", logging.WARNING, topic=event.topic, field=event.field,
                      reason=event.reason, detail=event.detail)
        elif isinstance(event, DeviceOffline):
            log_event(log, "device_offline", device=event.device)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - an observer must not stop the coordinator
                log.exception("event_handler_failed")
