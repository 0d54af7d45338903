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

import contextlib
import json
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker_config import acl as acl_mod
from broker_config.process import BrokerProcess, free_port, mosquitto_available
from broker_config.render import CBOR_ENVELOPE, main as render_main, size_limits, zstd_bound
from broker_config.tls import issue_server, make_ca, sans
from coordinator.core import CoordinatorCore, RoundPolicy
from coordinator.federation import LocalFederation
from coordinator.hardening import UpdateScreen
from fedsync.actions import Publish
from fedsync.codecs import get_codec
from fedsync.messages import MAX_PARAMS, MAX_SHARDS, RoundManifest, UpdateShard, decode, encode
from fedsync.params import digest, shard_slices, update_digest
from fedsync.topics import Topics
from tests.util import run_federation, wait_until

needs_mosquitto = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
TOPICS = Topics("demo")
DEVICES = [f"dev-{i}" for i in range(5)]  # dev-0..dev-3 train; dev-4 is the registered device that attacks


# -- helpers ---------------------------------------------------------------------------

@dataclass
class Setup:
    dir: Path
    broker: BrokerProcess
    users: dict[str, str]

    @property
    def ca(self) -> str:
        return str(self.dir / "ca.pem")


@contextlib.contextmanager
def rendered_broker(*extra: str) -> Iterator[Setup]:
    """`fedsync broker-config mosquitto` rendered into a temp dir, run by mosquitto on 127.0.0.1."""
    # Not tmp_path: mosquitto drops root to the `mosquitto` user, which must reach the files,
    # and pytest's base temp dir is 0700.
    out = Path(tempfile.mkdtemp(prefix="fedsync-secured-"))
    devices = out.parent / f"{out.name}.devices.txt"
    broker = None
    try:
        devices.write_text("# the federation\n" + "\n".join(DEVICES) + "\n")
        assert render_main(["mosquitto", "--devices", str(devices), "--out", str(out), "--bind", "127.0.0.1",
                            "--port", str(free_port()), "--host", "broker.test", "--shards-per-update", "4",
                            *extra]) == 0
        users = {p.stem: p.read_text().strip() for p in (out / "secrets").glob("*.pw")}
        broker = BrokerProcess.from_config_dir(out)
        broker.start()
        yield Setup(out, broker, users)
    finally:
        if broker is not None:
            broker.stop()
        devices.unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def secured() -> Iterator[Setup]:
    with rendered_broker() as setup:
        yield setup


class Client:
    """A plain paho client (TLS when ``ca`` is given) recording what it receives."""

    def __init__(self, port: int, user: str | None, password: str | None, *, ca: str | None = None,
                 client_id: str = "", subscribe: tuple[str, ...] = (), cert: Path | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.suback: list[int] = []
        self.lock = threading.Lock()
        self.connack = threading.Event()
        self.subscribed = threading.Event()
        self.rc = None
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or (user or ""), protocol=paho.MQTTv311)
        if user is not None:
            c.username_pw_set(user, password)
        if ca is not None:
            c.tls_set(ca_certs=ca, tls_version=ssl.PROTOCOL_TLS_CLIENT,
                      certfile=str(cert.with_suffix(".pem")) if cert else None,
                      keyfile=str(cert.with_suffix(".key")) if cert else None)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self._subscribe = subscribe
        c.connect("127.0.0.1", port, 15)
        c.loop_start()
        self.client = c
        assert self.connack.wait(10), "no CONNACK"
        if subscribe and not self.rc.is_failure:
            assert self.subscribed.wait(10), "no SUBACK"

    def _on_connect(self, client, userdata, flags, rc, props) -> None:
        self.rc = rc
        self.connack.set()
        if not rc.is_failure and self._subscribe:
            client.subscribe([(t, 1) for t in self._subscribe])

    def _on_subscribe(self, client, userdata, mid, rcs, props) -> None:
        self.suback = [rc.value for rc in rcs]
        self.subscribed.set()

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def seen(self, prefix: str = "") -> list[tuple[str, bytes]]:
        with self.lock:
            return [(t, p) for t, p in self.messages if t.startswith(prefix)]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)  # PUBACK: for a denied publish too (MQTT 3.1.1 has no negative ack)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def raw_connack(port: int, ca: str | None, client_id: str, user: str | None = None,
                password: str | None = None) -> int:
    """Send one MQTT 3.1.1 CONNECT (over TLS if ``ca``) and return the CONNACK return code.

    Read off the wire, not through paho, which maps 3.1.1 codes onto MQTT 5 reason codes.
    """
    def text(s: str) -> bytes:
        raw = s.encode()
        return len(raw).to_bytes(2, "big") + raw

    flags = 0x02 | (0x80 if user is not None else 0) | (0x40 if password is not None else 0)
    body = text("MQTT") + bytes([4, flags]) + (15).to_bytes(2, "big") + text(client_id)
    body += (text(user) if user is not None else b"") + (text(password) if password is not None else b"")
    assert len(body) < 128
    packet = bytes([0x10, len(body)]) + body
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if ca is not None:
        sock = ssl.create_default_context(cafile=ca).wrap_socket(sock, server_hostname="127.0.0.1")
    with sock:
        sock.sendall(packet)
        reply = b""
        while len(reply) < 4:
            chunk = sock.recv(4 - len(reply))
            if not chunk:
                raise ConnectionError(f"closed after {reply!r}")
            reply += chunk
    assert reply[:2] == b"\x20\x02", reply
    return reply[3]


