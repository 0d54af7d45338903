"""``fedsync broker-config mosquitto``: a ready, locked-down mosquitto setup for a federation.

Theory of operation
-------------------
From a list of device ids it writes one directory that a mosquitto 2.0 broker runs
from unchanged::

    DIR/
        mosquitto.conf      TLS listener, anonymous off, ACL, limits sized for the shards
        passwd              every account, hashed by mosquitto_passwd -U
        acl                 fedsync.broker_config.acl: who may publish/subscribe where
        secrets/USER.pw     one generated password per account (0600): hand each
                            device its own file, the coordinator and monitor theirs
        ca.pem              the CA devices trust (self-signed mode: made here)
        ca.key              the CA's key (self-signed mode; keep it off the broker)
        server.pem/.key     the broker's certificate (SANs: --host names, localhost, 127.0.0.1)
        clients/USER.pem/.key   with --client-certs: one client certificate per account
        signing/            with --signing: update-signing keys (fedsync.signing)
        data/               mosquitto persistence

Re-running keeps existing passwords (``--rotate-passwords`` makes new ones) and an
existing self-signed CA, so adding a device does not lock the others out; secrets of
accounts no longer listed are deleted. The server certificate is issued anew each time.

Sizes: ``max_packet_size`` is twice the largest packet the wire format can produce for
``--max-shard-bytes`` of shard data (zstd's worst-case expansion, the CBOR envelope at
its schema limits, the topic), because a packet over it disconnects the publisher
(MQTT 3.1.1 and 5 alike) and a device would then retry forever. ``max_queued_messages``
holds ``ROUNDS_IN_FLIGHT`` (2) rounds' worth of every device's shards for a slow
coordinator (docs/brokers.md: the default of 1000 lost 50-84% of acknowledged messages),
capped in bytes by ``max_queued_bytes``. ``memory_limit`` caps the broker's heap at that
queue plus three models (retained model, retained delta, one in transit), one packet and
a connection's buffers per account, and a base for mosquitto itself (docs/security.md
has the figures).
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedsync.atomic import write_atomic
from fedsync.broker_config import acl as acl_mod
from fedsync.broker_config.mosquitto import (find_program, mosquitto_account, render_mosquitto_conf,
                                             write_mosquitto_password_file)
from fedsync.topics import check_name

DEFAULT_SHARD_VALUES = 65536  # fedsync.coordinator.core.RoundPolicy.shard_values: float32 values per shard
MAX_WIRE_PAYLOAD = 32 * 1024 * 1024  # fedsync.messages.MAX_PAYLOAD: decoders refuse anything larger
# The CBOR envelope of one UpdateShard/ModelShard around its data, at the schema's limits:
# 64-char ids, 32-char codec, two 16-byte digests, 32 metrics with 32-char keys, every
# integer at its maximum. Measured at 1.8 KiB (tests/test_security_render.py checks it against the
# real encoder); 4 KiB leaves room for a signature and a few more fields.
CBOR_ENVELOPE = 4096
# PUBLISH packet around the payload: fixed header (<= 5), topic length (2), packet id (2)
# and the longest topic, fedsync/{64}/up/{64}/{16 digits}/{64}/{5 digits}.
MQTT_ENVELOPE = 512
# Manifest: everything but `selected` (param_spec at its 256-entry, 128-char limit included).
MANIFEST_BASE = 64 * 1024
PACKET_ROUNDING = 64 * 1024
DEFAULT_MAX_QUEUED_BYTES = 1 << 30
ROUNDS_IN_FLIGHT = 2  # rounds whose shards may sit in the coordinator's queue at once (a round and its resends)
MEMORY_BASE = 64 << 20  # mosquitto itself, its subscription tree, the retained manifest, receipts and statuses
PER_CONNECTION = 64 << 10  # a connection's socket and TLS buffers and its session
PASSWORD_BYTES = 24  # secrets.token_urlsafe(24): 32 characters, 192 bits


@dataclass(frozen=True, slots=True)
class Limits:
    largest_packet: int
    max_packet_size: int
    max_queued_messages: int
    max_queued_bytes: int
    memory_limit: int


def zstd_bound(n: int) -> int:
    """ZSTD_COMPRESSBOUND: the most zstd can grow ``n`` incompressible bytes."""
    return n + (n >> 8) + (((128 << 10) - n) >> 11 if n < (128 << 10) else 0)


def size_limits(devices: Sequence[str], max_shard_bytes: int, shards_per_update: int,
                max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES) -> Limits:
    """The broker limits for ``devices`` sending updates of ``shards_per_update`` shards.

    >>> size_limits(["dev-0"], 262144, 1).max_packet_size
    589824
    """
    if max_shard_bytes < 1 or shards_per_update < 1:
        raise ValueError("max_shard_bytes and shards_per_update must be >= 1")
    shard_payload = zstd_bound(max_shard_bytes) + CBOR_ENVELOPE
    if shard_payload > MAX_WIRE_PAYLOAD:
        raise ValueError(f"a {max_shard_bytes}-byte shard exceeds the wire format's {MAX_WIRE_PAYLOAD}-byte "
                         "payload limit; use smaller shards (RoundPolicy.shard_values)")
    manifest_payload = MANIFEST_BASE + sum(len(d) + 3 for d in devices)
    largest = max(shard_payload, manifest_payload) + MQTT_ENVELOPE
    packet = -(-2 * largest // PACKET_ROUNDING) * PACKET_ROUNDING
    queued = max(1000, ROUNDS_IN_FLIGHT * len(devices) * shards_per_update)
    queue_bytes = max_queued_bytes or queued * largest
    accounts = len(devices) + 2  # and the coordinator and the monitor
    memory = queue_bytes + 3 * shards_per_update * shard_payload + accounts * (packet + PER_CONNECTION) + MEMORY_BASE
    return Limits(largest, packet, queued, max_queued_bytes, memory)


@dataclass
class Setup:
    """Everything ``main`` parsed; ``render`` turns it into files."""

    out: Path
    devices: list[str]
    federation: str = "demo"
    port: int = 8883
    bind: str = "0.0.0.0"
    hosts: list[str] = field(default_factory=list)
    max_shard_bytes: int = 4 * DEFAULT_SHARD_VALUES
    shards_per_update: int = 16
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    ca_cert: Path | None = None
    ca_key: Path | None = None
    client_certs: bool = False
    plain_port: int | None = None
    install_dir: Path | None = None
    rotate_passwords: bool = False
    signing: str | None = None  # "hmac-sha256" | "ed25519": also make update-signing keys


def read_devices(path: str | os.PathLike[str]) -> list[str]:
    """Device ids from a file: one per line; blank lines and ``#`` comments ignored."""
    with open(path, encoding="utf-8") as f:
        names = [line.split("#", 1)[0].strip() for line in f]
    return acl_mod.check_devices([n for n in names if n])


