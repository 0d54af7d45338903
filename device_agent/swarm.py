"""Many simulated devices in one process, driven by one selector thread.

Theory of operation
-------------------
:class:`AgentHost` gives every device an :class:`~fedsync.mqtt.MqttLink` and so
a thread; that is right for a handful of devices and wrong for a thousand.
:class:`Swarm` keeps what a device *is* — its own paho client (client id =
device id, its own password, a persistent session, a retained ``offline``
last will on ``status/{device}``, ``online`` published on every CONNACK) and
its own sans-IO :class:`~device_agent.agent.AgentCore` — but drives every
client from one thread with paho's external-loop API:

* ``on_socket_open`` / ``on_socket_close`` add and remove a client's socket in
  a :mod:`selectors` selector; ``on_socket_register_write`` /
  ``on_socket_unregister_write`` switch write interest on while paho has
  bytes queued (``want_write()``), so publishing never blocks the thread;
* readable sockets get ``loop_read()``, writable ones ``loop_write()``; every
  ``misc_interval`` seconds every client gets ``loop_misc()`` (keepalive
  PINGREQs, dead-peer detection);
* paho callbacks only append to a list; the loop then feeds the cores and
  carries out their actions (the same action types AgentHost carries out), so
  a core is only ever touched by this one thread and no callback can raise
  into paho;
* training runs on a small thread pool (``Trainer.fit`` with the per-(device,
  round) seeded RNG AgentHost uses); results come back through a queue and a
  wake-up socket pair.

Connections are opened in waves: at most ``max_connecting`` devices are
between TCP connect and CONNACK at any time, so a thousand devices starting
together (or coming back after a broker restart) do not hit the broker's
accept queue at once. A lost connection is retried after exponential backoff
with full jitter (:class:`~fedsync.mqtt.Backoff`), through the same gate.

Devices that need a persistent outbox (crash/restart tests) belong in
AgentHost; the swarm is for simulation and scale, and keeps updates in memory.
"""

from __future__ import annotations

import heapq
import logging
import queue
import random
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.agent import AgentCore, ClearOutbox, Finished, Note, SaveOutbox, Train
from device_agent.service import DeviceSpec
from device_agent.trainer import EvalResult, FitResult
from fedsync.actions import Publish, Subscribe, Unsubscribe
from fedsync.log import log_event
from fedsync.messages import PeerStatus, encode
from fedsync.mqtt import Backoff, BrokerAddress
from fedsync.topics import Topics

log = logging.getLogger("fedsync.swarm")

__all__ = ["NoiseTrainer", "Swarm"]


class NoiseTrainer:
    """A stand-in for local training that costs almost nothing: global params plus small noise.

    ``fit`` returns ``params + scale * N(0, 1)`` (float32) drawn from the ``rng``
    the host seeds per (device, round), so a round is reproducible; the weight
    is always ``num_samples``. For benchmarks and scale tests, where what is
    measured is the synchronisation, not the learning.

    Example:
        >>> t = NoiseTrainer(num_samples=50, scale=1e-3)
        >>> r = t.fit({"w": np.zeros(4, np.float32)}, {}, np.random.default_rng(0))
        >>> r.num_samples, r.params["w"].dtype, bool(np.abs(r.params["w"]).max() < 0.01)
        (50, dtype('float32'), True)
    """

    __slots__ = ("num_samples", "scale")

    def __init__(self, num_samples: int = 100, scale: float = 1e-3) -> None:
        self.num_samples = num_samples
        self.scale = scale

    def fit(self, params: dict[str, np.ndarray], hyper: Mapping[str, float], rng: np.random.Generator) -> FitResult:
        out = {}
        for name, value in params.items():
            noise = rng.standard_normal(value.shape, dtype=np.float32)
            noise *= np.float32(self.scale)
            out[name] = (value + noise).astype(np.float32, copy=False)
        return FitResult(out, self.num_samples, {"train_loss": 0.0})

    def evaluate(self, params: dict[str, np.ndarray]) -> EvalResult:
        return EvalResult(loss=0.0, accuracy=0.0, num_samples=self.num_samples)