def forged_update(manifest: RoundManifest, device: str, update_id: str, value: float = 100.0,
                  num_samples: int = 1000) -> list[tuple[str, bytes]]:
    """A complete, digest-valid update for ``device`` in the manifest's round: what a
    forger with the device's topic rights could get counted."""
    codec = get_codec(manifest.update_codec)
    slices = shard_slices(manifest.num_params, manifest.shard_values)
    datas = [codec.encode(np.full(n, value, np.float32)) for _, n in slices]
    whole = update_digest(digest(d) for d in datas)
    out = []
    for i, ((off, n), data) in enumerate(zip(slices, datas)):
        shard = UpdateShard(device=device, round_id=manifest.round_id, update_id=update_id,
                            base_version=manifest.model_version, index=i, count=len(slices), offset=off,
                            length=n, num_params=manifest.num_params, codec=codec.name,
                            num_samples=num_samples, digest=digest(data), update_digest=whole, data=data)
        out.append((TOPICS.up(device, manifest.round_id, update_id, i), encode(shard)))
    return out


def federation(s: Setup, n: int = 4, **kw) -> LocalFederation:
    policy = kw.pop("policy", RoundPolicy(rounds=1, target=n, quorum=n, min_devices=n, round_timeout=60.0))
    users = {u: s.users[u] for u in ["coordinator", *DEVICES[:n]]}
    fed = LocalFederation(s.broker.url, users, n_devices=n, seed=3, policy=policy, ca_file=s.ca, **kw)
    return fed


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
    finally:
        fed.stop()
        snoop.close()
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
        c = Client(port, user, users[user], ca=ca, subscribe=topics)
        wait_until(lambda: len({t for t, _ in c.seen()}) >= len(topics), 10, f"retained {topics}")
        time.sleep(0.2)  # anything else retained under these filters arrives in the same burst
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
    time.sleep(0.3)
    dev0.close()
    assert dev0.seen() == []  # no forged retained receipt for dev-0


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
        wait_until(lambda: coordinator.seen(), 10, "dev-0's own shard")
        time.sleep(0.2)
        assert coordinator.seen() == [(TOPICS.up("dev-0", 1, "u", 0), b"as dev-0")]
        device.close()
        coordinator.close()
        # A password alone no longer opens the TLS listener.
        with pytest.raises((ConnectionError, OSError)):
            raw_connack(port, ca, "dev-0", "dev-0", s.users["dev-0"])


@needs_mosquitto
@pytest.mark.broker
def test_mqtt_link_writes_its_tls_socket_only_from_its_own_thread(secured, monkeypatch):
    from fedsync.mqtt import Credentials, MqttLink

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


