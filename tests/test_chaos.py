"""The chaos proxy, for real, on 127.0.0.1: each fault is named, injected and its outcome asserted.

Byte-level properties (pass-through, bandwidth, latency) run against small stdlib servers;
the MQTT scenarios run paho-mqtt clients through the proxy to a real broker
(``BrokerProcess``), and the last one a whole ``LocalFederation`` over a ``wifi-flaky`` link.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker_config.process import BrokerProcess, mosquitto_available
from coordinator.core import RoundPolicy
from coordinator.federation import LocalFederation
from fedsync.chaos import (PROFILES, ChaosProxy, LinkProfile, blackout_schedule, connection_streams,
                           fault_schedule, get_profile, main)

USERS = {"coordinator": "coordinator-secret", **{f"dev-{i}": f"dev-{i}-secret" for i in range(8)}}
FIELD_BROKER = "mosquitto" if mosquitto_available() else "amqtt"


# -- small upstream servers ----------------------------------------------------------------------

class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except ConnectionError:
            pass


def serve(handler: type[socketserver.BaseRequestHandler]) -> _Server:
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = serve(_Echo)
    try:
        yield server.server_address
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def field_broker() -> Iterator[BrokerProcess]:
    """mosquitto where installed (what the field runs), else the embedded amqtt."""
    with BrokerProcess(FIELD_BROKER, users=USERS) as broker:
        yield broker


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(65536, n - len(buf)))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


# -- bytes on the wire -----------------------------------------------------------------------------

def test_clean_profile_passes_bytes_unchanged_and_forwards_half_close(echo):
    payloads = [os.urandom(256 * 1024 + i) for i in range(3)]
    with ChaosProxy(None, echo, get_profile("clean"), seed=1) as proxy:
        socks = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10) for _ in payloads]
        senders = [threading.Thread(target=lambda s=s, p=p: (s.sendall(p), s.shutdown(socket.SHUT_WR)))
                   for s, p in zip(socks, payloads)]
        for t in senders:
            t.start()
        echoed = []
        for s in socks:
            buf = bytearray()
            while chunk := s.recv(65536):  # the echo server's FIN comes back through the proxy
                buf += chunk
            echoed.append(bytes(buf))
            s.close()
        for t in senders:
            t.join()
        wait_until(lambda: proxy.stats()["active"] == 0, 5, "connections to close")
        stats = proxy.stats()
    assert echoed == payloads
    total = sum(map(len, payloads))
    assert (stats["connections"], stats["bytes_up"], stats["bytes_down"]) == (3, total, total)
    assert stats["resets"] == stats["stalls"] == stats["blackout_drops"] == 0


class _SendAndSink(socketserver.BaseRequestHandler):
    """Upstream for the bandwidth test: sends N bytes down while timing the N bytes coming up."""

    n = 0
    up_rates: list[float] = []

    def handle(self) -> None:
        sender = threading.Thread(target=self.request.sendall, args=(bytes(self.n),))
        sender.start()
        self.up_rates.append(_timed_receive(self.request, self.n))
        sender.join()


def _timed_receive(sock: socket.socket, n: int) -> float:
    """Bytes/s from the first chunk's arrival to the last byte (the bucket's initial burst excluded)."""
    first = sock.recv(65536)
    t0, got = time.monotonic(), 0
    while got < n - len(first):
        chunk = sock.recv(65536)
        assert chunk
        got += len(chunk)
    return got / (time.monotonic() - t0)


def test_bandwidth_cap_holds_within_20_percent_in_each_direction():
    cap = 200_000
    _SendAndSink.n, _SendAndSink.up_rates = 220_000, []  # ~1 s at the cap, both directions at once
    server = serve(_SendAndSink)
    try:
        with ChaosProxy(None, server.server_address, LinkProfile(bandwidth_bytes_per_s=cap), seed=1) as proxy:
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            sender = threading.Thread(target=s.sendall, args=(bytes(_SendAndSink.n),))
            sender.start()
            down = _timed_receive(s, _SendAndSink.n)
            sender.join()
            wait_until(lambda: _SendAndSink.up_rates, 5, "the upstream's measurement")
            s.close()
    finally:
        server.shutdown()
        server.server_close()
    up = _SendAndSink.up_rates[0]
    print(f"bandwidth cap {cap} B/s: measured down {down:.0f} B/s ({down / cap - 1:+.1%}), "
          f"up {up:.0f} B/s ({up / cap - 1:+.1%})")
    assert 0.8 * cap <= down <= 1.2 * cap
    assert 0.8 * cap <= up <= 1.2 * cap


@pytest.mark.parametrize("latency_ms, jitter_ms", [(100, 0), (150, 50)])
def test_latency_adds_at_least_the_configured_delay(echo, latency_ms, jitter_ms):
    profile = LinkProfile(latency_ms=latency_ms, jitter_ms=jitter_ms)
    lowest = 2 * (latency_ms - jitter_ms) / 1000  # one delay each way
    highest = 2 * (latency_ms + jitter_ms) / 1000
    with ChaosProxy(None, echo, profile, seed=1) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        rtts = []
        for i in range(5):
            t0 = time.monotonic()
            s.sendall(b"ping %d" % i)
            assert recv_exactly(s, 6) == b"ping %d" % i
            rtts.append(time.monotonic() - t0)
    print(f"latency {latency_ms} +- {jitter_ms} ms: echo round trips {[round(r, 3) for r in rtts]} s")
    assert min(rtts) >= lowest, rtts
    assert max(rtts) <= highest + 0.1, rtts  # loopback and scheduling add little


def test_blackout_resets_open_connections_and_black_holes_or_refuses_new_ones(echo):
    with ChaosProxy(None, echo, get_profile("clean"), seed=1) as proxy:
        before = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        before.sendall(b"x")
        assert recv_exactly(before, 1) == b"x"
        assert proxy.blackout_now(1.0) == 1
        with pytest.raises(ConnectionResetError):
            before.recv(10)
        during = socket.create_connection(("127.0.0.1", proxy.port), timeout=0.4)  # accepted ...
        during.sendall(b"y")
        with pytest.raises(TimeoutError):
            during.recv(10)  # ... and answered by silence
        during.settimeout(2.0)
        with pytest.raises(ConnectionResetError):
            during.recv(10)  # until the blackout ends: then an RST
        after = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        after.sendall(b"z")
        assert recv_exactly(after, 1) == b"z"

        proxy.set_profile(LinkProfile(blackout_new="refuse"))
        proxy.blackout_now(5.0)
        refused_at = time.monotonic()
        refused = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        with pytest.raises(ConnectionResetError):
            refused.recv(10)
        assert time.monotonic() - refused_at < 1.0
        stats = proxy.stats()
        for s in (before, during, after, refused):
            s.close()
    assert (stats["blackouts"], stats["blackout_drops"], stats["connections"]) == (2, 4, 4)


# -- determinism --------------------------------------------------------------------------------------

def test_same_seed_gives_the_same_fault_and_blackout_schedule():
    def faults(profile, seed, index, n=50):
        return list(itertools.islice(fault_schedule(profile, connection_streams(seed, index)[0]), n))

    def blackouts(profile, seed, n=20):
        return list(itertools.islice(blackout_schedule(profile, random.Random(f"fedsync.chaos/{seed}/blackouts")), n))

    wifi, cell, dark = get_profile("wifi-flaky"), get_profile("cellular-3g"), get_profile("blackout")
    assert faults(wifi, 7, 3) == faults(wifi, 7, 3)
    assert faults(wifi, 7, 3) != faults(wifi, 8, 3)  # another seed
    assert faults(wifi, 7, 3) != faults(wifi, 7, 4)  # another connection
    assert faults(cell, 7, 3) == faults(cell, 7, 3)
    assert blackouts(dark, 7) == blackouts(dark, 7) != blackouts(dark, 8)
    assert faults(get_profile("clean"), 7, 3) == []
    # what the proxy will do to its k-th connection is exactly this generator's output
    proxy = ChaosProxy(None, ("127.0.0.1", 9), wifi, seed=7)
    assert proxy.planned_faults(3, 50) == faults(wifi, 7, 3)

    # the generator honours the profile: ~1 reset per 30 s, stalls of 2-5 s, blackouts 5-10 s every ~30 s
    many = faults(wifi, 1, 0, n=4000)
    resets = [f for f in many if f.kind == "reset"]
    stalls = [f for f in many if f.kind == "stall"]
    assert 25 <= many[-1].at / len(resets) <= 35
    assert all(2.0 <= f.duration <= 5.0 for f in stalls) and 60 <= many[-1].at / len(stalls) <= 120
    periods = blackouts(dark, 1, n=200)
    assert periods[0][0] == 3.0 and all(5.0 <= d <= 10.0 for _, d in periods)
    gaps = [b[0] - (a[0] + a[1]) for a, b in zip(periods, periods[1:])]
    assert all(24.0 <= g <= 36.0 for g in gaps)


# -- MQTT through the proxy ---------------------------------------------------------------------------

class Probe:
    """A paho client (VERSION2) recording connects, disconnects and messages."""

    def __init__(self, user: str, host: str, port: int, *, clean_session: bool = True, keepalive: int = 15,
                 will: tuple[str, bytes] | None = None, subscribe: str | None = None) -> None:
        self.connects, self.disconnects = 0, 0
        self.disconnected_at: float | None = None
        self.received: list[tuple[str, bytes]] = []
        self.published: set[int] = set()
        self.subscribed = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=user, clean_session=clean_session,
                        protocol=paho.MQTTv311)
        c.username_pw_set(user, USERS[user])
        if will:
            c.will_set(will[0], will[1], qos=1)
        c.on_connect = lambda cl, u, f, rc, p: self._connected(cl, subscribe)
        c.on_disconnect = self._disconnected
        c.on_message = lambda cl, u, m: self.received.append((m.topic, bytes(m.payload)))
        c.on_publish = lambda cl, u, mid, rc, p: self.published.add(mid)
        c.on_subscribe = lambda *a: self.subscribed.set()
        self.client, self.host, self.port, self.keepalive = c, host, port, keepalive

    def _connected(self, client: paho.Client, topic: str | None) -> None:
        self.connects += 1
        if topic:
            client.subscribe(topic, 1)

    def _disconnected(self, *args) -> None:
        self.disconnects += 1  # paho may report one loss twice (keepalive check, then the loop)
        if self.disconnected_at is None:
            self.disconnected_at = time.monotonic()

    def start(self) -> Probe:
        """Background loop with paho's own reconnect (1 s, then doubling)."""
        self.client.reconnect_delay_set(1, 4)
        self.client.connect(self.host, self.port, self.keepalive)
        self.client.loop_start()
        wait_until(lambda: self.connects, 10, "CONNACK")
        return self

    def got(self, payload: bytes) -> int:
        return sum(1 for _, p in list(self.received) if p == payload)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.broker
