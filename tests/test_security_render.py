"""What ``fedsync broker-config mosquitto`` writes, without running a broker: the config's
TLS, ACL and limits, kept passwords and rotation, signing keys, an existing CA with client
certificates, refused device lists, the packet-size arithmetic against the real encoder,
the server certificate's names, and the amqtt ACL as the same table as mosquitto's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedsync.broker_config import acl as acl_mod
from fedsync.broker_config.render import CBOR_ENVELOPE, main as render_main, size_limits, zstd_bound
from fedsync.broker_config.tls import issue_server, make_ca, sans
from fedsync.codecs import get_codec
from fedsync.messages import MAX_PARAMS, MAX_SHARDS, UpdateShard, encode
from tests.secured_broker import TOPICS


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
        f"max_queued_bytes {1 << 30}", f"memory_limit {limits.memory_limit}", "max_inflight_messages 100",
        "log_dest stderr",
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


@pytest.mark.parametrize("extra, broker", [
    ((), "mqtts://broker.example:8883"),  # every interface: the certificate's first name
    (("--bind", "127.0.0.1"), "mqtts://127.0.0.1:8883"),  # the one address it listens on (loopback: certified)
])
def test_the_example_agent_command_names_an_address_the_listener_serves(tmp_path, capsys, extra, broker):
    # Before: with --bind 127.0.0.1 it named broker.example, where nothing listens.
    _render(tmp_path, *extra)
    (hint,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("each device gets")]
    assert hint.endswith(f"fedsync agent --broker {broker} --ca-file ca.pem --device-id dev-0 "
                         "--password-file dev-0.pw")


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
    # The coordinator writes up/# only to delete retained uploads, and reads back its own
    # retained manifest and model to repair a stale broker (coordinator/broker_watch.py).
    assert table["publish-acl"]["coordinator"] == ["fedsync/+/manifest", "fedsync/+/model/#", "fedsync/+/modeldelta/#",
                                                   "fedsync/+/up/#", "fedsync/+/ack/+", "fedsync/+/coordinator/status",
                                                   "fedsync/+/coordinator/probe"]
    assert table["subscribe-acl"]["coordinator"] == ["fedsync/+/manifest", "fedsync/+/model/#",
                                                     "fedsync/+/modeldelta/#", "fedsync/+/up/#", "fedsync/+/status/+",
                                                     "fedsync/+/coordinator/status", "fedsync/+/coordinator/probe"]
    assert table["subscribe-acl"]["dev-0"] == ["fedsync/demo/manifest", "fedsync/demo/model/#",
                                               "fedsync/demo/modeldelta/#", "fedsync/demo/ack/dev-0",
                                               "fedsync/demo/status/dev-0",  # its own: a second process on its id
                                               "fedsync/demo/coordinator/status"]
    assert table["publish-acl"]["monitor"] == []  # read-only
    mosq = acl_mod.mosquitto_acl("demo", ["dev-0"])
    assert not [line for line in mosq.splitlines() if line.startswith("pattern")]
    block = mosq.split("user dev-0\n", 1)[1].splitlines()
    assert block == ["topic read fedsync/demo/manifest", "topic read fedsync/demo/model/#",
                     "topic read fedsync/demo/modeldelta/#", "topic write fedsync/demo/up/dev-0/#",
                     "topic read fedsync/demo/ack/dev-0", "topic write fedsync/demo/status/dev-0",
                     "topic read fedsync/demo/status/dev-0", "topic read fedsync/demo/coordinator/status"]
