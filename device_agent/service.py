"""The device agent's MQTT adapter; one process can host many simulated devices.

Each device has its own :class:`MqttLink` (own client id, session and last
will) and its own :class:`AgentCore`. One dispatcher thread owns every core:
paho threads only enqueue, and training runs on a small thread pool whose
results come back through the same queue. So a core is only ever touched by
one thread, and 100 devices cost 100 sockets, not 100 processes.

``all_finished`` is set while every device has seen its campaign finish; it is
cleared again when a new campaign starts (the fleet stands, see agent.py).
Supervision: an exception escaping the dispatcher is logged with its traceback,
every link is dropped without DISCONNECT (the broker fires the last wills, so
the coordinator stops waiting for these devices), ``failed`` holds the error and
``done`` is set; the CLI exits non-zero. A training thread that dies of anything but an
``Exception`` (``SystemExit`` from a trainer, say) hands it to the dispatcher, which then
ends the same way: no thread of the host can die while its links stay up.

A failed fit costs one round, never the agent (``device_agent/fit_check.py``): a
trainer that raises, or whose result or delta is not finite (a degenerate global model,
training that exploded), is logged as ``fit_failed`` with the reason and counted
(``fits_failed``), nothing is uploaded, and the device takes part in the next round.
Metrics an update cannot carry (a NaN ``train_loss``) are left out and named
(``metrics_dropped``); the update itself is sent.

With ``ledger_dir`` each device also keeps its own ledger (``device_agent/ledger.py``):
what it sent, recorded before the outbox and the first publish, and every receipt,
recorded before the core sees it. An auditor checks the coordinator against it.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fedsync.device_agent.agent import (AgentCore, CampaignStarted, ClearOutbox, DuplicateDevice, Finished, Note,
                                        SaveOutbox, Train)
from fedsync.device_agent.fit_check import check_fit
from fedsync.device_agent.ledger import DeviceLedger
from fedsync.device_agent.outbox import Outbox
from fedsync.trainer_api import Trainer
from fedsync.actions import Publish, Subscribe, Unsubscribe
from fedsync.log import log_event
from fedsync.messages import PeerStatus, encode
from fedsync.address import Credentials
from fedsync.transport import paho_fast
from fedsync.transport.mqtt import Backoff, MqttLink
from fedsync.topics import Topics

log = logging.getLogger("fedsync.agent")

# Notes an operator wants at INFO (one line per round and per campaign); the rest are DEBUG.
_NOTE_LEVELS = {"round_done": logging.INFO, "round_skipped": logging.INFO, "campaign_started": logging.INFO,
                "update_given_up": logging.WARNING, "update_dropped": logging.INFO, "refetch": logging.INFO,
                "resend": logging.INFO, "model_digest_mismatch": logging.WARNING, "bad_message": logging.WARNING,
                "stale_manifest": logging.INFO}


@dataclass(slots=True)
class DeviceSpec:
    """One hosted device: its id, its trainer and how it logs in."""

    device_id: str
    trainer: Trainer
    credentials: Credentials = field(default_factory=Credentials)
    train_delay: float = 0.0  # extra seconds per fit, to simulate a slow phone
    signer: object = None  # fedsync.signing signer: sign every update (optional)


@dataclass(slots=True)
class _Device:
    spec: DeviceSpec
    core: AgentCore
    link: MqttLink
    index: int
    outbox: Outbox | None = None
    ledger: DeviceLedger | None = None
    finished: bool = False
    killed: bool = False
    fits_failed: int = 0


# What the coordinator refused to read from this device (docs/protocol.md, "Receipts", "Versions").
_NOTE_LEVELS.update(status_rejected=logging.WARNING, manifest_unsupported=logging.WARNING)


class AgentHost:
    """Runs one or many device agents against a broker.

    >>> # host = AgentHost("mqtt://127.0.0.1:1883", Topics("demo"), [DeviceSpec("dev-0", trainer)])
    >>> # host.start(); host.wait_finished(600); host.stop()
    """

    def __init__(self, broker: str, topics: Topics, devices: list[DeviceSpec], *, seed: int = 0,
                 keepalive: int = 15, resend_after: float = 10.0, train_workers: int = 2,
                 tick_interval: float = 0.2, state_dir: str | None = None,
                 indices: dict[str, int] | None = None, ledger_dir: str | None = None) -> None:
        self.topics = topics
        self.tick_interval = tick_interval
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=train_workers, thread_name_prefix="train")
        self._thread: threading.Thread | None = None
        self.devices: dict[str, _Device] = {}
        paho_fast.install()  # model shards arrive with one payload copy, not three
        # Our start time, on every status we publish: a second process on one device id tells
        # which of the two came later (device_agent/identity.py).
        self.incarnation = time.time_ns() // 1000
        self.duplicates: list[str] = []  # one line per device this host gave up to an older process
        for i, spec in enumerate(devices):
            core = AgentCore(spec.device_id, topics, random.Random(f"{seed}:{spec.device_id}"),
                             resend_after=resend_after, signer=spec.signer, incarnation=self.incarnation)
            offline = encode(PeerStatus(spec.device_id, "offline"))
            link = MqttLink(spec.device_id, broker,
                            on_message=lambda t, p, _tok, d=spec.device_id: self._inbox.put(("msg", d, t, p)),
                            on_connect=lambda _sp, d=spec.device_id: self._inbox.put(("connect", d)),
                            will=(topics.status(spec.device_id), offline, 1, True),
                            credentials=spec.credentials, keepalive=keepalive,
                            backoff=Backoff(0.2, 15.0, random.Random(f"backoff:{seed}:{spec.device_id}")))
            outbox = Outbox(f"{state_dir}/{spec.device_id}") if state_dir else None
            record = outbox.load() if outbox else None
            if record is not None:
                core.restore(record)
                log_event(log, "outbox_restored", device=spec.device_id, round=record.round_id,
                          update=record.update_id, shards=len(record.payloads))
            index = indices[spec.device_id] if indices else i  # the device's identity in training seeds
            ledger = DeviceLedger(ledger_dir, spec.device_id) if ledger_dir else None
            self.devices[spec.device_id] = _Device(spec, core, link, index, outbox, ledger)
        self.seed = seed
        self.all_finished = threading.Event()
        self.done = threading.Event()  # the dispatcher has ended (stopped or failed)
        self.failed: BaseException | None = None
        self.publish_hook = None  # callable(device_id, topic) before each publish; False drops it (fault injection)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "AgentHost":
        self._thread = threading.Thread(target=self._run, name="agent-host", daemon=True)
        self._thread.start()
        for d in self.devices.values():
            d.link.start()
        return self

    def wait_finished(self, timeout: float) -> bool:
        return self.all_finished.wait(timeout)

    def stop(self) -> None:
        for d in self.devices.values():
            if not d.killed and d.link.connected.is_set():
                d.link.publish(self.topics.status(d.spec.device_id), encode(PeerStatus(d.spec.device_id, "offline")), 1, True)
        for d in self.devices.values():
            if not d.killed:
                d.link.stop(disconnect=True)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for d in self.devices.values():
            if d.ledger is not None:
                d.ledger.close()

    def kill(self, device_id: str) -> None:
        """Simulate a crash: drop the socket with no DISCONNECT, so the broker fires the last will."""
        d = self.devices[device_id]
        d.killed = True
        d.link.stop(disconnect=False)
        self._check_finished()

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for d in self.devices.values():
            for k in d.core.stats.__slots__:
                total[k] = total.get(k, 0) + getattr(d.core.stats, k)
            total["fits_failed"] = total.get("fits_failed", 0) + d.fits_failed
        return total

    # -- the dispatcher --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._dispatch()
        except Exception as exc:  # noqa: BLE001 - supervision: log, let the wills fire, end loudly
            self.failed = exc
            log.exception("agent_failed error=%s", type(exc).__name__)
            for d in self.devices.values():
                d.link.hold_reconnect.set()
                d.link.stop(disconnect=False)
                d.killed = True
            self.all_finished.set()
        finally:
            self.done.set()

    def _dispatch(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            try:
                item = self._inbox.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                item = None
            now = time.time()
            if item is not None:
                kind, device_id = item[0], item[1]
                d = self.devices[device_id]
                if d.killed:
                    continue
                if kind == "msg":
                    if d.ledger is not None and item[3] and item[2] == self.topics.ack(device_id):
                        d.ledger.receipt(item[3])
                    self._execute(d, d.core.on_message(item[2], item[3], now))
                elif kind == "connect":
                    d.link.publish(self.topics.status(device_id),
                                   encode(PeerStatus(device_id, "online", self.incarnation)), 1, True)
                    self._execute(d, d.core.on_connect(now))
                elif kind == "trained":
                    round_id, result, metrics = item[2], item[3], item[4]
                    self._execute(d, d.core.on_trained(round_id, result.params, result.num_samples, metrics, now))
                elif kind == "fit_failed":
                    d.fits_failed += 1
                    log_event(log, "fit_failed", logging.WARNING, device=device_id, round=item[2], reason=item[3])
                    self._execute(d, d.core.on_fit_failed(item[2], item[3], now))
                elif kind == "crashed":
                    raise RuntimeError(f"training thread of {device_id} died: {item[2]!r}") from item[2]
            if time.monotonic() >= next_tick:
                for d in self.devices.values():
                    if not d.killed:
                        self._execute(d, d.core.tick(now))
                next_tick = time.monotonic() + self.tick_interval

    def _execute(self, d: _Device, actions: list) -> None:
        for a in actions:
            if d.killed:
                return  # a crashed device does nothing more
            if isinstance(a, Publish):
                if self.publish_hook is not None:
                    keep = self.publish_hook(d.spec.device_id, a.topic)
                    if d.killed:
                        return
                    if keep is False:
                        continue  # lost on the way, as a broker drops a full queue's message
                d.link.publish(a.topic, a.payload, a.qos, a.retain)
            elif isinstance(a, Subscribe):
                d.link.subscribe(a.topic_filter, a.qos)
            elif isinstance(a, Unsubscribe):
                d.link.unsubscribe(a.topic_filter)
            elif isinstance(a, Train):
                job = d.core.job
                if d.ledger is not None and job is not None and job.round_id == a.round_id:
                    d.ledger.model(job, a.params)
                self._pool.submit(self._train, d, a)
            elif isinstance(a, Finished):
                if not d.finished:
                    log_event(log, "campaign_finished", device=d.spec.device_id,
                              rounds_accepted=d.core.stats.rounds_accepted)
                d.finished = True
                self._check_finished()
            elif isinstance(a, CampaignStarted):
                if d.ledger is not None:
                    d.ledger.campaign()
                d.finished = False
                self.all_finished.clear()
            elif isinstance(a, SaveOutbox):
                if d.ledger is not None:  # first: what the ledger lacks was never sent
                    d.ledger.update(a.record.payloads, d.core.job, a.record.retries)
                if d.outbox is not None:
                    d.outbox.save(a.record)  # durable before the publishes that follow it
            elif isinstance(a, ClearOutbox):
                if d.outbox is not None:
                    d.outbox.clear(a.round_id)
            elif isinstance(a, DuplicateDevice):
                self._duplicate(d, a)
            elif isinstance(a, Note):
                log_event(log, a.event, _NOTE_LEVELS.get(a.event, logging.DEBUG), device=d.spec.device_id, **a.fields)

    def _duplicate(self, d: _Device, a: DuplicateDevice) -> None:
        """Another live process uses this device id. The later of the two stops: with a clean
        DISCONNECT (no last will) and no offline status, both of which are the other's now."""
        device = d.spec.device_id
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(a.other_incarnation / 1e6))
        if not a.ours_newer:
            log_event(log, "duplicate_device", logging.ERROR, device=device, other_started=started,
                      action="keep_running" if a.other_incarnation else "keep_running_other_does_not_check",
                      note="another process uses this device id; the broker disconnects one whenever the other "
                           "connects")
            return
        line = (f"device id {device!r} is in use by another agent (started {started}, before this one); "
                f"this one stops: give each device its own --device-id")
        log_event(log, "duplicate_device", logging.ERROR, device=device, other_started=started, action="stop")
        self.duplicates.append(line)
        d.killed = True
        d.link.hold_reconnect.set()
        d.link.stop(disconnect=True)
        if all(x.killed for x in self.devices.values()):
            self._stop.set()  # nothing left to run: the adapter reports self.duplicates
        self._check_finished()

    def _train(self, d: _Device, a: Train) -> None:
        device = d.spec.device_id
        try:
            if d.spec.train_delay:
                time.sleep(d.spec.train_delay)
            # Seeded per (device, round): a restarted device trains exactly as it would have.
            rng = np.random.default_rng([self.seed, d.index, a.round_id])
            with np.errstate(all="ignore"):  # a degenerate model overflows; check_fit says so, once
                result = d.spec.trainer.fit(a.params, a.hyper, rng)
            verdict = check_fit(a.params, result)
        except Exception as exc:  # noqa: BLE001 - a user trainer's bug costs a round, not the host
            log.exception("trainer_failed device=%s round=%s", device, a.round_id)
            self._inbox.put(("fit_failed", device, a.round_id, f"trainer_raised: {type(exc).__name__}: {exc}"[:200]))
            return
        except BaseException as exc:  # SystemExit, KeyboardInterrupt: this thread would die silently
            self._inbox.put(("crashed", device, exc))
            raise
        if verdict.reason is not None:
            self._inbox.put(("fit_failed", device, a.round_id, verdict.reason))
            return
        if verdict.dropped:
            log_event(log, "metrics_dropped", logging.WARNING, device=device, round=a.round_id,
                      names=",".join(verdict.dropped))
        self._inbox.put(("trained", device, a.round_id, result, verdict.metrics))

    def _check_finished(self) -> None:
        if all(d.finished or d.killed for d in self.devices.values()):
            self.all_finished.set()