def test_reset_all_makes_a_paho_client_reconnect_and_qos1_crosses_the_reset(broker_kind):
    with BrokerProcess(broker_kind, users=USERS) as broker, \
            ChaosProxy(None, (broker.host, broker.port), get_profile("clean"), seed=1) as proxy:
        watcher = Probe("dev-7", broker.host, broker.port, subscribe="chaos/up").start()
        device = Probe("dev-1", "127.0.0.1", proxy.port, clean_session=False, subscribe="chaos/down").start()
        try:
            assert watcher.subscribed.wait(5) and device.subscribed.wait(5)
            # Freeze the link, so both messages are in flight inside the proxy when it resets.
            assert proxy.stall_all(60) == 1
            device.client.publish("chaos/up", b"from-device", qos=1)
            watcher.client.publish("chaos/down", b"to-device", qos=1)
            time.sleep(0.5)
            assert (watcher.got(b"from-device"), device.got(b"to-device"), device.published) == (0, 0, set())

            assert proxy.reset_all() == 1  # RST both ways: the stalled bytes are gone
            wait_until(lambda: device.connects == 2, 10, "the device to reconnect")
            # paho re-sends its unacknowledged PUBLISH with DUP set
            wait_until(lambda: watcher.got(b"from-device") >= 1, 10, "the device's message across the reset")
            if broker_kind == "mosquitto":  # re-sends the session's unacknowledged PUBLISH on resume
                wait_until(lambda: device.got(b"to-device") >= 1, 10, "the broker's message across the reset")
            else:
                # amqtt 0.12.1 does not: a QoS 1 message in flight to a persistent session when the
                # link resets is lost (one queued while the client is away is delivered; docs/chaos.md).
                time.sleep(1.5)
                assert device.got(b"to-device") == 0
            stats = proxy.stats()
        finally:
            device.close()
            watcher.close()
    assert device.disconnects >= 1 and stats["resets"] == 1 and stats["connections"] == 2


