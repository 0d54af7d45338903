"""Security scenarios: the rendered mosquitto setup (TLS + passwords + ACL) on 127.0.0.1,
the amqtt ACL and its documented limits, the rendered files, and the update screen.

Each broker scenario renders a fresh setup with ``fedsync broker-config`` (the CLI's
own entry point), starts mosquitto with exactly that configuration, and names one
attack: a forged update under another device's topic, a wrong password, a device
publishing a manifest, a device snooping on others' updates. MQTT 3.1.1 gives a
publisher no error for a denied PUBLISH, so each test proves the denial at the
receiving end, with a positive control sent on the same connection right after the
forgery: once the control has arrived, the forgery would have too.
"""

from __future__ import annotations

import os
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

from fedsync.broker_config.tls import make_ca
from fedsync.coordinator.core import CoordinatorCore, RoundPolicy
from fedsync.actions import Publish
from fedsync.messages import RoundManifest, decode, encode
from tests.secured_broker import (TOPICS, Client, Setup, federation, forged_update, needs_mosquitto,
                                   raw_connack, rendered_broker)
from tests.util import wait_until


@pytest.fixture
def secured() -> Iterator[Setup]:
    with rendered_broker() as setup:
        yield setup


# -- mosquitto, rendered config, TLS ---------------------------------------------------------

@needs_mosquitto
@pytest.mark.broker
def test_full_rounds_over_tls_with_the_acl_and_a_device_snooping_sees_no_updates(secured):
    assert secured.broker.url.startswith("mqtts://127.0.0.1:")
    # dev-4 subscribes to everything: mosquitto grants the filter but delivers only what the
    # ACL lets dev-4 read (manifest, model, coordinator status) - never others' updates,
    # receipts or presence.
    snoop = Client(secured.broker.port, "dev-4", secured.users["dev-4"], ca=secured.ca, subscribe=("fedsync/#",))
    fed = federation(secured, policy=RoundPolicy(rounds=2, target=4, quorum=4, min_devices=4, round_timeout=60.0))
    fed.start()
    try:
        assert fed.wait(60), "rounds did not commit over TLS"
        s = fed.summary()
        # The sentinel: the coordinator publishes the finished manifest after it has every update
        # and has sent every receipt, and mosquitto queues messages to one subscriber in the order
        # it handles them; so once the snoop holds it, any update or receipt it could read is here.
        wait_until(lambda: any(decode(p, RoundManifest).state == "finished" for _, p in snoop.seen(TOPICS.manifest)),
                   10, "the finished manifest at the snoop")
    finally:
        snoop.close()  # before the devices' clean stops: those come after the sentinel
        fed.stop()
    assert (s["rounds_completed"], s["rounds_abandoned"]) == (2, 0)
    assert (s["updates_accepted"], s["duplicates_dropped"], s["shards_rejected"]) == (8, 0, 0)
    assert s["devices_offline_detected"] == 0
    kinds = {t.split("/")[2] for t, _ in snoop.seen()}
    assert "manifest" in kinds and "model" in kinds  # the positive control: dev-4 reads what it may
    assert kinds <= {"manifest", "model", "modeldelta", "coordinator"}
    assert snoop.seen(TOPICS.root + "/up/") == [] and snoop.seen(TOPICS.root + "/ack/") == []


