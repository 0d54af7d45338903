"""Both brokers, for real, on 127.0.0.1: what fedsync relies on, asserted exactly.

Each scenario drives paho-mqtt 2.2 clients from the test thread (``client.loop`` in
``pump_until``, no background threads), so a fault such as a socket torn down under a
client is injected at a known point and nothing races the assertion.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from fedsync.broker_config.process import BrokerProcess, mosquitto_available, render_mosquitto_conf

pytestmark = pytest.mark.broker

TIMEOUT = 5.0
BINARY_PAYLOAD = bytes(range(256)) * 16  # 4 KiB holding every byte value


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class MqttProbe:
    """One MQTT 3.1.1 client whose events are recorded for the test to assert on."""

    def __init__(self, broker: BrokerProcess, client_id: str, username: str | None, password: str | None,
                 *, will: tuple[str, bytes] | None = None, keepalive: int = 10) -> None:
        self.broker, self.keepalive = broker, keepalive
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=False)
        self.connack: ReasonCode | None = None
        self.received: list[Received] = []
        self.acked_mids: set[int] = set()
        self.suback_mids: set[int] = set()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack = reason_code

    def _on_message(self, client, userdata, message) -> None:
        self.received.append(Received(message.topic, bytes(message.payload), message.qos, bool(message.retain)))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.acked_mids.add(mid)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.suback_mids.add(mid)

    def connect(self) -> ReasonCode:
        self.client.connect(self.broker.host, self.broker.port, keepalive=self.keepalive)
        pump_until(lambda: self.connack is not None, self)
        assert self.connack is not None
        return self.connack

    def subscribe(self, topic: str, qos: int = 1) -> None:
        _, mid = self.client.subscribe(topic, qos)
        pump_until(lambda: mid in self.suback_mids, self)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish and wait for the broker's PUBACK (``on_publish``)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
        pump_until(lambda: info.mid in self.acked_mids, self)

    def close(self) -> None:
        if self.client.socket() is not None:
            self.client.disconnect()
            self.client.loop(0.05)


def pump_until(done: Callable[[], bool], *probes: MqttProbe, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        for probe in probes:
            probe.client.loop(0.02)


def login(broker: BrokerProcess, users: dict[str, str], user: str, **kwargs) -> MqttProbe:
    probe = MqttProbe(broker, client_id=user, username=user, password=users[user], **kwargs)
    reason = probe.connect()
    assert not reason.is_failure, f"{user} refused by {broker.kind}: {reason}"
    return probe


def test_authorised_device_qos1_update_reaches_coordinator_byte_exact(broker, broker_users):
    topic = "fedsync/test/up/dev-0/1/u1/0"
    coordinator = login(broker, broker_users, "coordinator")
    coordinator.subscribe("fedsync/test/up/#", qos=1)
    device = login(broker, broker_users, "dev-0")

    device.publish(topic, BINARY_PAYLOAD, qos=1)
    pump_until(lambda: coordinator.received, coordinator, device)

    assert coordinator.received == [Received(topic, BINARY_PAYLOAD, qos=1, retain=False)]
    device.close()
    coordinator.close()


@pytest.mark.parametrize("username, password", [
    ("dev-0", "wrong-password"),      # known user, wrong password
    ("dev-99", "dev-99-secret"),      # user not in the password file
    (None, None),                     # anonymous
])
def test_bad_credentials_are_refused_with_not_authorized(broker, username, password):
    probe = MqttProbe(broker, client_id="intruder", username=username, password=password)

    reason = probe.connect()

    # MQTT 3.1.1 §3.2.2.3: return code 5 "not authorized"; paho 2 reports it as reason
    # code 135. Both brokers answer this way even for a wrong password (not code 4).
    assert reason.is_failure
    assert reason.value == 135
    assert reason.getName() == "Not authorized"
    probe.close()


def test_retained_manifest_reaches_a_later_subscriber(broker, broker_users):
    topic = "fedsync/test/manifest"
    coordinator = login(broker, broker_users, "coordinator")
    coordinator.publish(topic, b"manifest round=1", qos=1, retain=True)

    device = login(broker, broker_users, "dev-3")
    device.subscribe(topic, qos=1)
    pump_until(lambda: device.received, device)

    assert device.received == [Received(topic, b"manifest round=1", qos=1, retain=True)]
    device.close()
    coordinator.close()


def test_last_will_fires_when_device_socket_dies_without_disconnect(broker, broker_users):
    status_topic = "fedsync/test/status/dev-7"
    coordinator = login(broker, broker_users, "coordinator")
    coordinator.subscribe("fedsync/test/status/+", qos=1)
    # A keepalive of an hour: a will that arrives at all was fired by the closed socket, not by
    # the broker giving up on a silent client (1.5 x keepalive, MQTT 3.1.1 §3.1.2.10).
    device = login(broker, broker_users, "dev-7", will=(status_topic, b"offline"), keepalive=3600)

    # Fault: the device's link vanishes. No DISCONNECT packet is sent, so per MQTT 3.1.1
    # §3.1.2.5 the broker must publish the will.
    device.client.socket().close()
    pump_until(lambda: coordinator.received, coordinator)

    assert coordinator.received == [Received(status_topic, b"offline", qos=1, retain=False)]
    coordinator.close()


# docs/brokers.md: mosquitto with persistence keeps retained messages across a restart; amqtt
# keeps nothing. Both outcomes are pinned so a change in either is noticed.
RETAINED_AFTER_RESTART = {
    "mosquitto": [Received("fedsync/test/manifest", b"manifest round=2", qos=1, retain=True)],
    "amqtt": [],
}


def test_retained_manifest_after_broker_restart(broker, broker_users):
    topic = "fedsync/test/manifest"
    coordinator = login(broker, broker_users, "coordinator")
    coordinator.publish(topic, b"manifest round=2", qos=1, retain=True)
    coordinator.close()
    port_before = broker.port

    broker.restart()

    assert broker.port == port_before and broker.is_running()
    # The sentinel, retained after the restart: a SUBSCRIBE's retained messages reach the client
    # before the next SUBSCRIBE's (mosquitto queues them in order; amqtt waits for their PUBACKs
    # before it reads the next SUBSCRIBE), so once it is here, a surviving manifest would be too.
    sentinel = "fedsync/test/coordinator/status"
    coordinator = login(broker, broker_users, "coordinator")
    coordinator.publish(sentinel, b"online", qos=1, retain=True)
    coordinator.close()
    device = login(broker, broker_users, "dev-4")
    device.subscribe(topic, qos=1)
    device.subscribe(sentinel, qos=1)
    pump_until(lambda: any(r.topic == sentinel for r in device.received), device)
    assert device.received == [*RETAINED_AFTER_RESTART[broker.kind],
                               Received(sentinel, b"online", qos=1, retain=True)]
    device.close()


@pytest.mark.parametrize("broker_kind", [
    "amqtt",
    pytest.param("mosquitto", marks=pytest.mark.skipif(not mosquitto_available(), reason="no mosquitto")),
])
def test_start_on_a_taken_port_fails_with_the_broker_log(broker_kind):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        process = BrokerProcess(broker_kind, port=squatter.getsockname()[1])

        with pytest.raises(RuntimeError) as failure:
            process.start()

    message = str(failure.value)
    assert f"127.0.0.1:{process.port}" in message
    assert "address already in use" in message.lower()
    assert not process.is_running() and process.pid is None
    assert process.workdir is None  # the temp dir of a failed first start is removed


def test_mosquitto_conf_follows_design_settings():
    with_auth = render_mosquitto_conf(18830, "/var/lib/fedsync", "/etc/fedsync/passwd", "/etc/fedsync/acl")
    anonymous = render_mosquitto_conf(18830, "/var/lib/fedsync/", None, None, max_queued_messages=640)

    lines = {line for line in with_auth.splitlines() if line and not line.startswith("#")}
    assert lines == {
        "listener 18830 127.0.0.1",
        "persistence true",
        "persistence_location /var/lib/fedsync/",
        "autosave_interval 60",
        "allow_anonymous false",
        "password_file /etc/fedsync/passwd",
        "acl_file /etc/fedsync/acl",
        "max_packet_size 8388608",
        "max_queued_messages 100000",
        "max_queued_bytes 0",
        "max_inflight_messages 100",
        "log_dest stderr",
    }
    assert "allow_anonymous true" in anonymous.splitlines()
    assert "max_queued_messages 640" in anonymous.splitlines()
    assert not any(line.startswith(("password_file", "acl_file", "user")) for line in anonymous.splitlines())



def test_a_client_connecting_while_others_subscribe_keeps_its_session(broker, broker_users):
    """A device connects while the broker publishes it the retained messages of 300 filters
    (amqtt sends a connecting client those of every filter) and another client subscribes to
    new filters all the while: every QoS 1 message it then publishes is forwarded. On amqtt
    0.12.1 unpatched, the subscription table changing under its connect loop ended the new
    session after CONNACK, and its publishes were acknowledged and lost
    (broker_config/embedded.py, SnapshotSubscriptions)."""
    import threading

    holder = login(broker, broker_users, "dev-0")
    mids = {holder.client.publish(f"fedsync/demo/model/9/{i}", b"m" * 64, qos=1, retain=True).mid for i in range(300)}
    subs = {holder.client.subscribe(f"fedsync/demo/model/9/{i}", 1)[1] for i in range(300)}
    pump_until(lambda: mids <= holder.acked_mids and subs <= holder.suback_mids, holder)
    sink = login(broker, broker_users, "coordinator")
    sink.subscribe("fedsync/demo/up/#", 1)
    churn = login(broker, broker_users, "dev-1")
    stop = threading.Event()
    churned = []

    def subscribe_new_filters() -> None:
        while not stop.is_set() and len(churned) < 5000:
            churn.client.subscribe(f"fedsync/demo/model/10/{len(churned)}", 1)
            churn.client.loop(0.001)
            churned.append(1)

    t = threading.Thread(target=subscribe_new_filters)
    t.start()
    try:
        device = login(broker, broker_users, "dev-2")
        sent = {device.client.publish(f"fedsync/demo/up/dev-2/1/u1/{k}", b"s", qos=1).mid for k in range(20)}
        pump_until(lambda: sent <= device.acked_mids, device)
        up = lambda: sorted(r.topic for r in sink.received if "/up/" in r.topic)  # noqa: E731
        pump_until(lambda: len(up()) >= 20, sink, device, timeout=15)
    finally:
        stop.set()
        t.join(30)
    assert len(churned) > 0  # the table did change while the device connected and published
    assert up() == sorted(f"fedsync/demo/up/dev-2/1/u1/{k}" for k in range(20))