def render(s: Setup) -> list[str]:
    """Write the setup into ``s.out``; return a summary, one line per item."""
    from fedsync.broker_config import tls

    out = s.out.resolve()
    home = (s.install_dir or out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o755)  # mosquitto (after dropping root) must reach its files in here
    users = [u for u, _ in acl_mod.users_and_roles(s.devices)]
    limits = size_limits(s.devices, s.max_shard_bytes, s.shards_per_update, s.max_queued_bytes)
    summary: list[str] = []

    passwords = _passwords(out / "secrets", users, s.rotate_passwords)
    summary.append(f"secrets/        {len(passwords)} password files (0600): coordinator, monitor, "
                   f"{len(s.devices)} device(s)")
    write_mosquitto_password_file(out / "passwd", passwords)
    summary.append("passwd          hashed by mosquitto_passwd -U")
    write_atomic(out / "acl", acl_mod.mosquitto_acl(s.federation, s.devices), mode=0o600)
    summary.append(f"acl             federation {s.federation!r}: coordinator, monitor (read-only), "
                   f"{len(s.devices)} device(s)")

    if s.ca_cert is not None:
        ca = tls.load_ca(s.ca_cert, s.ca_key)  # type: ignore[arg-type]
        write_atomic(out / "ca.pem", ca.cert_pem(), mode=0o644)
        summary.append(f"ca.pem          copied from {s.ca_cert} (its key stays where it is)")
    elif (out / "ca.pem").exists() and (out / "ca.key").exists():
        ca = tls.load_ca(out / "ca.pem", out / "ca.key")
        summary.append("ca.pem, ca.key  existing self-signed CA kept (devices keep trusting it)")
    else:
        ca = tls.make_ca(f"fedsync {s.federation} CA")
        ca.write(out / "ca.pem", out / "ca.key")
        summary.append("ca.pem, ca.key  new self-signed CA (move ca.key off the broker host)")
    server = tls.issue_server(ca, s.hosts)
    server.write(out / "server.pem", out / "server.key")
    summary.append(f"server.pem/.key certificate for {', '.join(tls.sans(server))}")
    if s.client_certs:
        (out / "clients").mkdir(mode=0o700, exist_ok=True)
        for user in users:
            tls.issue_client(ca, user).write(out / "clients" / f"{user}.pem", out / "clients" / f"{user}.key")
        summary.append(f"clients/        {len(users)} client certificates (CN = user)")

    if s.signing:
        from fedsync.signing import generate_device_keys

        written = generate_device_keys(out / "signing", s.devices, s.signing, rotate=s.rotate_passwords)
        summary.append(f"signing/        {s.signing} update-signing keys: coordinator.keys for the coordinator, "
                       f"devices/<id>.key for each device ({len(written) - 1} new)")

    data = out / "data"
    data.mkdir(mode=0o700, exist_ok=True)
    conf = render_mosquitto_conf(
        s.port, str(home / "data"), str(home / "passwd"), str(home / "acl"),
        max_packet_size=limits.max_packet_size, max_queued_messages=limits.max_queued_messages,
        max_queued_bytes=limits.max_queued_bytes, memory_limit=limits.memory_limit,
        listeners=_listeners(s, home), extra_settings=_extra_settings(limits))
    write_atomic(out / "mosquitto.conf", conf)
    summary.append(f"mosquitto.conf  TLS on {s.bind}:{s.port}"
                   + (f", plain on 127.0.0.1:{s.plain_port}" if s.plain_port else "")
                   + f"; max_packet_size {limits.max_packet_size}, max_queued_messages "
                     f"{limits.max_queued_messages}, max_queued_bytes {limits.max_queued_bytes}, "
                     f"memory_limit {limits.memory_limit}")
    if limits.max_queued_bytes and limits.max_queued_bytes < limits.max_queued_messages * limits.largest_packet:
        summary.append(f"note            max_queued_bytes {limits.max_queued_bytes} holds "
                       f"{limits.max_queued_bytes // limits.largest_packet} of {limits.max_queued_messages} "
                       f"worst-case shards: beyond that the broker drops and devices re-send")
    summary += _hand_over_to_mosquitto(out, home, [out / "passwd", out / "acl", out / "server.key", data])
    return summary