@needs_mosquitto
@pytest.mark.broker
def test_a_device_publishing_under_another_devices_topic_is_dropped_by_the_broker(secured):
    port, ca, users = secured.broker.port, secured.ca, secured.users
    # Before the federation: a spy with the coordinator's rights listens to every update
    # while dev-4 (asking for client id dev-0, which the broker replaces by its user name)
    # forges a shard for dev-0, then sends a control on its own topic.
    spy = Client(port, "coordinator", users["coordinator"], ca=ca, subscribe=(TOPICS.up_filter,))
    forger = Client(port, "dev-4", users["dev-4"], ca=ca, client_id="dev-0", subscribe=(TOPICS.manifest,))
    forger.publish(TOPICS.up("dev-0", 1, "uforged", 0), b"forged")
    forger.publish(TOPICS.up("dev-4", 1, "uctl", 0), b"control")
    wait_until(lambda: spy.seen(TOPICS.root + "/up/dev-4/"), 10, "the control on dev-4's own topic")
    assert spy.seen(TOPICS.root + "/up/dev-0/") == []
    spy.close()  # its client id was "coordinator": it must be gone before the real one connects

    # During a round: dev-0 trains slowly, so a forged dev-0 update would arrive first and
    # win (first complete update per device and round counts).
    fed = federation(secured, train_delays={"dev-0": 2.0})
    fed.start()
    try:
        wait_until(lambda: any(decode(p, RoundManifest).state == "open" for _, p in forger.seen(TOPICS.manifest)),
                   20, "the open manifest")
        manifest = next(m for m in (decode(p, RoundManifest) for _, p in forger.seen(TOPICS.manifest))
                        if m.state == "open")
        for topic, payload in forged_update(manifest, "dev-0", "uforged"):
            forger.publish(topic, payload)
        for topic, payload in forged_update(manifest, "dev-4", "uctl")[:1]:
            forger.publish(topic, payload)  # control: dev-4 may publish here; it is not selected
        core = fed.coordinator.core
        wait_until(lambda: core.stats.rejected_by_reason["not_selected"] == 1, 10, "the control to arrive")
        assert fed.wait(30), "the round did not commit"
        s = fed.summary()
    finally:
        fed.stop()
        forger.close()
    assert s["rounds_completed"] == 1
    assert s["updates_accepted"] == 4
    assert s["duplicates_dropped"] == 0  # dev-0's genuine update was the first and only one
    assert s["shards_rejected"] == 1 and s["rejected_by_reason"] == {"not_selected": 1}  # the control only
    assert s["devices_offline_detected"] == 0  # asking for client id dev-0 did not kick dev-0 off


@needs_mosquitto
@pytest.mark.broker
def test_wrong_password_unknown_user_anonymous_and_untrusted_tls_are_refused(secured):
    port, ca, users = secured.broker.port, secured.ca, secured.users
    # MQTT 3.1.1 §3.2.2.3: return code 5 = not authorized (mosquitto uses it for bad credentials).
    assert raw_connack(port, ca, "dev-0", "dev-0", users["dev-0"]) == 0
    assert raw_connack(port, ca, "dev-0", "dev-0", users["dev-1"]) == 5
    assert raw_connack(port, ca, "x", "intruder", "guess") == 5
    assert raw_connack(port, ca, "x") == 5
    paho_view = Client(port, "dev-0", "wrong", ca=ca)
    assert paho_view.rc.is_failure and paho_view.rc.value == 135  # paho maps 3.1.1's 5 to "Not authorized"
    paho_view.client.loop_stop()
    # A client that does not trust the federation's CA never gets as far as MQTT.
    other_ca = tempfile.NamedTemporaryFile(suffix=".pem", delete=False)
    try:
        other_ca.write(make_ca("someone else").cert_pem())
        other_ca.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            raw_connack(port, other_ca.name, "dev-0", "dev-0", users["dev-0"])
    finally:
        os.unlink(other_ca.name)
    # Plain MQTT to the TLS port: no CONNACK, the connection is closed.
    with pytest.raises((ConnectionError, OSError)):
        raw_connack(port, None, "dev-0", "dev-0", users["dev-0"])