# -- amqtt: what its ACL can do, and its documented limits ---------------------------------

AMQTT_USERS = {"coordinator": "c-secret", "monitor": "m-secret",
               **{d: f"{d}-secret" for d in DEVICES}}


@pytest.fixture
def amqtt_acl() -> Iterator[BrokerProcess]:
    broker = BrokerProcess("amqtt", users=AMQTT_USERS, federation_acl="demo")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.broker
def test_amqtt_with_the_acl_runs_a_full_round(amqtt_acl):
    # Proves the ACL grants everything the real coordinator and agents use (amqtt refuses a
    # denied SUBSCRIBE with 0x80, so a missing grant would stall the round).
    users = {u: AMQTT_USERS[u] for u in ["coordinator", *DEVICES[:3]]}
    fed = LocalFederation(amqtt_acl.url, users, n_devices=3, seed=3,
                          policy=RoundPolicy(rounds=1, target=3, quorum=3, min_devices=3, round_timeout=60.0))
    s = run_federation(fed, 30)
    assert (s["rounds_completed"], s["updates_accepted"], s["duplicates_dropped"], s["shards_rejected"]) == (1, 3, 0, 0)


@pytest.mark.broker
def test_amqtt_acl_refuses_foreign_client_ids_topics_and_subscriptions(amqtt_acl):
    port = amqtt_acl.port
    assert raw_connack(port, None, "dev-0", "dev-1", AMQTT_USERS["dev-1"]) == 5  # client id != user
    assert raw_connack(port, None, "dev-1", "dev-1", AMQTT_USERS["dev-1"]) == 0
    coordinator = Client(port, "coordinator", AMQTT_USERS["coordinator"], subscribe=(TOPICS.up_filter,))
    assert coordinator.suback == [1]
    dev1 = Client(port, "dev-1", AMQTT_USERS["dev-1"],
                  subscribe=(TOPICS.up_filter, TOPICS.ack("dev-0"), TOPICS.manifest))
    assert dev1.suback == [0x80, 0x80, 1]  # others' updates and receipts: refused; the manifest: granted
    dev1.publish(TOPICS.up("dev-0", 1, "uforged", 0), b"forged")
    dev1.publish(TOPICS.manifest, b"fake", retain=True)
    dev1.publish(TOPICS.up("dev-1", 1, "uctl", 0), b"control")
    wait_until(lambda: coordinator.seen(TOPICS.root + "/up/dev-1/"), 10, "the control")
    time.sleep(0.2)
    assert coordinator.seen(TOPICS.root + "/up/dev-0/") == []
    assert dev1.seen(TOPICS.manifest) == []  # the fake manifest was neither delivered nor retained
    dev1.close()
    coordinator.close()
    late = Client(port, "dev-2", AMQTT_USERS["dev-2"], subscribe=(TOPICS.manifest,))
    time.sleep(0.3)
    late.close()
    assert late.seen(TOPICS.manifest) == []


@pytest.mark.broker
def test_amqtt_limit_retained_receipts_reach_devices_that_never_subscribed(amqtt_acl):
    """Documented limit (docs/security.md): pins amqtt 0.12.1's behaviour, so an upgrade
    that fixes it fails here and the docs get updated."""
    port = amqtt_acl.port
    dev0 = Client(port, "dev-0", AMQTT_USERS["dev-0"], subscribe=(TOPICS.ack("dev-0"),))
    coordinator = Client(port, "coordinator", AMQTT_USERS["coordinator"])
    coordinator.publish(TOPICS.ack("dev-0"), b"receipt for dev-0", retain=True)
    wait_until(lambda: dev0.seen(), 10, "dev-0's receipt")
    dev1 = Client(port, "dev-1", AMQTT_USERS["dev-1"])  # subscribes to nothing at all
    wait_until(lambda: dev1.seen(), 5, "the leak")
    assert dev1.seen() == [(TOPICS.ack("dev-0"), b"receipt for dev-0")]
    for c in (dev0, coordinator, dev1):
        c.close()