def _passwords(secret_dir: Path, users: list[str], rotate: bool) -> dict[str, str]:
    secret_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(secret_dir, 0o700)
    out: dict[str, str] = {}
    for user in users:
        path = secret_dir / f"{user}.pw"
        password = None if rotate or not path.exists() else path.read_text(encoding="utf-8").strip()
        if not password:
            password = secrets.token_urlsafe(PASSWORD_BYTES)
            write_atomic(path, password + "\n", mode=0o600)
        os.chmod(path, 0o600)  # a kept file, too
        out[user] = password
    for stale in secret_dir.glob("*.pw"):
        if stale.stem not in out:
            stale.unlink()  # a device removed from devices.txt: its password no longer opens anything
    return out


def _listeners(s: Setup, home: Path) -> str:
    lines = [
        "# TLS listener for devices and the coordinator. 0.0.0.0 listens on every interface,",
        "# as a broker that phones and Pis reach over a LAN or the internet must; tests and",
        "# single-host setups render --bind 127.0.0.1.",
        f"listener {s.port} {s.bind}",
        "# The broker's certificate and the CA devices verify it with (ca.pem is also the CA",
        "# client certificates must chain to when require_certificate is true).",
        f"cafile {home / 'ca.pem'}",
        f"certfile {home / 'server.pem'}",
        f"keyfile {home / 'server.key'}",
        "# TLS 1.2 is the oldest version without known protocol breaks; Android 5+, Termux",
        "# and Raspberry Pi OS all speak 1.2 and 1.3.",
        "tls_version tlsv1.2",
    ]
    if s.client_certs:
        lines += [
            "# Every client must present a certificate signed by ca.pem; its CN is the MQTT user",
            "# (the password file is not consulted on this listener).",
            "require_certificate true",
            "use_identity_as_username true",
        ]
    else:
        lines += [
            "# Clients authenticate with their password inside TLS, not with a certificate",
            "# (render with --client-certs to require one).",
            "require_certificate false",
        ]
    lines += [
        "# The client id is replaced by the user name: a device cannot connect under another",
        "# device's id to kick it off or take over its persistent session and receipts.",
        "use_username_as_clientid true",
    ]
    if s.plain_port:
        lines += [
            "",
            "# Plain MQTT on loopback only, for a coordinator on the broker host itself. Same",
            "# passwords and ACL (per_listener_settings is false).",
            f"listener {s.plain_port} 127.0.0.1",
            "use_username_as_clientid true",
        ]
    return "\n".join(lines)