@pytest.mark.broker
@pytest.mark.skipif(not mosquitto_available(), reason="amqtt never fires the will of a frozen peer (DESIGN.md)")
def test_stall_is_detected_by_keepalive_and_mosquitto_fires_the_will():
    keepalive = 2
    with BrokerProcess("mosquitto", users=USERS) as broker, \
            ChaosProxy(None, (broker.host, broker.port), get_profile("clean"), seed=1) as proxy:
        watcher = Probe("dev-7", broker.host, broker.port, subscribe="chaos/status/dev-2").start()
        # driven from this thread, not loop_start: once it notices the dead link it must stay
        # away, or its reconnect would take the session over and mask the broker's own detection
        device = Probe("dev-2", "127.0.0.1", proxy.port, keepalive=keepalive, will=("chaos/status/dev-2", b"offline"))
        try:
            assert watcher.subscribed.wait(5)
            device.client.connect("127.0.0.1", proxy.port, keepalive)

            def pump_until(predicate: Callable[[], bool], timeout: float) -> None:
                deadline = time.monotonic() + timeout
                while not predicate() and time.monotonic() < deadline:
                    device.client.loop(0.02)
                assert predicate()

            pump_until(lambda: device.connects == 1, 5)
            mid = device.client.publish("chaos/hello", b"x", qos=1).mid
            pump_until(lambda: mid in device.published, 5)  # last traffic both ways: now
            stalled_at = time.monotonic()
            proxy.stall_all(60)  # a half-open link: no bytes, no FIN, no RST
            pump_until(lambda: device.disconnects >= 1, 6 * keepalive)
            wait_until(lambda: watcher.got(b"offline"), 6 * keepalive, "the last will")
            will_at = time.monotonic()
        finally:
            device.client.disconnect()
            watcher.close()
    client_detect = device.disconnected_at - stalled_at
    will_detect = will_at - stalled_at
    print(f"stall, keepalive {keepalive} s: client noticed after {client_detect:.2f} s "
          f"({client_detect / keepalive:.2f}x), mosquitto fired the will after {will_detect:.2f} s "
          f"({will_detect / keepalive:.2f}x)")
    assert 1.5 * keepalive <= client_detect <= 4 * keepalive
    assert 1.5 * keepalive <= will_detect <= 4 * keepalive


