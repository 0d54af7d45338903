"""The security tests' broker and clients: a rendered mosquitto setup and a recording paho client.

Theory of operation
-------------------
:func:`rendered_broker` runs ``fedsync broker-config mosquitto`` (the CLI's own entry
point) into a fresh temporary directory, starts mosquitto with exactly that
configuration on 127.0.0.1 and yields a :class:`Setup` (the directory, the broker and
every account's generated password); on exit it stops the broker and removes the
directory, pass or fail. :class:`Client` is one plain paho connection (TLS when given a
CA) whose network thread appends every message it receives, under a lock, to
``messages``; tests read them with :meth:`Client.seen`, after :meth:`Client.settle` has
shown (a retained sentinel through the same connection) that whatever was to arrive has
arrived, so an empty result is an absence, not a slow broker. :func:`raw_connack` speaks one
MQTT 3.1.1 CONNECT off the wire, and :func:`forged_update` builds the complete,
digest-valid update a forger with a device's topic rights could send.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedsync.broker_config.process import BrokerProcess, free_port, mosquitto_available
from fedsync.broker_config.render import main as render_main
from fedsync.coordinator.core import RoundPolicy
from fedsync.lab.federation import LocalFederation
from fedsync.codecs import get_codec
from fedsync.messages import RoundManifest, UpdateShard, encode
from fedsync.params import digest, shard_slices, update_digest
from fedsync.topics import Topics
from tests.util import wait_until

needs_mosquitto = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
TOPICS = Topics("demo")
DEVICES = [f"dev-{i}" for i in range(5)]  # dev-0..dev-3 train; dev-4 is the registered device that attacks


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


class Client:
    """A plain paho client (TLS when ``ca`` is given) recording what it receives."""

    def __init__(self, port: int, user: str | None, password: str | None, *, ca: str | None = None,
                 client_id: str = "", subscribe: tuple[str, ...] = (), cert: Path | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.suback: list[int] = []
        self.subacks: dict[int, list[int]] = {}  # packet id -> granted QoS (0x80: refused), every SUBACK
        self.suback_at: dict[int, int] = {}  # packet id -> how many messages had arrived before its SUBACK
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
        with self.lock:
            self.subacks[mid] = [rc.value for rc in rcs]
            self.suback_at[mid] = len(self.messages)
        self.suback = [rc.value for rc in rcs]
        self.subscribed.set()

    def subscribe(self, topic: str) -> list[int]:
        """One more SUBSCRIBE (QoS 1); wait for its SUBACK and return the granted codes."""
        return self.subacks[self._subscribe_mid(topic)]

    def _subscribe_mid(self, topic: str) -> int:
        _, mid = self.client.subscribe(topic, 1)
        wait_until(lambda: mid in self.subacks, 10, f"the SUBACK for {topic}")
        return mid

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def seen(self, prefix: str = "") -> list[tuple[str, bytes]]:
        with self.lock:
            return [(t, p) for t, p in self.messages if t.startswith(prefix)]

    def settle(self, sentinel: str) -> bytes:
        """Subscribe to ``sentinel``, a topic holding a retained message this client may read,
        and wait for that message (returned): then every retained message under this client's
        earlier filters has arrived too. Brokers take one client's SUBSCRIBEs in order and send
        each one's SUBACK, then its retained messages, before the next one's SUBACK: mosquitto
        queues them in that order; amqtt 0.12 even waits for their PUBACKs before it reads the
        next SUBSCRIBE. So the sentinel is the first message on its topic after its own SUBACK.

        Re-subscribing to a filter already held works too: MQTT 3.1.1 §3.8.4 re-sends its
        retained messages. A sentinel that never arrives fails the test (no SUBACK, or the
        broker does not deliver at all), so an absence checked after it means something."""
        mid = self._subscribe_mid(sentinel)

        def sentinel_payload() -> bytes | None:
            with self.lock:
                return next((p for t, p in self.messages[self.suback_at[mid]:] if t == sentinel), None)

        wait_until(lambda: sentinel_payload() is not None, 10, f"the retained sentinel {sentinel}")
        return sentinel_payload()  # type: ignore[return-value]

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
    whole = update_digest((digest(d) for d in datas), federation=manifest.federation, device=device,
                          round_id=manifest.round_id, update_id=update_id, base_version=manifest.model_version,
                          base_digest=manifest.model_digest)
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