@dataclass(slots=True, eq=False)
class _Device:
    spec: DeviceSpec
    core: AgentCore
    client: paho.Client
    index: int
    backoff: Backoff
    subs: dict[str, int] = field(default_factory=dict)
    state: str = "down"  # down -> connecting (CONNECT sent) -> up (CONNACK ok)
    connecting_since: float = 0.0
    connects: int = 0
    published: int = 0
    published_ok: int = 0
    received: int = 0
    finished: bool = False
    killed: bool = False
    last_refusal: str | None = None


class Swarm:
    """Hosts ``devices`` against one broker from a single I/O thread.

    >>> # swarm = Swarm("mqtt://127.0.0.1:1883", Topics("demo"),
    >>> #               [DeviceSpec(f"dev-{i}", NoiseTrainer(), Credentials(f"dev-{i}", pw[i])) for i in range(1000)])
    >>> # swarm.start(); swarm.wait_connected(1000, 60); swarm.wait_finished(600); swarm.stop()
    """

    def __init__(self, broker: str, topics: Topics, devices: list[DeviceSpec], *, seed: int = 0,
                 keepalive: int = 30, resend_after: float = 10.0, train_workers: int = 2,
                 tick_interval: float = 0.2, misc_interval: float = 0.5, max_connecting: int = 32,
                 connect_timeout: float = 10.0, max_inflight: int = 32,
                 indices: dict[str, int] | None = None) -> None:
        self.topics = topics
        self.address = BrokerAddress.parse(broker)
        self.seed = seed
        self.keepalive = keepalive
        self.tick_interval = tick_interval
        self.misc_interval = misc_interval
        self.max_connecting = max_connecting
        self.connect_timeout = connect_timeout
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._events: list[tuple] = []  # appended by paho callbacks, drained by the loop
        self._trained: queue.SimpleQueue = queue.SimpleQueue()
        self._delayed: list[tuple[float, int, _Device, Train]] = []  # train_delay: (due, seq, device, action)
        self._seq = 0
        self._pool = ThreadPoolExecutor(max_workers=train_workers, thread_name_prefix="swarm-train")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._calls: queue.SimpleQueue = queue.SimpleQueue()  # functions to run on the loop thread
        self._pending: list[tuple[float, int, _Device]] = []  # (connect at, seq, device)
        self._connecting = 0
        self._closing = False  # set by stop(): a closed link is not retried
        self.all_finished = threading.Event()
        self.failures = 0  # exceptions from a core or an adapter step, logged and survived
        self.devices: dict[str, _Device] = {}
        for i, spec in enumerate(devices):
            core = AgentCore(spec.device_id, topics, random.Random(f"{seed}:{spec.device_id}"),
                             resend_after=resend_after)
            d = _Device(spec, core, self._make_client(spec, max_inflight), indices[spec.device_id] if indices else i,
                        Backoff(0.2, 15.0, random.Random(f"backoff:{seed}:{spec.device_id}")))
            d.client.user_data_set(d)
            self.devices[spec.device_id] = d

    def _make_client(self, spec: DeviceSpec, max_inflight: int) -> paho.Client:
        cred = spec.credentials
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=spec.device_id, clean_session=False,
                        protocol=paho.MQTTv311)
        if cred.username is not None:
            c.username_pw_set(cred.username, cred.password)
        if self.address.tls or cred.ca_file:
            c.tls_set(ca_certs=cred.ca_file, certfile=cred.cert_file, keyfile=cred.key_file,
                      tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.will_set(self.topics.status(spec.device_id), encode(PeerStatus(spec.device_id, "offline")), 1, True)
        c.max_inflight_messages_set(max_inflight)
        c.connect_async(self.address.host, self.address.port, self.keepalive)  # no I/O: sets the address
        c.on_connect = self._cb_connect
        c.on_disconnect = self._cb_disconnect
        c.on_message = self._cb_message
        c.on_publish = self._cb_publish
        c.on_socket_open = self._cb_socket_open
        c.on_socket_close = self._cb_socket_close
        c.on_socket_register_write = self._cb_register_write
        c.on_socket_unregister_write = self._cb_unregister_write
        return c

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> "Swarm":
        now = time.monotonic()
        for d in self.devices.values():
            self._schedule_connect(d, now)
        self._thread = threading.Thread(target=self._run, name="swarm-io", daemon=True)
        self._thread.start()
        return self

    def connected_count(self) -> int:
        return sum(1 for d in self.devices.values() if d.state == "up")

    def wait_connected(self, n: int | None = None, timeout: float = 60.0) -> bool:
        """Wait until ``n`` devices (default: all) hold a CONNACK."""
        n = len(self.devices) if n is None else n
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected_count() >= n:
                return True
            time.sleep(0.02)
        return False

    def wait_finished(self, timeout: float) -> bool:
        return self.all_finished.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Publish ``offline`` for every live device, wait for the broker's acks, DISCONNECT, stop."""
        if self._thread is not None and self._thread.is_alive():
            done = threading.Event()
            self._call(lambda: (self._say_offline(), done.set()))
            done.wait(timeout)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not self._flushed():
                time.sleep(0.01)
            done = threading.Event()
            self._call(lambda: (self._disconnect_all(), done.set()))
            done.wait(timeout)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and any(d.client.socket() is not None for d in self.devices.values()
                                                      if not d.killed):
                time.sleep(0.01)
            self._stop.set()
            self._wake()
            self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for d in self.devices.values():
            sock = d.client.socket()
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def kill(self, device_id: str) -> None:
        """Simulate a crash: drop the socket with no DISCONNECT, so the broker fires the last will."""
        def do() -> None:
            d = self.devices[device_id]
            d.killed = True
            sock = d.client.socket()
            if sock is not None:
                self._forget_socket(sock)
                sock.close()
            self._check_finished()
        self._call(do)

    def stats(self) -> dict[str, int]:
        """Sum of the cores' counters (bytes_up, shards_sent, rounds_accepted, ...), connects and messages."""
        total: dict[str, int] = {"connects": 0, "published": 0, "received": 0}
        for d in self.devices.values():
            for k in d.core.stats.__slots__:
                total[k] = total.get(k, 0) + getattr(d.core.stats, k)
            total["connects"] += d.connects
            total["published"] += d.published  # MQTT PUBLISH packets queued (shards, status)
            total["received"] += d.received  # PUBLISH packets delivered to the devices
        return total

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        next_tick = next_misc = time.monotonic()
        while not self._stop.is_set():
            mono = time.monotonic()
            timeout = min(next_tick, next_misc) - mono
            if self._pending:
                timeout = min(timeout, self._pending[0][0] - mono)
            if self._delayed:
                timeout = min(timeout, self._delayed[0][0] - mono)
            for key, mask in self._sel.select(max(0.0, timeout)):
                d = key.data
                if d is None:
                    self._drain_wake()
                    continue
                if mask & selectors.EVENT_READ and d.client.socket() is not None:
                    d.client.loop_read()
                if mask & selectors.EVENT_WRITE and d.client.socket() is not None:
                    d.client.loop_write()
                if d.client.socket() is None:
                    self._events.append(("down", d))
            self._handle_events()
            self._run_calls()
            self._handle_trained()
            mono = time.monotonic()
            while self._delayed and self._delayed[0][0] <= mono:
                _, _, d, a = heapq.heappop(self._delayed)
                self._pool.submit(self._train, d, a)
            if mono >= next_misc:
                self._misc(mono)
                next_misc = mono + self.misc_interval
            if mono >= next_tick:
                now = time.time()
                for d in self.devices.values():
                    if not d.killed and d.state == "up":
                        self._execute(d, d.core.tick(now))
                next_tick = mono + self.tick_interval
            self._start_connects(time.monotonic())

    def _handle_events(self) -> None:
        while self._events:
            batch, self._events = self._events, []
            for ev in batch:
                kind, d = ev[0], ev[1]
                if d.killed:
                    continue
                try:
                    if kind == "msg":
                        self._execute(d, d.core.on_message(ev[2], ev[3], time.time()))
                    elif kind == "connack":
                        self._on_connack(d, ev[2], ev[3])
                    elif kind == "down":
                        self._on_down(d)
                except Exception:  # noqa: BLE001 - one device's failure must not stop the other 999
                    self.failures += 1
                    log.exception("device_event_failed device=%s kind=%s", d.spec.device_id, kind)

    def _on_connack(self, d: _Device, refusal: str | None, session_present: bool) -> None:
        if d.state == "connecting":
            self._connecting -= 1
        if refusal is not None:
            d.last_refusal = refusal
            log_event(log, "connect_refused", logging.WARNING, client=d.spec.device_id, reason=refusal)
            d.state = "refused"  # the broker closes the socket next; _on_down schedules the retry
            return
        d.state = "up"
        d.connects += 1
        d.backoff.reset()
        for topic_filter, qos in d.subs.items():  # a broker that lost our session forgot them
            d.client.subscribe(topic_filter, qos)
        self._publish(d, self.topics.status(d.spec.device_id), encode(PeerStatus(d.spec.device_id, "online")), 1, True)
        self._execute(d, d.core.on_connect(time.time()))

    def _on_down(self, d: _Device) -> None:
        if d.state == "down":
            return
        if d.state == "connecting":
            self._connecting -= 1
        d.state = "down"
        if not self._closing and not d.killed:
            delay = d.backoff.next()
            log_event(log, "link_down", logging.DEBUG, client=d.spec.device_id, retry_in=delay)
            self._schedule_connect(d, time.monotonic() + delay)

    def _schedule_connect(self, d: _Device, at: float) -> None:
        self._seq += 1
        heapq.heappush(self._pending, (at, self._seq, d))

    def _start_connects(self, mono: float) -> None:
        while self._pending and self._connecting < self.max_connecting and self._pending[0][0] <= mono:
            _, _, d = heapq.heappop(self._pending)
            if d.killed or d.state != "down" or self._closing:
                continue
            try:
                d.client.reconnect()  # blocking TCP connect (fast on a LAN), then CONNECT queued
            except (OSError, ssl.SSLError) as exc:
                delay = d.backoff.next()
                log_event(log, "connect_failed", logging.DEBUG, client=d.spec.device_id, error=exc, retry_in=delay)
                self._schedule_connect(d, mono + delay)
                continue
            d.state = "connecting"
            d.connecting_since = mono
            self._connecting += 1

    def _misc(self, mono: float) -> None:
        for d in self.devices.values():
            if d.killed or d.state == "down" or d.client.socket() is None:
                continue
            if d.state == "connecting" and mono - d.connecting_since > self.connect_timeout:
                sock = d.client.socket()
                self._forget_socket(sock)
                sock.close()  # no CONNACK in time: retry through the gate (reconnect() replaces the socket)
                self._on_down(d)
                continue
            d.client.loop_misc()
            if d.client.socket() is None:
                self._on_down(d)

    # -- carrying out the cores' actions (as AgentHost does) -------------------------------------

    def _execute(self, d: _Device, actions: list) -> None:
        for a in actions:
            if d.killed:
                return
            if isinstance(a, Publish):
                self._publish(d, a.topic, a.payload, a.qos, a.retain)
            elif isinstance(a, Subscribe):
                d.subs[a.topic_filter] = a.qos
                if d.state == "up":
                    d.client.subscribe(a.topic_filter, a.qos)
            elif isinstance(a, Unsubscribe):
                d.subs.pop(a.topic_filter, None)
                if d.state == "up":
                    d.client.unsubscribe(a.topic_filter)
            elif isinstance(a, Train):
                if d.spec.train_delay > 0:  # a slow phone: wait without holding a pool thread
                    self._seq += 1
                    heapq.heappush(self._delayed, (time.monotonic() + d.spec.train_delay, self._seq, d, a))
                else:
                    self._pool.submit(self._train, d, a)
            elif isinstance(a, Finished):
                d.finished = True
                self._check_finished()
            elif isinstance(a, (SaveOutbox, ClearOutbox)):
                pass  # no outbox in the swarm (see the module docstring)
            elif isinstance(a, Note):
                log_event(log, a.event, logging.DEBUG, device=d.spec.device_id, **a.fields)

    def _publish(self, d: _Device, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        d.published += 1
        d.client.publish(topic, payload, qos=qos, retain=retain)  # queued; sent when writable

    def _train(self, d: _Device, a: Train) -> None:
        try:
            # Seeded per (device, round), exactly as AgentHost seeds it.
            rng = np.random.default_rng([self.seed, d.index, a.round_id])
            result = d.spec.trainer.fit(a.params, a.hyper, rng)
        except Exception:  # noqa: BLE001 - a user trainer's bug must not kill the swarm
            log.exception("trainer_failed device=%s round=%s", d.spec.device_id, a.round_id)
            return
        self._trained.put((d, a.round_id, result))
        self._wake()

    def _handle_trained(self) -> None:
        while True:
            try:
                d, round_id, result = self._trained.get_nowait()
            except queue.Empty:
                return
            if not d.killed:
                try:
                    self._execute(d, d.core.on_trained(round_id, result.params, result.num_samples, result.metrics,
                                                       time.time()))
                except Exception:  # noqa: BLE001 - as above
                    self.failures += 1
                    log.exception("device_event_failed device=%s kind=trained", d.spec.device_id)

    def _check_finished(self) -> None:
        if all(d.finished or d.killed for d in self.devices.values()):
            self.all_finished.set()

    def _say_offline(self) -> None:
        for d in self.devices.values():
            if not d.killed and d.state == "up":
                self._publish(d, self.topics.status(d.spec.device_id),
                              encode(PeerStatus(d.spec.device_id, "offline")), 1, True)

    def _flushed(self) -> bool:
        return all(d.published_ok >= d.published for d in self.devices.values()
                   if not d.killed and d.state == "up")

    def _disconnect_all(self) -> None:
        self._closing = True
        for d in self.devices.values():
            if not d.killed and d.client.socket() is not None:
                d.client.disconnect()  # DISCONNECT queued; loop_write sends it and closes

    # -- cross-thread calls --------------------------------------------------------------------

    def _call(self, fn) -> None:
        self._calls.put(fn)
        self._wake()

    def _run_calls(self) -> None:
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            fn()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (buffer full) or closing

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    # -- paho callbacks: record only (an exception here would stop paho's processing) ----------

    def _cb_connect(self, client, d: _Device, flags, reason_code, properties) -> None:
        refusal = str(reason_code) if reason_code.is_failure else None
        self._events.append(("connack", d, refusal, bool(flags.session_present)))

    def _cb_disconnect(self, client, d: _Device, flags, reason_code, properties) -> None:
        self._events.append(("down", d))

    def _cb_message(self, client, d: _Device, msg) -> None:
        d.received += 1
        self._events.append(("msg", d, msg.topic, bytes(msg.payload)))

    def _cb_publish(self, client, d: _Device, mid, reason_code, properties) -> None:
        d.published_ok += 1

    def _cb_socket_open(self, client, d: _Device, sock) -> None:
        try:
            self._sel.register(sock, selectors.EVENT_READ, d)
        except (KeyError, ValueError):
            self._sel.modify(sock, selectors.EVENT_READ, d)

    def _cb_socket_close(self, client, d: _Device, sock) -> None:
        self._forget_socket(sock)

    def _cb_register_write(self, client, d: _Device, sock) -> None:
        try:
            self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, d)
        except (KeyError, ValueError):
            pass

    def _cb_unregister_write(self, client, d: _Device, sock) -> None:
        try:
            self._sel.modify(sock, selectors.EVENT_READ, d)
        except (KeyError, ValueError):
            pass

    def _forget_socket(self, sock) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
