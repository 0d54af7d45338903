"""Supervision: an internal error ends the service loudly, and the broker says so.

The field report: `target = 0` made the manifest fail to encode inside `on_message`; it
was counted as a rejected status message, the service thread died, and MqttLink kept the
session alive, so the coordinator looked online and did nothing. The same hole was in the
agent host (a NaN training loss could not be encoded; now it is left out of the update,
device_agent/fit_check.py). Now the loop logs the error, drops the connection without
DISCONNECT so the broker fires the last will, and reports the error to the CLI, which
exits non-zero; a training thread that dies (SystemExit from a trainer) ends the host the
same way. Each test watches the retained status from a separate client: "online" first
(the positive control), then the will's "offline".
"""

from __future__ import annotations

import math
import random

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedsync.broker_config.process import BrokerProcess, mosquitto_available
from fedsync.coordinator.core import CoordinatorCore, RoundPolicy
from fedsync.coordinator.service import CoordinatorService
from fedsync.device_agent.service import AgentHost, DeviceSpec
from fedsync.trainer_api import FitResult
from fedsync.errors import EncodeError
from fedsync.messages import PeerStatus, decode, encode
from fedsync.address import Credentials
from fedsync.topics import Topics
from tests.util import wait_until

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")]

USERS = {"coordinator": "c-pw", "pi-kitchen": "k-pw", "watcher": "w-pw"}
TOPICS = Topics("sup")


class Watcher:
    """Records every payload on a topic, retained ones included."""

    def __init__(self, broker: BrokerProcess, topic: str) -> None:
        self.payloads: list[bytes] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="watcher", clean_session=True)
        self.client.username_pw_set("watcher", USERS["watcher"])
        self.client.on_message = lambda _c, _u, msg: self.payloads.append(bytes(msg.payload))
        self.client.on_connect = lambda cl, *_: cl.subscribe(topic, 1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def states(self) -> list[str]:
        return [decode(p, PeerStatus).state for p in self.payloads if p]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def broker():
    with BrokerProcess("mosquitto", users=USERS) as b:
        yield b


def test_a_manifest_that_cannot_be_encoded_ends_the_coordinator_and_fires_its_will(broker):
    params = {"w": np.zeros(8, np.float32)}
    # target = 0 is refused by the config loader; built here directly to reach the core's hole.
    core = CoordinatorCore(TOPICS, params, RoundPolicy(rounds=1, target=0, quorum=0), hyper={}, incarnation=42, seed=0)
    watcher = Watcher(broker, TOPICS.coordinator_status)
    service = CoordinatorService(core, broker.url, credentials=Credentials("coordinator", USERS["coordinator"]),
                                 keepalive=5)
    try:
        service.start()
        wait_until(lambda: "online" in watcher.states(), 10, "the coordinator's online status")
        # A device comes online: the core opens a round, and its manifest does not encode.
        device = paho.Client(CallbackAPIVersion.VERSION2, client_id="pi-kitchen")
        device.username_pw_set("pi-kitchen", USERS["pi-kitchen"])
        device.connect(broker.host, broker.port)
        device.publish(TOPICS.status("pi-kitchen"), encode(PeerStatus("pi-kitchen", "online")), 1, True)
        device.loop(1.0)
        device.disconnect()
        assert service.done.wait(10)
        assert isinstance(service.failed, EncodeError) and "manifest" in str(service.failed)
        wait_until(lambda: watcher.states()[-1:] == ["offline"], 10, "the coordinator's last will")
        assert watcher.states() == ["online", "offline"]
        assert decode(watcher.payloads[-1], PeerStatus).incarnation == 42
        assert core.stats.shards_rejected == 0  # an internal error is not bad input
    finally:
        service.stop()
        watcher.close()


class NanLossTrainer:
    """Trains nothing and reports a NaN loss, which no update shard may carry."""

    def fit(self, params, hyper, rng) -> FitResult:
        return FitResult({k: v.copy() for k, v in params.items()}, num_samples=5, metrics={"train_loss": math.nan})

    def evaluate(self, params):  # pragma: no cover - not reached
        raise NotImplementedError


class ExitingTrainer:
    """A trainer that calls sys.exit: a BaseException, which a pool thread would swallow."""

    def fit(self, params, hyper, rng) -> FitResult:
        raise SystemExit(3)

    def evaluate(self, params):  # pragma: no cover - not reached
        raise NotImplementedError


def _one_device(broker, trainer, incarnation: int):
    core = CoordinatorCore(TOPICS, {"w": np.zeros(8, np.float32)}, RoundPolicy(rounds=1, target=1, quorum=1),
                           hyper={}, incarnation=incarnation, seed=0)
    coordinator = CoordinatorService(core, broker.url, credentials=Credentials("coordinator", USERS["coordinator"]),
                                     keepalive=5)
    host = AgentHost(broker.url, TOPICS, [DeviceSpec("pi-kitchen", trainer,
                                                     Credentials("pi-kitchen", USERS["pi-kitchen"]))],
                     keepalive=5, seed=random.Random(0).randrange(1 << 30))
    return core, coordinator, host


def test_a_nan_loss_is_left_out_of_the_update_and_the_update_counts(broker):
    # Once the hole of the field report: encoding the NaN raised inside the dispatcher.
    core, coordinator, host = _one_device(broker, NanLossTrainer(), 7)
    watcher = Watcher(broker, TOPICS.status("pi-kitchen"))
    try:
        coordinator.start()
        host.start()
        assert host.wait_finished(20), "the campaign did not finish"
        assert (core.stats.updates_accepted, core.stats.rounds_committed) == (1, 1)
        assert host.failed is None and not host.done.is_set()
        assert host.stats()["fits_failed"] == 0 and watcher.states() == ["online"]
    finally:
        host.stop()
        coordinator.stop()
        watcher.close()


def test_an_exception_escaping_a_training_thread_ends_the_agent_host_and_fires_the_devices_will(broker):
    core, coordinator, host = _one_device(broker, ExitingTrainer(), 8)
    watcher = Watcher(broker, TOPICS.status("pi-kitchen"))
    try:
        coordinator.start()
        host.start()
        assert host.done.wait(20), "the agent host kept running after its training thread died"
        assert isinstance(host.failed, RuntimeError) and "training thread of pi-kitchen" in str(host.failed)
        assert isinstance(host.failed.__cause__, SystemExit)
        wait_until(lambda: watcher.states()[-1:] == ["offline"], 10, "the device's last will")
        assert watcher.states() == ["online", "offline"]
        assert core.stats.updates_accepted == 0 and coordinator.failed is None
    finally:
        host.stop()
        coordinator.stop()
        watcher.close()