@pytest.mark.broker
def test_amqtt_limit_a_wrong_password_connect_deletes_the_devices_subscriptions(amqtt_acl):
    """Documented limit: amqtt acts on clean_session before authenticating, so anyone who
    can reach the broker and knows a device id silently cuts that device off its receipts."""
    port = amqtt_acl.port
    dev0 = Client(port, "dev-0", AMQTT_USERS["dev-0"], subscribe=(TOPICS.ack("dev-0"),))
    coordinator = Client(port, "coordinator", AMQTT_USERS["coordinator"])
    coordinator.publish(TOPICS.ack("dev-0"), b"first", retain=True)
    wait_until(lambda: dev0.seen(), 10, "the first receipt")
    assert raw_connack(port, None, "dev-0", "dev-0", "wrong password") == 5
    coordinator.publish(TOPICS.ack("dev-0"), b"second", retain=True)
    time.sleep(0.5)
    assert dev0.client.is_connected()
    assert dev0.seen() == [(TOPICS.ack("dev-0"), b"first")]  # "second" never arrives
    for c in (dev0, coordinator):
        c.close()


# -- the rendered files ------------------------------------------------------------------------

def _render(tmp_path: Path, *extra: str, devices: tuple[str, ...] = ("dev-0", "dev-1")) -> Path:
    listing = tmp_path / "devices.txt"
    listing.write_text("\n".join(devices) + "\n")
    out = tmp_path / "broker"
    assert render_main(["mosquitto", "--devices", str(listing), "--out", str(out), "--host", "broker.example",
                        *extra]) == 0
    return out


def test_rendered_config_has_tls_acl_and_limits(tmp_path, capsys):
    out = _render(tmp_path, "--max-shard-bytes", "1048576", "--shards-per-update", "40", "--plain-port", "1883")
    lines = [line for line in (out / "mosquitto.conf").read_text().splitlines() if line and not line.startswith("#")]
    home = out.resolve()
    limits = size_limits(["dev-0", "dev-1"], 1 << 20, 40)
    assert lines == [
        "listener 8883 0.0.0.0", f"cafile {home}/ca.pem", f"certfile {home}/server.pem",
        f"keyfile {home}/server.key", "tls_version tlsv1.2", "require_certificate false",
        "use_username_as_clientid true",
        "listener 1883 127.0.0.1", "use_username_as_clientid true",
        "persistence true", f"persistence_location {home}/data/", "autosave_interval 60",
        "allow_anonymous false", f"password_file {home}/passwd", f"acl_file {home}/acl",
        f"max_packet_size {limits.max_packet_size}", "max_queued_messages 1000",
        f"max_queued_bytes {1 << 30}", "max_inflight_messages 100", "log_dest stderr",
        "persistent_client_expiration 30d",
    ]
    assert "wrote" in capsys.readouterr().out
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert modes["secrets"] == 0o700 and all(modes[f"secrets/{u}.pw"] == 0o600
                                            for u in ("coordinator", "monitor", "dev-0", "dev-1"))
    assert modes["ca.key"] == modes["server.key"] == modes["passwd"] == modes["acl"] == 0o600
    assert (out / "acl").read_text() == acl_mod.mosquitto_acl("demo", ["dev-0", "dev-1"])
    passwd_users = [line.split(":")[0] for line in (out / "passwd").read_text().splitlines()]
    assert passwd_users == ["coordinator", "monitor", "dev-0", "dev-1"]
    assert all(":$7$" in line for line in (out / "passwd").read_text().splitlines())  # hashed, never plain


def test_rerendering_keeps_passwords_and_the_ca_rotates_on_request_and_drops_removed_devices(tmp_path):
    out = _render(tmp_path)
    first = {p.name: p.read_text() for p in (out / "secrets").iterdir()}
    ca = (out / "ca.pem").read_bytes()
    _render(tmp_path, devices=("dev-0", "dev-2"))
    second = {p.name: p.read_text() for p in (out / "secrets").iterdir()}
    assert sorted(second) == ["coordinator.pw", "dev-0.pw", "dev-2.pw", "monitor.pw"]
    assert second["dev-0.pw"] == first["dev-0.pw"] and (out / "ca.pem").read_bytes() == ca
    _render(tmp_path, "--rotate-passwords", devices=("dev-0", "dev-2"))
    assert (out / "secrets" / "dev-0.pw").read_text() != first["dev-0.pw"]