@needs_mosquitto
@pytest.mark.broker
def test_a_device_cannot_publish_a_manifest_model_receipt_or_coordinator_status(secured):
    port, ca, users = secured.broker.port, secured.ca, secured.users
    core = CoordinatorCore(TOPICS, {"w": np.zeros(8, np.float32)}, RoundPolicy(rounds=1, min_devices=1),
                           hyper={}, incarnation=7, seed=0)
    coordinator = Client(port, "coordinator", users["coordinator"], ca=ca)
    for action in core.start(now=1.0):
        if isinstance(action, Publish):
            coordinator.publish(action.topic, action.payload, retain=action.retain)
    coordinator.close()

    def retained(user: str, *topics: str) -> dict[str, bytes]:
        """Every retained message ``user`` reads under ``topics`` (the first must hold one)."""
        c = Client(port, user, users[user], ca=ca, subscribe=topics)
        c.settle(topics[0])  # re-subscribed: its retained message comes after all of the first burst
        c.close()
        return dict(c.seen())

    before = retained("monitor", TOPICS.manifest, TOPICS.coordinator_status)
    fake = replace(decode(before[TOPICS.manifest], RoundManifest), round_id=99, state="open",
                   selected=("dev-4",), quorum=1, target=1)
    device = Client(port, "dev-4", users["dev-4"], ca=ca)
    device.publish(TOPICS.manifest, encode(fake), retain=True)
    device.publish(TOPICS.coordinator_status, b"offline", retain=True)
    device.publish(TOPICS.model(0, 0), b"poison", retain=True)
    device.publish(TOPICS.ack("dev-0"), b"closed", retain=True)
    device.publish(TOPICS.status("dev-0"), b"offline", retain=True)
    device.publish(TOPICS.status("dev-4"), b"control", retain=True)  # allowed: its own presence
    device.close()
    after = retained("monitor", TOPICS.manifest, TOPICS.coordinator_status, TOPICS.status_filter)
    assert after[TOPICS.status("dev-4")] == b"control"  # positive control: processed in order
    assert TOPICS.status("dev-0") not in after
    assert after[TOPICS.manifest] == before[TOPICS.manifest]
    assert after[TOPICS.coordinator_status] == before[TOPICS.coordinator_status]
    model = retained("dev-0", TOPICS.model(0, 0))[TOPICS.model(0, 0)]
    assert model != b"poison" and decode(model).version == 0
    dev0 = Client(port, "dev-0", users["dev-0"], ca=ca, subscribe=(TOPICS.ack("dev-0"),))
    assert dev0.suback == [1]
    dev0.settle(TOPICS.manifest)
    assert dev0.seen(TOPICS.ack("dev-0")) == []  # no forged retained receipt for dev-0
    # Positive control on the same subscription: the coordinator's receipt does arrive.
    coordinator = Client(port, "coordinator", users["coordinator"], ca=ca)
    coordinator.publish(TOPICS.ack("dev-0"), b"receipt")
    wait_until(lambda: dev0.seen(TOPICS.ack("dev-0")), 10, "the coordinator's receipt for dev-0")
    coordinator.close()
    dev0.close()
    assert dev0.seen(TOPICS.ack("dev-0")) == [(TOPICS.ack("dev-0"), b"receipt")]


@needs_mosquitto
@pytest.mark.broker
def test_with_client_certificates_the_identity_comes_from_the_certificate():
    with rendered_broker("--client-certs") as s:
        port, ca, clients = s.broker.port, s.ca, s.dir / "clients"
        coordinator = Client(port, None, None, ca=ca, cert=clients / "coordinator", subscribe=(TOPICS.up_filter,))
        # dev-0's certificate, but claiming user, password and client id of dev-1: the broker
        # takes the user (and so the client id and ACL) from the certificate's CN.
        device = Client(port, "dev-1", "anything", ca=ca, client_id="dev-1", cert=clients / "dev-0")
        assert not device.rc.is_failure
        device.publish(TOPICS.up("dev-1", 1, "u", 0), b"as dev-1")
        device.publish(TOPICS.up("dev-0", 1, "u", 0), b"as dev-0")
        # One connection's messages reach a subscriber in order (mosquitto queues them as it
        # handles them): once dev-0's shard is here, the one sent before it would be too.
        wait_until(lambda: coordinator.seen(), 10, "dev-0's own shard")
        assert coordinator.seen() == [(TOPICS.up("dev-0", 1, "u", 0), b"as dev-0")]
        device.close()
        coordinator.close()
        # A password alone no longer opens the TLS listener.
        with pytest.raises((ConnectionError, OSError)):
            raw_connack(port, ca, "dev-0", "dev-0", s.users["dev-0"])


@needs_mosquitto
@pytest.mark.broker
def test_mqtt_link_writes_its_tls_socket_only_from_its_own_thread(secured, monkeypatch):
    from fedsync.address import Credentials
    from fedsync.transport.mqtt import MqttLink

    writers: set[str] = set()
    send = ssl.SSLSocket.send

    def recording_send(sock, data, *args):
        writers.add(threading.current_thread().name)
        return send(sock, data, *args)

    link = MqttLink("dev-0", secured.broker.url, on_message=lambda *a: None,
                    credentials=Credentials("dev-0", secured.users["dev-0"], secured.ca))
    link.start()
    try:
        assert link.wait_connected(10)
        monkeypatch.setattr(ssl.SSLSocket, "send", recording_send)
        for i in range(20):
            link.publish(TOPICS.up("dev-0", 1, "u1", i), b"x" * 100)
        assert link.flush(10)
    finally:
        monkeypatch.undo()
        link.stop()
    # An OpenSSL connection must not be written by one thread while another reads it.
    assert writers == {"mqtt-dev-0"}