@pytest.mark.broker
def test_wifi_flaky_federation_commits_rounds_and_counts_every_update_once(field_broker):
    # Devices reach the broker through the flaky link; the coordinator sits beside the broker.
    seed, profile = 61, get_profile("wifi-flaky")
    first_faults = [next(fault_schedule(profile, connection_streams(seed, k)[0])) for k in range(6)]
    assert sum(f.kind == "reset" and f.at < 2.0 for f in first_faults) == 3  # the seed makes resets come early
    policy = RoundPolicy(rounds=3, target=6, quorum=4, min_devices=4, round_timeout=20.0)
    resets_seen: list[int] = []
    with ChaosProxy(None, (field_broker.host, field_broker.port), profile, seed=seed) as proxy:
        fed = LocalFederation(proxy.url, USERS, n_devices=6, seed=seed, policy=policy, keepalive=5,
                              coordinator_url=field_broker.url,
                              resend_after=3.0, train_delays={f"dev-{i}": 0.3 for i in range(6)},
                              on_round=lambda rec: resets_seen.append(proxy.stats()["resets"]))
        fed.start()
        try:
            assert fed.wait(45), f"3 rounds did not commit: {fed.records} {proxy.stats()}"
            summary = fed.summary()
        finally:
            fed.stop()
        stats = proxy.stats()
    rounds = [(r.round_id, r.outcome, r.accepted, r.selected, round(r.seconds, 2)) for r in fed.records]
    print(f"wifi-flaky federation: rounds {rounds}, resets when each round closed {resets_seen}, "
          f"duplicates_dropped={summary['duplicates_dropped']}, rejected={summary['rejected_by_reason']}, "
          f"proxy={stats}")
    assert resets_seen[-1] >= 1  # links were reset while the rounds ran
    assert summary["rounds_completed"] == 3
    assert summary["updates_accepted"] == sum(r.accepted for r in fed.records)
    assert all(r.accepted <= r.selected for r in fed.records)
    # the proxy never corrupts bytes: the only rejects allowed are redeliveries into a closed round
    assert set(summary["rejected_by_reason"]) <= {"stale_round"}


# -- the CLI --------------------------------------------------------------------------------------------

def test_cli_forwards_and_prints_counters_on_exit(echo, capsys):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    listen = port.getsockname()[1]
    port.close()

    def client() -> None:
        deadline = time.monotonic() + 5
        while True:  # refused until the CLI listens; the first accepted connection is the real one
            try:
                s = socket.create_connection(("127.0.0.1", listen), timeout=5)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the CLI never listened"
                time.sleep(0.02)
        with s:
            s.sendall(b"hello")
            assert recv_exactly(s, 5) == b"hello"

    t = threading.Thread(target=client)
    t.start()
    rc = main(["--listen", f"127.0.0.1:{listen}", "--upstream", f"{echo[0]}:{echo[1]}", "--profile", "clean",
               "--seed", "1", "--duration", "1.5", "--log-level", "warning"])
    t.join()
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0].startswith(f"chaos_listening url=mqtt://127.0.0.1:{listen} ")
    assert out[-1].startswith("chaos_stats connections=1 ") and "bytes_up=5 bytes_down=5" in out[-1]


def test_the_proxy_never_listens_beyond_loopback(capsys):
    with pytest.raises(ValueError, match="loopback"):
        ChaosProxy(None, ("127.0.0.1", 1883), PROFILES["clean"], seed=0, listen_host="0.0.0.0")
    with pytest.raises(SystemExit) as exc:
        main(["--listen", "0.0.0.0:1884"])
    assert exc.value.code == 2 and "not a loopback IP address" in capsys.readouterr().err
    assert main(["--list-profiles"]) == 0
    assert "wifi-flaky" in capsys.readouterr().out
    with pytest.raises(ValueError, match="reset_prob_per_s"):
        LinkProfile(reset_prob_per_s=1.5)