def test_render_makes_signing_keys_on_request(tmp_path):
    from fedsync.signing import Ed25519Signer, Ed25519Verifier, load_device_keys, signing_message

    out = _render(tmp_path, "--signing", "ed25519")
    verifier = Ed25519Verifier(load_device_keys(out / "signing" / "coordinator.keys", secret=False))
    own = load_device_keys(out / "signing" / "devices" / "dev-1.key")
    msg = signing_message("demo", "dev-1", 1, "u1", bytes(16), 5)
    assert verifier.verify("dev-1", msg, Ed25519Signer(own["dev-1"]).sign(msg))
    assert not verifier.verify("dev-0", msg, Ed25519Signer(own["dev-1"]).sign(msg))


def test_render_with_an_existing_ca_and_client_certificates(tmp_path):
    ca = make_ca("corporate CA")
    ca.write(tmp_path / "corp.pem", tmp_path / "corp.key")
    out = _render(tmp_path, "--ca-cert", str(tmp_path / "corp.pem"), "--ca-key", str(tmp_path / "corp.key"),
                  "--client-certs")
    assert not (out / "ca.key").exists()  # the CA key stays where the operator keeps it
    assert (out / "ca.pem").read_bytes() == ca.cert_pem()
    from cryptography import x509

    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca.cert)
    client = x509.load_pem_x509_certificate((out / "clients" / "dev-1.pem").read_bytes())
    client.verify_directly_issued_by(ca.cert)
    assert client.subject.rfc4514_string() == "CN=dev-1"
    conf = (out / "mosquitto.conf").read_text().splitlines()
    assert "require_certificate true" in conf and "use_identity_as_username true" in conf


@pytest.mark.parametrize("devices, message", [
    (("dev-0", "dev-0"), "twice"), (("coordinator",), "reserved"), (("monitor",), "reserved"),
    (("dev/0",), "must match"),
])
def test_render_refuses_bad_device_lists(tmp_path, capsys, devices, message):
    listing = tmp_path / "devices.txt"
    listing.write_text("\n".join(devices) + "\n")
    assert render_main(["mosquitto", "--devices", str(listing), "--out", str(tmp_path / "o")]) == 1
    assert message in capsys.readouterr().err


