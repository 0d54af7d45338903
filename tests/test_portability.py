"""Over real brokers (amqtt and mosquitto, the topic ACL enforced): ids with every allowed
character federate, devices fetch the model on exact shard topics, and a broken device gets
its ``rejected`` receipt through the broker (docs/brokers.md, docs/protocol.md "Receipts").
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import cbor2
import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedsync.address import Credentials
from fedsync.broker_config.process import BrokerProcess
from fedsync.coordinator.core import CoordinatorCore, RoundClosed, RoundPolicy
from fedsync.coordinator.service import CoordinatorService
from fedsync.device_agent.service import AgentHost, DeviceSpec
from fedsync.errors import ProtocolError
from fedsync.messages import PeerStatus, ShardAck, decode, encode
from fedsync.receipts import STATUS_UPDATE_ID
from fedsync.topics import Topics, check_name
from fedsync.trainer_api import FitResult
from tests.util import wait_until

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["pi.kitchen", "pi_garage-2"]  # every character class of the id pattern
USERS = {"coordinator": "coordinator-pw", **{d: f"{d}-pw" for d in DEVICES}, "dev-bad": "dev-bad-pw"}


class OffsetTrainer:
    def __init__(self, offset: float, num_samples: int) -> None:
        self.offset, self.num_samples = offset, num_samples

    def fit(self, params, hyper, rng) -> FitResult:
        return FitResult({k: v + np.float32(self.offset) for k, v in params.items()}, self.num_samples, {})


@pytest.fixture
def acl_broker(broker_kind):
    broker = BrokerProcess(broker_kind, users=USERS, federation_acl="farm")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def coordinator(broker: BrokerProcess, policy: RoundPolicy, closed: list) -> CoordinatorService:
    core = CoordinatorCore(Topics("farm"), {"w": np.zeros(12, np.float32)}, policy, hyper={}, incarnation=7, seed=0)
    return CoordinatorService(core, broker.url, credentials=Credentials("coordinator", USERS["coordinator"]),
                              on_event=lambda e: closed.append(e) if isinstance(e, RoundClosed) else None)


def test_dotted_and_underscored_ids_federate_under_the_acl_with_exact_shard_topics(acl_broker):
    closed: list[RoundClosed] = []
    policy = RoundPolicy(rounds=2, target=2, quorum=2, min_devices=2, shard_values=5, round_timeout=60.0)
    service = coordinator(acl_broker, policy, closed)
    specs = [DeviceSpec(d, OffsetTrainer(1.0 + i, 10), Credentials(d, USERS[d])) for i, d in enumerate(DEVICES)]
    host = AgentHost(acl_broker.url, Topics("farm"), specs, resend_after=3.0)
    subscribed: list[str] = []
    for d in host.devices.values():  # what each link was asked to subscribe to
        original = d.link.subscribe
        d.link.subscribe = lambda flt, qos=1, original=original: (subscribed.append(flt), original(flt, qos))
    service.start()
    host.start()
    try:
        wait_until(lambda: len(closed) == 2, 60, "two rounds to commit")
        wait_until(lambda: host.stats()["rounds_accepted"] == 4, 15, "every receipt")
    finally:
        host.stop()
        service.stop()
    assert [(c.outcome, c.accepted) for c in closed] == [("committed", tuple(sorted(DEVICES)))] * 2
    s = service.core.stats
    assert (s.updates_accepted, s.shards_rejected, dict(s.rejected_by_reason)) == (4, 0, {})
    # 12 values in shards of 5: three exact model topics per fetch, never a wildcard.
    model = sorted({t for t in subscribed if "/model" in t})
    assert model == [f"fedsync/farm/model/{v}/{i}" for v in (0, 1) for i in range(3)]
    assert not any("+" in t or "#" in t for t in subscribed)
    np.testing.assert_allclose(service.core.vector, 2 * (1.0 * 10 + 2.0 * 10) / 20)


class BrokenDevice:
    """A foreign device (user dev-bad) that publishes what a broken encoder wrote."""

    def __init__(self, broker: BrokerProcess) -> None:
        self.acks: list[ShardAck] = []
        self.subscribed = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-bad")
        c.username_pw_set("dev-bad", USERS["dev-bad"])
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("fedsync/farm/ack/dev-bad", 1)
        c.on_subscribe = lambda *a: self.subscribed.set()
        c.on_message = lambda cl, u, msg: self.acks.append(decode(bytes(msg.payload), ShardAck)) if msg.payload \
            else None
        c.connect(broker.host, broker.port, 15)
        c.loop_start()
        assert self.subscribed.wait(10)
        self.client = c

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_a_broken_device_gets_its_rejected_receipts_through_the_broker(acl_broker):
    closed: list = []
    service = coordinator(acl_broker, RoundPolicy(rounds=1, target=1, quorum=1, shard_values=5), closed)
    service.start()
    bad = BrokenDevice(acl_broker)
    try:
        wait_until(service.started.is_set, 15, "the coordinator to start")
        # 1. A status whose incarnation a JSON-minded encoder wrote as a float64.
        status = {"v": 1, "t": "status", "peer": "dev-bad", "state": "online", "incarnation": 2.0**40}
        bad.publish("fedsync/farm/status/dev-bad", cbor2.dumps(status), retain=True)
        wait_until(lambda: len(bad.acks) == 1, 15, "the status receipt")
        first = time.time()
        wait_until(lambda: service.core.stats.rejected_by_reason["type"] == 1, 5, "the count")
        assert service.core.online == set()
        # 2. An update shard of schema version 2, once the device's one-receipt-a-second limit allows.
        wait_until(lambda: time.time() > first + 1.1, 5, "the receipt limit's second to pass")
        shard = {"v": 2, "t": "update", "device": "dev-bad"}
        bad.publish("fedsync/farm/up/dev-bad/3/u00ff/0", cbor2.dumps(shard))
        wait_until(lambda: len(bad.acks) == 2, 15, "the update receipt")
        bad.publish("fedsync/farm/status/dev-bad", encode(PeerStatus("dev-bad", "online")), retain=True)
        wait_until(lambda: service.core.online == {"dev-bad"}, 15, "a valid status to count")
    finally:
        bad.close()
        service.stop()
    assert bad.acks == [ShardAck("dev-bad", 0, STATUS_UPDATE_ID, 1, b"\x00", "rejected", "incarnation:type"),
                        ShardAck("dev-bad", 3, "u00ff", 3, b"\x00", "rejected", "v:schema_version")]


def test_brokers_md_states_the_id_pattern_the_code_enforces():
    text = (ROOT / "docs" / "brokers.md").read_text(encoding="utf-8")
    section = text.split("### Which id characters each broker keeps", 1)[1].split("\n## ", 1)[0]
    (pattern,) = set(re.findall(r"`(\[A-Za-z0-9[^`]*\]\{1,64\})`", section))
    assert "RabbitMQ" in section and "**delivered as `/`**" in section
    probes = ["pi.kitchen", "pi_garage-2", "a", "x" * 64, "x" * 65, "a/b", "a+b", "a#b", "a b", "ü", "", "dev-1\n"]

    def valid(name: str) -> bool:
        try:
            return check_name("id", name) == name
        except ProtocolError:
            return False

    assert [bool(re.fullmatch(pattern, p)) for p in probes] == [valid(p) for p in probes]
    assert [valid(p) for p in probes] == [True, True, True, True] + [False] * 8
