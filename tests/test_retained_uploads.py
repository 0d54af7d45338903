"""Issue 12: devices cannot park data on the broker, and a flood cannot push shards out unnoticed.

1. Agents never set the retain flag on an upload (in-memory federation, every publish seen).
2. CLI level, rendered TLS + ACL mosquitto: a registered device publishes 60 retained
   100 KB uploads mid-campaign. The coordinator ignores them (their live copies are junk and
   rejected as such; the retained copies are never counted), deletes every one
   (``retained_upload_cleared`` x 60, ``fedsync_retained_uploads_cleared_total`` 60), every
   round commits with 3 updates, and afterwards a fresh subscriber to ``up/#`` finds only
   the one retained upload published after the coordinator left (the positive control).
3. The rendered ``memory_limit`` caps what a retained flood can make mosquitto hold: with
   ``--max-queued-bytes 1048576`` the cap is ~80 MB, and a device publishing 300 retained
   500 KB messages (150 MB) with no coordinator to delete them is disconnected by the broker
   ("out of memory") with the broker's RSS growth and the retained bytes below the cap.
   The same deletion on amqtt and mosquitto, in process (20 retained uploads).
4. A flood that overflows the coordinator's broker queue (``max_queued_messages`` 20) drops
   honest shards too: the coordinator counts the gaps (``fedsync_shard_gaps_total``), the
   devices' resends fill every one, and every round commits with every device.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as paho
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedsync.actions import Publish
from fedsync.broker_config.process import BrokerProcess, free_port, mosquitto_available, render_mosquitto_conf
from fedsync.broker_config.render import size_limits
from fedsync.coordinator.core import RoundPolicy
from fedsync.lab.federation import LocalFederation
from tests.cli_procs import FEDSYNC, MOSQUITTO, Fleet
from tests.sim import Sim, offset_trainer
from tests.util import wait_until
from tests.cli_procs import broker_dir, fleet  # noqa: F401 (pytest fixtures)

needs_mosquitto = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")

DEVICES = ["pi-kitchen", "pi-garage", "pi-attic"]
FLOODER = "pi-flood"  # a registered device that runs no agent: a script with its credentials
ROUNDS = 4
PARKED = 60


def test_agents_never_publish_an_upload_retained():
    class RecordingSim(Sim):
        def run(self, client, actions):
            self.seen = getattr(self, "seen", []) + [(client, a) for a in actions if isinstance(a, Publish)]
            super().run(client, actions)

    devices = ["a", "b", "c"]
    sim = RecordingSim(devices, RoundPolicy(rounds=3, target=3, quorum=3, round_timeout=60.0, shard_values=4))
    sim.trainers = {d: offset_trainer(0.1 * (i + 1), 10) for i, d in enumerate(devices)}
    sim.start()
    sim.settle()
    assert [c.outcome for c in sim.closed()] == ["committed"] * 3
    uploads = [p for client, p in sim.seen if client != "coordinator" and "/up/" in p.topic]
    assert len(uploads) == 3 * 3 * 4  # 3 rounds x 3 devices x 4 shards (16 params in shards of 4)
    assert [p for p in uploads if p.retain] == []


class Flooder:
    """A paho client logged in with a device's credentials that publishes what it is told, QoS 1."""

    def __init__(self, port: int, user: str, password: str, ca_file: str | None = None,
                 client_id: str | None = None) -> None:
        self.acked = 0
        self.disconnected = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or user)
        self.client.username_pw_set(user, password)
        if ca_file:
            self.client.tls_set(ca_certs=ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.max_inflight_messages_set(64)
        self.client.on_publish = lambda *a: setattr(self, "acked", self.acked + 1)
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _retained_under(port: int, user: str, password: str, topic_filter: str, ca_file: str) -> dict[str, int]:
    """Topic -> payload size of every retained message under ``topic_filter`` (a fresh clean session)."""
    got: dict[str, int] = {}
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=user, clean_session=True)
    c.username_pw_set(user, password)
    c.tls_set(ca_certs=ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    c.on_message = lambda client, userdata, msg: got.__setitem__(msg.topic, len(msg.payload)) if msg.retain else None
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    try:
        c.subscribe(topic_filter, 1)
        assert subscribed.wait(10)
        # Then a message to itself on a topic it may use: it comes back after the retained ones.
        marker = threading.Event()
        c.subscribe("fedsync/demo/coordinator/probe", 1)
        c.message_callback_add("fedsync/demo/coordinator/probe", lambda *a: marker.set())
        time.sleep(0.2)
        c.publish("fedsync/demo/coordinator/probe", b"inspector", qos=1)
        assert marker.wait(10)
    finally:
        c.loop_stop()
        c.disconnect()
    return got




def _render(fleet: Fleet, broker_dir: Path, tmp_path: Path, port: int, *extra: str) -> None:
    (tmp_path / "devices.txt").write_text("".join(f"{d}\n" for d in [*DEVICES, FLOODER]))
    code, _, err = fleet.run("broker-config", [
        FEDSYNC, "broker-config", "mosquitto", "--devices", str(tmp_path / "devices.txt"), "--out", str(broker_dir),
        "--host", "127.0.0.1", "--bind", "127.0.0.1", "--port", str(port), *extra])
    assert code == 0, err


def _password(broker_dir: Path, user: str) -> str:
    return (broker_dir / "secrets" / f"{user}.pw").read_text().strip()


def _scrape(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


@needs_mosquitto
def test_a_device_flooding_retained_uploads_is_ignored_and_cleared_and_every_round_commits(
        fleet: Fleet, broker_dir: Path, tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    _render(fleet, broker_dir, tmp_path, port)
    broker = fleet.start("mosquitto", [MOSQUITTO, "-c", str(broker_dir / "mosquitto.conf")])
    fleet.wait_for("mosquitto to run", lambda: " running" in broker.text(), 15, needs=[broker])
    ca = str(broker_dir / "ca.pem")
    tls = ["--broker", f"mqtts://127.0.0.1:{port}", "--ca-file", ca]
    (tmp_path / "coordinator.toml").write_text("[round]\nshard_values = 160\n\n[hardening]\nnorm_multiple = 0.0\n")
    coordinator = fleet.start("coordinator", [
        FEDSYNC, "coordinator", *tls, "--password-file", str(broker_dir / "secrets" / "coordinator.pw"),
        "--rounds", str(ROUNDS), "--target", "3", "--quorum", "3", "--min-devices", "3", "--round-timeout", "30",
        "--metrics-port", str(metrics_port), "--config", str(tmp_path / "coordinator.toml")])
    agents = []
    for i, d in enumerate(DEVICES):
        (tmp_path / f"{d}.toml").write_text("[agent]\nresend_after = 3.0\ntrain_delay = 1.0\n")
        agents.append(fleet.start(f"agent-{d}", [
            FEDSYNC, "agent", *tls, "--password-file", str(broker_dir / "secrets" / f"{d}.pw"), "--device-id", d,
            "--data-index", str(i), "--config", str(tmp_path / f"{d}.toml")]))
    everyone = [broker, coordinator, *agents]

    with fleet.phase(f"a device parks {PARKED} retained uploads in round 2", "coordinator", "mosquitto"):
        fleet.wait_for("round 1 to commit", lambda: coordinator.events("round_committed", round=1), 60,
                       needs=everyone)
        flooder = Flooder(port, FLOODER, _password(broker_dir, FLOODER), ca)
        try:
            for i in range(PARKED):
                # 0xff opens no CBOR item: the live copies are rejected as `cbor`.
                flooder.publish(f"fedsync/demo/up/{FLOODER}/2/u{i}/0", b"\xff" + bytes([i % 251]) * 99_999,
                                retain=True)
            wait_until(lambda: flooder.acked == PARKED, 20, "the broker to take every retained upload")
        finally:
            flooder.close()

    with fleet.phase("the coordinator ignores and deletes every one; every round commits", "coordinator"):
        fleet.wait_for(f"{PARKED} deletions", lambda: len(coordinator.events("retained_upload_cleared")) == PARKED,
                       60, needs=everyone)
        assert _scrape(metrics_port, "fedsync_retained_uploads_cleared_total") == PARKED
        assert coordinator.wait(ROUNDS * 30) == 0
        commits = coordinator.events("round_committed")
        assert [(c.int("round"), c.int("accepted")) for c in commits] == [(r, 3) for r in range(1, ROUNDS + 1)]
        assert coordinator.events("round_abandoned") == []
        parked = {e.fields["topic"] for e in coordinator.events("retained_upload_cleared")}
        assert parked == {f"fedsync/demo/up/{FLOODER}/2/u{i}/0" for i in range(PARKED)}  # each once
        # The live copies (forwarded as they were published) are junk, rejected as junk; the
        # deletions' echoes are not counted as anything.
        rejected = coordinator.events("input_rejected")
        assert len(rejected) == PARKED and {e.fields["reason"] for e in rejected} == {"cbor"}
        (stop,) = coordinator.events("coordinator_stop")
        assert stop.int("shards_rejected") == PARKED and stop.int("updates_accepted") == 3 * ROUNDS

    with fleet.phase("afterwards the broker retains no upload but the control", "mosquitto"):
        flooder = Flooder(port, FLOODER, _password(broker_dir, FLOODER), ca)
        try:
            flooder.publish(f"fedsync/demo/up/{FLOODER}/9/control/0", b"control", retain=True)
            wait_until(lambda: flooder.acked == 1, 10, "the control upload")
        finally:
            flooder.close()
        # The coordinator has exited: its account may look (only it may read up/#).
        found = _retained_under(port, "coordinator", _password(broker_dir, "coordinator"), "fedsync/demo/up/#", ca)
        assert found == {f"fedsync/demo/up/{FLOODER}/9/control/0": 7}


@pytest.mark.broker
def test_retained_uploads_are_deleted_on_either_broker_and_never_counted(broker, broker_users):
    """In process, on amqtt and on mosquitto: 20 retained uploads, 20 deleted, the rounds unaffected."""
    policy = RoundPolicy(rounds=3, target=3, quorum=3, min_devices=3, round_timeout=60.0)
    fed = LocalFederation(broker.url, broker_users, n_devices=3, seed=7, policy=policy,
                          train_delays={f"dev-{i}": 0.3 for i in range(3)})
    fed.start()
    try:
        wait_until(lambda: len(fed.records) >= 1, 60, "round 1")
        flooder = Flooder(broker.port, "dev-31", broker_users["dev-31"])
        try:
            for i in range(20):
                flooder.publish(f"fedsync/demo/up/dev-31/2/u{i}/0", b"\xff" * 1000, retain=True)
            wait_until(lambda: flooder.acked == 20, 20, "the broker to take every retained upload")
        finally:
            flooder.close()
        stats = fed.coordinator.broker_stats
        wait_until(lambda: stats.retained_uploads_cleared == 20, 30, "20 deletions")
        assert fed.wait(60)
        s = fed.summary()
    finally:
        fed.stop()
    assert (s["rounds_completed"], s["updates_accepted"]) == (3, 9)
    assert stats.retained_uploads_cleared == 20
    assert s["rejected_by_reason"].get("cbor") == 20  # the live copies, once each


@needs_mosquitto
def test_the_rendered_memory_limit_caps_what_a_retained_flood_can_make_mosquitto_hold(
        fleet: Fleet, broker_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    _render(fleet, broker_dir, tmp_path, port, "--max-queued-bytes", str(1 << 20))
    limit = size_limits([*DEVICES, FLOODER], 4 * 65536, 16, 1 << 20).memory_limit
    assert f"memory_limit {limit}" in (broker_dir / "mosquitto.conf").read_text().splitlines()
    broker = fleet.start("mosquitto", [MOSQUITTO, "-c", str(broker_dir / "mosquitto.conf")])
    fleet.wait_for("mosquitto to run", lambda: " running" in broker.text(), 15, needs=[broker])
    rss = psutil.Process(broker.pid)
    idle = rss.memory_info().rss
    flooder = Flooder(port, FLOODER, _password(broker_dir, FLOODER), str(broker_dir / "ca.pem"))
    peak = idle
    try:
        for i in range(300):
            if flooder.disconnected.is_set():
                break
            flooder.publish(f"fedsync/demo/up/{FLOODER}/1/u{i}/0", bytes([i % 251]) * 500_000, retain=True)
            peak = max(peak, rss.memory_info().rss)
        fleet.wait_for("the broker to disconnect the flooder", flooder.disconnected.is_set, 30, needs=[broker])
        peak = max(peak, rss.memory_info().rss)
    finally:
        flooder.close()
    assert f"Client {FLOODER} disconnected due to out of memory" in broker.text()
    print(f"memory_limit {limit}: idle RSS {idle}, peak RSS {peak}, {flooder.acked} retained uploads taken "
          f"({flooder.acked * 500_000} bytes)")
    assert 0 < flooder.acked < 300 and flooder.acked * 500_000 < limit
    # mosquitto counts the bytes it asks malloc for; RSS also holds malloc's own overhead (0.4% here).
    assert peak - idle < 1.05 * limit
    # A broker this full delivers nothing more: mosquitto drops what it cannot allocate and
    # disconnects the receiver, so the coordinator could not even be sent the parked uploads
    # to delete them. Hence the coordinator looks for them every 2 s (docs/security.md).


@pytest.mark.broker
def test_shards_lost_between_device_and_coordinator_are_seen_as_gaps_and_resends_fill_them(
        broker, broker_users):
    """Three of round 2's shards never reach the coordinator (dropped on their first send, as a
    broker drops a full queue's message after its PUBACK): it sees exactly those three as gaps,
    its receipts lack them, the devices re-send them, and all three are filled."""
    lost = {("dev-0", 1), ("dev-0", 3), ("dev-1", 2)}  # (device, shard index) of round 2
    dropped: list[tuple[str, int]] = []

    def hook(device: str, topic: str) -> bool:
        parts = topic.split("/")  # fedsync/demo/up/{device}/{round}/{update}/{shard}
        key = (device, int(parts[-1])) if parts[2] == "up" and parts[4] == "2" else None
        if key in lost and key not in dropped:
            dropped.append(key)
            return False
        return True

    policy = RoundPolicy(rounds=3, target=3, quorum=3, min_devices=3, round_timeout=60.0, shard_values=16)
    fed = LocalFederation(broker.url, broker_users, n_devices=3, seed=4, policy=policy, resend_after=5.0,
                          publish_hook=hook)
    from fedsync.coordinator.metrics import serve_metrics

    metrics = serve_metrics(fed.coordinator, port=0)
    fed.start()
    try:
        assert fed.wait(120), "rounds did not commit"
        gaps = fed.coordinator.watch.gaps
        scraped = (_scrape(metrics.port, "fedsync_shard_gaps_total"),
                   _scrape(metrics.port, "fedsync_shard_gaps_filled_total"))
        s = fed.summary()
    finally:
        metrics.stop()
        fed.stop()
    assert -(-fed.coordinator.core.vector.size // 16) > 4  # shard 3 is not the last: a later one shows the gap
    assert sorted(dropped) == sorted(lost)
    assert (s["rounds_completed"], s["rounds_abandoned"], s["updates_accepted"]) == (3, 0, 9)
    assert (gaps.gaps, gaps.filled) == (3, 3)
    assert scraped == (3, 3)
    # Re-sent after 5 s of silence: what the receipts lack, which is exactly the three lost.
    assert s["shards_resent"] == 3


def _sys_counter(port: int, user: str, password: str, topic: str, at_least: int, timeout: float) -> int:
    """mosquitto's own count under ``$SYS`` (published every ``sys_interval``) once it reaches
    ``at_least``, or its last value after ``timeout`` seconds."""
    seen: list[int] = []
    got = threading.Event()

    def on_message(client, userdata, msg):
        seen.append(int(msg.payload))
        if seen[-1] >= at_least:
            got.set()

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="sys-reader")
    c.username_pw_set(user, password)
    c.on_message = on_message
    c.on_connect = lambda client, *a: client.subscribe(topic, 0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        got.wait(timeout)
    finally:
        c.disconnect()
        c.loop_stop()
    return seen[-1] if seen else -1


@needs_mosquitto
def test_a_flood_that_overflows_the_coordinators_queue_loses_honest_shards_that_resends_restore(tmp_path):
    """A real overflow: mosquitto (20 in flight + 20 queued for the coordinator) drops what does
    not fit, honest shards among it, while three flooders publish. The broker's own drop count
    and the devices' resends show the loss; every update is still accepted once. (Whether a
    loss shows as a *gap* depends on arrival order; the test above makes gaps certain.)"""
    users = {"coordinator": "c-pw", "flood": "f-pw", **{f"dev-{i}": f"d{i}" for i in range(4)}}
    port = free_port()
    (tmp_path / "data").mkdir()
    from fedsync.broker_config.mosquitto import write_mosquitto_password_file

    write_mosquitto_password_file(tmp_path / "passwd", users)
    conf = render_mosquitto_conf(port, str(tmp_path / "data"), str(tmp_path / "passwd"), None,
                                 max_queued_messages=20,  # tmp_path is 0700: a root mosquitto stays root
                                 user="root" if os.geteuid() == 0 else None, extra_settings="sys_interval 1\n")
    (tmp_path / "mosquitto.conf").write_text(conf)
    policy = RoundPolicy(rounds=3, target=4, quorum=4, min_devices=4, round_timeout=60.0, shard_values=16)
    sent_round_2: dict[str, int] = {}  # round 2's shards each device has handed to paho
    stop, held, released = threading.Event(), threading.Event(), threading.Event()

    def hook(device: str, topic: str) -> None:
        if "/up/" in topic and topic.split("/")[4] == "2":
            if not released.is_set():  # from round 2's first shard on (its manifest is out), once
                held.set()
            sent_round_2[device] = sent_round_2.get(device, 0) + 1

    with BrokerProcess("mosquitto", config_file=tmp_path / "mosquitto.conf") as broker:
        fed = LocalFederation(broker.url, users, n_devices=4, seed=4, policy=policy, resend_after=2.0,
                              train_delays={f"dev-{i}": 0.5 for i in range(4)}, publish_hook=hook)
        fed.start()
        try:
            wait_until(lambda: len(fed.records) >= 1, 60, "round 1")
            dropped_before = _sys_counter(port, "flood", users["flood"], "$SYS/broker/publish/messages/dropped",
                                          0, 10)

            def flood(n: int) -> None:
                f = Flooder(port, "flood", users["flood"], client_id=f"flood-{n}")
                try:
                    i = 0
                    while not stop.is_set() and i < 20_000:
                        f.publish(f"fedsync/demo/up/flood/2/f{n}x{i}/0", b"x" * 512, retain=False)
                        i += 1
                        if i % 500 == 0:
                            time.sleep(0.001)
                finally:
                    f.close()

            # The coordinator's message handler (on paho's thread, so no PUBACKs) is held from
            # round 2's first shard until the broker has acknowledged every device publish of
            # round 2: all of round 2 then met a queue that takes at most 40 messages.
            link = fed.coordinator.link
            handle = link._on_message

            def held_handler(topic, payload, token):
                while held.is_set():
                    time.sleep(0.005)
                handle(topic, payload, token)

            link._on_message = held_handler
            threads = [threading.Thread(target=flood, args=(n,)) for n in range(3)]
            for t in threads:
                t.start()
            shards = -(-fed.coordinator.core.vector.size // policy.shard_values)
            wait_until(lambda: len(sent_round_2) == 4 and min(sent_round_2.values()) >= shards, 60,
                       "round 2's uploads, all sent")
            links = [fed.hosts[f"dev-{i}"].devices[f"dev-{i}"].link for i in range(4)]
            wait_until(lambda: all(lk.published_ok >= lk.published for lk in links), 60,
                       "the broker's PUBACKs for round 2's uploads")
            released.set()
            held.clear()
            assert fed.wait(120), "rounds did not commit under the flood"
            stop.set()
            for t in threads:
                t.join(30)
            lost_at_least = 4 * shards - 40  # round 2's honest shards beyond what the queue could take
            dropped = _sys_counter(port, "flood", users["flood"], "$SYS/broker/publish/messages/dropped",
                                   dropped_before + lost_at_least, 20)
            watch = fed.coordinator.watch
            s = fed.summary()
        finally:
            released.set()  # a failed wait must not leave paho's thread held (fed.stop would hang)
            held.clear()
            stop.set()
            fed.stop()
    print(f"shards {shards}, dropped by mosquitto {dropped - dropped_before}, resent {s['shards_resent']}, "
          f"gaps {watch.gaps.gaps}, filled {watch.gaps.filled}")
    assert lost_at_least > 0
    assert (s["rounds_completed"], s["rounds_abandoned"], s["updates_accepted"]) == (3, 0, 12)
    assert [r.accepted for r in fed.records] == [4, 4, 4]
    assert dropped - dropped_before >= lost_at_least
    assert s["shards_resent"] >= lost_at_least
    assert watch.gaps.filled == watch.gaps.gaps