def test_max_packet_size_is_twice_the_worst_case_packet_the_wire_format_makes():
    # The largest UpdateShard the schema allows around N bytes of data (64-char ids, 32
    # metrics, every integer at its maximum): its envelope must fit CBOR_ENVELOPE.
    n = 1 << 18
    worst = UpdateShard(device="d" * 64, round_id=2**53, update_id="u" * 64, base_version=2**53,
                        index=MAX_SHARDS - 1, count=MAX_SHARDS, offset=MAX_PARAMS - n, length=n,
                        num_params=MAX_PARAMS, codec="c" * 32, num_samples=1 << 40, digest=bytes(16),
                        update_digest=bytes(16), data=bytes(zstd_bound(n)),
                        metrics={f"k{i:031d}": 1.5e300 for i in range(32)})
    assert len(encode(worst)) - zstd_bound(n) <= CBOR_ENVELOPE
    # zstd's bound really is the worst case for incompressible floats
    noise = np.random.default_rng(0).standard_normal(n // 4).astype(np.float32)
    assert len(get_codec("zstd").encode(noise)) <= zstd_bound(n)
    limits = size_limits([f"d{i}" for i in range(500)], n, 16)
    topic = TOPICS.up("d" * 64, 2**53, "u" * 64, MAX_SHARDS - 1)
    assert limits.max_packet_size >= 2 * (len(encode(worst)) + len(topic) + 9)
    assert limits.max_queued_messages == 2 * 500 * 16


def test_server_certificate_names_the_hosts_and_loopback():
    ca = make_ca()
    server = issue_server(ca, ["broker.example", "10.1.2.3"])
    assert sans(server) == ["broker.example", "localhost", "10.1.2.3", "127.0.0.1"]
    assert server.cert.not_valid_after_utc <= ca.cert.not_valid_after_utc


def test_amqtt_acl_is_the_same_table_as_the_mosquitto_acl():
    table = acl_mod.amqtt_acl("demo", ["dev-0"])
    assert json.loads(json.dumps(table)) == table
    assert table["publish-acl"]["coordinator"] == ["fedsync/+/manifest", "fedsync/+/model/#", "fedsync/+/modeldelta/#",
                                                   "fedsync/+/ack/+", "fedsync/+/coordinator/status",
                                                   "fedsync/+/coordinator/probe"]
    assert table["subscribe-acl"]["coordinator"] == ["fedsync/+/up/#", "fedsync/+/status/+",
                                                     "fedsync/+/coordinator/status", "fedsync/+/coordinator/probe"]
    assert table["subscribe-acl"]["dev-0"] == ["fedsync/demo/manifest", "fedsync/demo/model/#",
                                               "fedsync/demo/modeldelta/#", "fedsync/demo/ack/dev-0",
                                               "fedsync/demo/coordinator/status"]
    assert table["publish-acl"]["monitor"] == []  # read-only
    mosq = acl_mod.mosquitto_acl("demo", ["dev-0"])
    assert not [line for line in mosq.splitlines() if line.startswith("pattern")]
    block = mosq.split("user dev-0\n", 1)[1].splitlines()
    assert block == ["topic read fedsync/demo/manifest", "topic read fedsync/demo/model/#",
                     "topic read fedsync/demo/modeldelta/#", "topic write fedsync/demo/up/dev-0/#",
                     "topic read fedsync/demo/ack/dev-0", "topic write fedsync/demo/status/dev-0",
                     "topic read fedsync/demo/coordinator/status"]


# -- UpdateScreen --------------------------------------------------------------------------------

def test_update_screen_accepts_in_bounds_and_names_each_violation():
    screen = UpdateScreen(max_norm=5.0, max_num_samples=100)
    three_four = np.array([3.0, 4.0], np.float32)  # norm exactly 5: the bound is inclusive
    assert screen.check(three_four, 100) is None
    assert screen.check(three_four * 1.001, 1) == "norm_bound"
    assert screen.check(three_four, 101) == "num_samples_bound"
    assert screen.check(three_four, 0) == "num_samples_bound"
    assert screen.check(three_four, True) == "num_samples_bound"
    assert screen.check(three_four, np.int64(7)) is None
    assert screen.check(np.array([np.inf, 0], np.float32), 1) == "not_finite"
    assert screen.check(np.array([np.nan, 0], np.float32), 10**9) == "not_finite"  # first reason wins
    assert screen.check(np.array(["a"]), 1) == "not_finite"
    assert screen(three_four, 100) is None  # callable: the core's screen hook


def test_update_screen_without_a_norm_bound_and_huge_finite_values():
    # float32 squares of 1e20 overflow; the norm is accumulated in float64.
    big = np.full(1000, 1e20, np.float32)
    assert UpdateScreen().check(big, 1) is None
    assert UpdateScreen(max_norm=1e21).check(big, 1) == "norm_bound"  # norm ~3.2e21
    assert UpdateScreen(max_norm=1e22).check(big, 1) is None
    assert UpdateScreen(max_norm=1e22).norm(big) == pytest.approx(np.sqrt(1000) * 1e20, rel=1e-6)
    assert UpdateScreen().check(np.zeros(3, np.float32), 10_000_000) is None
    assert UpdateScreen().check(np.zeros(3, np.float32), 10_000_001) == "num_samples_bound"


@pytest.mark.parametrize("kwargs", [dict(max_norm=0.0), dict(max_norm=-1.0), dict(max_norm=float("nan")),
                                    dict(max_norm=float("inf")), dict(max_num_samples=0),
                                    dict(max_num_samples=1.5)])
def test_update_screen_refuses_meaningless_bounds(kwargs):
    with pytest.raises(ValueError):
        UpdateScreen(**kwargs)