def _extra_settings(limits: Limits) -> str:
    return "\n".join([
        "# A device that never comes back leaves a persistent session (and its queued",
        "# receipts) behind; drop such sessions after 30 days.",
        "persistent_client_expiration 30d",
        "",
        "# message_size_limit is deliberately not set. mosquitto 2.0 recommends max_packet_size",
        "# instead, and a payload over message_size_limit is dropped *silently* after the QoS",
        "# flow completes: the device sees its PUBACK and waits for a receipt that never comes.",
        "# max_packet_size above disconnects the publisher, which shows in its logs. Were it set,",
        "# it would have to be at least the largest payload:",
        f"# message_size_limit {limits.largest_packet}",
    ])


def _hand_over_to_mosquitto(out: Path, home: Path, paths: list[Path]) -> list[str]:
    """Started as root, mosquitto drops to the ``mosquitto`` user before it reads these."""
    if os.geteuid() != 0:
        return ["note            not root: mosquitto must run as this user, or chown passwd, acl, "
                "server.key and data/ to its account"]
    account = mosquitto_account()
    if account is None:
        return ["note            no 'mosquitto' account here: chown passwd, acl, server.key and data/ "
                "to the account mosquitto runs as"]
    if home != out:
        return [f"note            after copying to {home}: chown mosquitto passwd acl server.key data/"]
    uid, gid, _ = account
    for path in paths:
        os.chown(path, uid, gid)
    return ["owner           passwd, acl, server.key, data/ -> mosquitto (it drops root before reading them)"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedsync broker-config",
        description="Render a ready mosquitto setup for a federation: TLS, one password per "
                    "account, the fedsync ACL and limits sized for the shards.")
    p.add_argument("kind", choices=["mosquitto"], help="broker to configure")
    p.add_argument("--devices", required=True, help="file of device ids, one per line (# comments)")
    p.add_argument("--out", required=True, help="directory to write (created; existing secrets are kept)")
    p.add_argument("--federation", default="demo", help="federation name (default demo)")
    p.add_argument("--port", type=int, default=8883, help="TLS port (default 8883)")
    p.add_argument("--bind", default="0.0.0.0",
                   help="address of the TLS listener (default 0.0.0.0: every interface; 127.0.0.1 for tests)")
    p.add_argument("--host", action="append", default=None,
                   help="broker host name or IP for the certificate (repeatable; default: this "
                        "machine's name); localhost and 127.0.0.1 are always included")
    p.add_argument("--max-shard-bytes", type=int, default=4 * DEFAULT_SHARD_VALUES,
                   help="largest encoded shard data in bytes (default 262144 = 65536 float32 values)")
    p.add_argument("--shards-per-update", type=int, default=16,
                   help="shards per device update, for the queue size (default 16)")
    p.add_argument("--max-queued-bytes", type=int, default=DEFAULT_MAX_QUEUED_BYTES,
                   help="per-client queue cap in bytes (default 1 GiB; size to the broker's memory)")
    p.add_argument("--ca-cert", help="PEM certificate of a CA to sign with (default: make a self-signed CA)")
    p.add_argument("--ca-key", help="PEM key of --ca-cert (unencrypted)")
    p.add_argument("--client-certs", action="store_true",
                   help="require client certificates (issued here, CN = user) instead of passwords")
    p.add_argument("--plain-port", type=int, help="extra plain-MQTT listener on 127.0.0.1 only")
    p.add_argument("--install-dir", help="where DIR will live on the broker host, for the paths in "
                                         "mosquitto.conf (default: DIR itself)")
    p.add_argument("--rotate-passwords", action="store_true",
                   help="make new passwords (and signing keys) for every account")
    p.add_argument("--signing", choices=["hmac-sha256", "ed25519"],
                   help="also make one update-signing key per device in DIR/signing (fedsync.signing)")
    return p


