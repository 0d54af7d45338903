"""The coordinator's MQTT adapter: broker events in, core actions out.

One thread (the caller's, or the one ``start()`` makes) owns the core. paho's
thread only puts messages on a queue. The loop drains the queue in batches,
feeds the core, ticks it every ``tick_interval`` and carries out the actions.
Acks are coalesced per device within a batch: an ack is a full snapshot of
what the coordinator holds (retained), so only the newest one matters.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from coordinator.core import CoordinatorCore, DeviceOffline, RejectedInput, RoundClosed
from fedsync.actions import Publish
from fedsync.log import log_event
from fedsync.messages import PeerStatus, encode
from fedsync.mqtt import Credentials, MqttLink

log = logging.getLogger("fedsync.coordinator")

EventHandler = Callable[[object], None]


class CoordinatorService:
    """Runs a :class:`CoordinatorCore` against a broker.

    ``on_event`` receives every non-publish action (``RoundClosed``,
    ``RejectedInput``, ``DeviceOffline``) on the service thread.
    """

    def __init__(self, core: CoordinatorCore, broker: str, *, credentials: Credentials = Credentials(),
                 client_id: str = "coordinator", keepalive: int = 15, tick_interval: float = 0.1,
                 on_event: EventHandler | None = None, clock: Callable[[], float] = time.time) -> None:
        self.core = core
        self.clock = clock
        self.tick_interval = tick_interval
        self.on_event = on_event
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        t = core.topics
        will = (t.coordinator_status, encode(PeerStatus("coordinator", "offline", core.incarnation)), 1, True)
        self.link = MqttLink(client_id, broker, on_message=self._enqueue, on_connect=self._connected,
                             will=will, credentials=credentials, keepalive=keepalive)
        self.link.subscribe(t.up_filter, 2)  # granted QoS caps delivery: 2 keeps the sender's QoS 1 or 2
        self.link.subscribe(t.status_filter, 1)
        self.started = threading.Event()

    def _enqueue(self, topic: str, payload: bytes) -> None:
        self._inbox.put((topic, payload))

    def _connected(self) -> None:
        self._inbox.put(None)  # marker: (re)connected

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> "CoordinatorService":
        self._thread = threading.Thread(target=self.run, name="coordinator", daemon=True)
        self._thread.start()
        return self

    def stop(self, graceful: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if graceful and self.link.connected.is_set():
            t = self.core.topics
            self.link.publish(t.coordinator_status, encode(PeerStatus("coordinator", "offline", self.core.incarnation)), 1, True)
        self.link.stop(disconnect=graceful)

    def run(self) -> None:
        self.link.start()
        next_tick = self.clock()
        while not self._stop.is_set():
            timeout = max(0.0, next_tick - self.clock())
            batch = []
            try:
                batch.append(self._inbox.get(timeout=timeout))
                while len(batch) < 512:
                    batch.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            actions: list = []
            for item in batch:
                now = self.clock()
                if item is None:
                    if not self.started.is_set():
                        actions += self.core.start(now)
                        self.started.set()
                    continue
                actions += self.core.on_message(item[0], item[1], now)
            if self.clock() >= next_tick:
                if self.started.is_set():
                    actions += self.core.tick(self.clock())
                next_tick = self.clock() + self.tick_interval
            self._execute(actions)

    # -- carrying out actions ---------------------------------------------------------------

    def _execute(self, actions: list) -> None:
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
            else:
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
