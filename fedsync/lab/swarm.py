"""Many simulated devices in one process, on one I/O thread.

Theory of operation
-------------------
:class:`~fedsync.device_agent.service.AgentHost` gives every device an
:class:`~fedsync.transport.mqtt.MqttLink` and so a thread; that is right for a handful
of devices and wrong for a thousand. :class:`Swarm` keeps what a device *is* — its own
MQTT link (client id = device id, its own password, a persistent session, a retained
``offline`` last will on ``status/{device}``, ``online`` published on every CONNACK)
and its own sans-IO :class:`~fedsync.device_agent.agent.AgentCore` with the device's
signer — but its links are :class:`~fedsync.transport.mux.MuxLink` s, the transport's
MqttLink driven by one :class:`~fedsync.transport.mux.LinkMux` selector thread (the
same reconnect backoff, session, will and write rules; connections opened in waves of
``max_connecting``).

Everything a device does happens on that one thread: the links' callbacks feed the
cores, a timer ticks them every ``tick_interval``, and the swarm carries out their
actions as AgentHost does (publish, subscribe, train, finished, a new campaign), so a
core is only ever touched by one thread. Training runs on a small thread pool
(``Trainer.fit`` with the per-(device, round) seeded RNG AgentHost uses); a device's
``train_delay`` waits on a timer, not in a pool thread; results come back through
``call_soon``. An exception from a core step is logged and counted in ``failures``;
the other devices go on.

Devices that need a persistent outbox (crash/restart tests) belong in AgentHost; the
swarm is for simulation and scale, and keeps updates in memory.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from fedsync.actions import Publish, Subscribe, Unsubscribe
from fedsync.device_agent.agent import AgentCore, CampaignStarted, ClearOutbox, Finished, Note, SaveOutbox, Train
from fedsync.device_agent.service import DeviceSpec
from fedsync.log import log_event
from fedsync.messages import PeerStatus, encode
from fedsync.topics import Topics
from fedsync.trainer_api import EvalResult, FitResult
from fedsync.transport.mqtt import Backoff
from fedsync.transport.mux import LinkMux, MuxLink

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
    link: MuxLink
    index: int
    received: int = 0
    finished: bool = False
    killed: bool = False


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
        self.seed = seed
        self.tick_interval = tick_interval
        self._mux = LinkMux(misc_interval=misc_interval, max_connecting=max_connecting,
                            connect_timeout=connect_timeout, name="swarm-io")
        self._pool = ThreadPoolExecutor(max_workers=train_workers, thread_name_prefix="swarm-train")
        self.all_finished = threading.Event()
        self.failures = 0  # exceptions from a core or an adapter step, logged and survived
        self.devices: dict[str, _Device] = {}
        for i, spec in enumerate(devices):
            did = spec.device_id
            core = AgentCore(did, topics, random.Random(f"{seed}:{did}"), resend_after=resend_after,
                             signer=spec.signer)
            link = self._mux.link(did, broker, on_message=lambda t, p, _tok, d=did: self._on_message(d, t, p),
                                  on_connect=lambda _sp, d=did: self._on_connect(d),
                                  will=(topics.status(did), encode(PeerStatus(did, "offline")), 1, True),
                                  credentials=spec.credentials, keepalive=keepalive, max_inflight=max_inflight,
                                  backoff=Backoff(0.2, 15.0, random.Random(f"backoff:{seed}:{did}")))
            self.devices[did] = _Device(spec, core, link, indices[did] if indices else i)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Swarm:
        self._mux.start()
        for d in self.devices.values():
            d.link.start()
        self._mux.call_soon(self._tick)
        return self

    def connected_count(self) -> int:
        return sum(1 for d in self.devices.values() if d.link.connected.is_set())

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
        if self._mux.running():
            self._mux.run_on_thread(self._say_offline, timeout)
        self._mux.stop(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def kill(self, device_id: str) -> None:
        """Simulate a crash: drop the socket with no DISCONNECT, so the broker fires the last will."""
        def do() -> None:
            d = self.devices[device_id]
            d.killed = True
            d.link.stop(disconnect=False)
            self._check_finished()
        self._mux.call_soon(do)

    def stats(self) -> dict[str, int]:
        """Sum of the cores' counters (bytes_up, shards_sent, rounds_accepted, ...), connects and messages."""
        total: dict[str, int] = {"connects": 0, "published": 0, "received": 0}
        for d in self.devices.values():
            for k in d.core.stats.__slots__:
                total[k] = total.get(k, 0) + getattr(d.core.stats, k)
            total["connects"] += d.link.connects
            total["published"] += d.link.published  # MQTT PUBLISH packets queued (shards, status)
            total["received"] += d.received  # PUBLISH packets delivered to the devices
        return total

    # -- on the I/O thread: the links' callbacks, the tick, trained results ------------------------------

    def _on_message(self, device_id: str, topic: str, payload: bytes) -> None:
        d = self.devices[device_id]
        d.received += 1
        self._step(d, "msg", lambda: d.core.on_message(topic, payload, time.time()))

    def _on_connect(self, device_id: str) -> None:
        d = self.devices[device_id]
        if d.killed:
            return
        d.link.publish(self.topics.status(device_id), encode(PeerStatus(device_id, "online")), 1, True)
        self._step(d, "connect", lambda: d.core.on_connect(time.time()))

    def _tick(self) -> None:
        now = time.time()
        for d in self.devices.values():
            if d.link.connected.is_set():
                self._step(d, "tick", lambda d=d: d.core.tick(now))
        self._mux.call_later(self.tick_interval, self._tick)

    def _step(self, d: _Device, kind: str, step: Callable[[], list]) -> None:
        if d.killed:
            return
        try:
            self._execute(d, step())
        except Exception:  # noqa: BLE001 - one device's failure must not stop the other 999
            self.failures += 1
            log.exception("device_event_failed device=%s kind=%s", d.spec.device_id, kind)

    def _execute(self, d: _Device, actions: list) -> None:
        for a in actions:
            if d.killed:
                return
            if isinstance(a, Publish):
                d.link.publish(a.topic, a.payload, a.qos, a.retain)  # queued; sent when the socket is writable
            elif isinstance(a, Subscribe):
                d.link.subscribe(a.topic_filter, a.qos)
            elif isinstance(a, Unsubscribe):
                d.link.unsubscribe(a.topic_filter)
            elif isinstance(a, Train):
                if d.spec.train_delay > 0:  # a slow phone: wait without holding a pool thread
                    self._mux.call_later(d.spec.train_delay, lambda a=a: self._pool.submit(self._train, d, a))
                else:
                    self._pool.submit(self._train, d, a)
            elif isinstance(a, Finished):
                d.finished = True
                self._check_finished()
            elif isinstance(a, CampaignStarted):
                d.finished = False
                self.all_finished.clear()
            elif isinstance(a, (SaveOutbox, ClearOutbox)):
                pass  # no outbox in the swarm (see the module docstring)
            elif isinstance(a, Note):
                log_event(log, a.event, logging.DEBUG, device=d.spec.device_id, **a.fields)

    def _train(self, d: _Device, a: Train) -> None:  # on a pool thread
        try:
            # Seeded per (device, round), exactly as AgentHost seeds it.
            rng = np.random.default_rng([self.seed, d.index, a.round_id])
            result = d.spec.trainer.fit(a.params, a.hyper, rng)
        except Exception:  # noqa: BLE001 - a user trainer's bug must not kill the swarm
            log.exception("trainer_failed device=%s round=%s", d.spec.device_id, a.round_id)
            return
        self._mux.call_soon(lambda: self._step(d, "trained", lambda: d.core.on_trained(
            a.round_id, result.params, result.num_samples, result.metrics, time.time())))

    def _check_finished(self) -> None:
        if all(d.finished or d.killed for d in self.devices.values()):
            self.all_finished.set()

    def _say_offline(self) -> None:
        for d in self.devices.values():
            if not d.killed and d.link.connected.is_set():
                d.link.publish(self.topics.status(d.spec.device_id),
                               encode(PeerStatus(d.spec.device_id, "offline")), 1, True)