def main(argv: list[str]) -> int:
    """Entry point of ``fedsync broker-config``; returns the exit status."""
    parser = _parser()
    a = parser.parse_args(argv)
    if (a.ca_cert is None) != (a.ca_key is None):
        parser.error("--ca-cert and --ca-key go together")
    if find_program("mosquitto_passwd") is None:
        parser.error("mosquitto_passwd not found: install mosquitto (apt-get install mosquitto)")
    for name in ("port", "plain_port", "max_shard_bytes", "shards_per_update", "max_queued_bytes"):
        value = getattr(a, name)
        if value is not None and value < (0 if name == "max_queued_bytes" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    try:
        setup = Setup(
            out=Path(a.out), devices=read_devices(a.devices), federation=a.federation, port=a.port,
            bind=a.bind, hosts=a.host or _default_hosts(), max_shard_bytes=a.max_shard_bytes,
            shards_per_update=a.shards_per_update, max_queued_bytes=a.max_queued_bytes,
            ca_cert=Path(a.ca_cert) if a.ca_cert else None, ca_key=Path(a.ca_key) if a.ca_key else None,
            client_certs=a.client_certs, plain_port=a.plain_port,
            install_dir=Path(a.install_dir) if a.install_dir else None, rotate_passwords=a.rotate_passwords,
            signing=a.signing)
        check_name("federation", setup.federation)
        lines = render(setup)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"fedsync broker-config: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {setup.out}/ for federation {setup.federation!r}:")
    for line in lines:
        print(f"  {line}")
    print(f"run:  mosquitto -c {(setup.install_dir or setup.out.resolve()) / 'mosquitto.conf'}")
    # The example must reach the listener and match the certificate: a listener on one address
    # the certificate names (loopback always) is reached there, else by the certificate's first name.
    served = setup.bind in setup.hosts or setup.bind in ("127.0.0.1", "::1")  # loopback: always in the certificate
    host = setup.bind if served else (setup.hosts[0] if setup.hosts else "BROKER")
    print(f"each device gets ca.pem and secrets/<device>.pw, e.g.  fedsync agent --broker "
          f"mqtts://{host}:{setup.port} --ca-file ca.pem "
          f"--device-id {setup.devices[0] if setup.devices else 'DEVICE'} --password-file "
          f"{setup.devices[0] if setup.devices else 'DEVICE'}.pw")
    return 0


def _default_hosts() -> list[str]:
    names = [socket.gethostname(), socket.getfqdn()]
    return [n for i, n in enumerate(names) if n and n not in names[:i] and n != "localhost"]
