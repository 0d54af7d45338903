"""fedsync.signing: known answers, tampering of every kind, key files.

The coordinator will count an update only if its signature verifies, so each test
names one way a forger could try (change a field, flip a bit, sign as someone else,
replay under another round) and asserts ``verify`` says False without raising.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsync.signing import (
    DOMAIN,
    Ed25519Signer,
    Ed25519Verifier,
    HmacSigner,
    HmacVerifier,
    generate_device_keys,
    generate_ed25519_keypair,
    generate_hmac_key,
    load_device_keys,
    signing_message,
    write_device_keys,
)

KEY0 = bytes(range(32))
KEY1 = bytes(range(1, 33))
DIGEST = bytes.fromhex("00112233445566778899aabbccddeeff")
FIELDS = ("demo", "dev-0", 7, "u1", DIGEST, 120)


def test_hmac_matches_rfc4231_test_case_1():
    # RFC 4231 §4.2: HmacSigner is plain HMAC-SHA256.
    assert HmacSigner(b"\x0b" * 20).sign(b"Hi There").hex() == (
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")


def test_signing_message_has_the_documented_layout():
    msg = signing_message(*FIELDS)
    expected = (DOMAIN
                + b"\x00\x04demo" + b"\x00\x05dev-0"
                + (7).to_bytes(8, "big")
                + b"\x00\x02u1"
                + b"\x10" + DIGEST
                + (120).to_bytes(8, "big"))
    assert msg == expected


def test_known_answer_for_a_whole_update_signature():
    # Pinned: a change to the message layout or the MAC breaks every deployed device.
    sig = HmacSigner(KEY0).sign(signing_message(*FIELDS))
    assert len(sig) == 32
    assert sig.hex() == "423c436942e6b59bf2a54f534b54e5f3fcb843d38f9327b71d7341b03a1d3a70"
    assert sig == _reference_hmac(KEY0, signing_message(*FIELDS))


def _reference_hmac(key: bytes, msg: bytes) -> bytes:
    # HMAC from its definition (RFC 2104), independent of the hmac module.
    import hashlib

    block = 64
    k = key.ljust(block, b"\x00")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in k) + msg).digest()
    return hashlib.sha256(bytes(b ^ 0x5C for b in k) + inner).digest()


@pytest.mark.parametrize("index, value", [
    (0, "demo2"),        # another federation
    (1, "dev-1"),        # another device
    (2, 8),              # replayed into the next round
    (3, "u2"),           # another update id
    (4, bytes(16)),      # another update (digest covers every shard)
    (5, 1_000_000),      # inflated FedAvg weight
])
def test_a_signature_does_not_verify_for_any_changed_field(index, value):
    verifier = HmacVerifier({"dev-0": KEY0, "dev-1": KEY0})
    sig = HmacSigner(KEY0).sign(signing_message(*FIELDS))
    changed = list(FIELDS)
    changed[index] = value
    device = changed[1]
    assert verifier.verify("dev-0", signing_message(*FIELDS), sig)
    assert not verifier.verify(device, signing_message(*changed), sig)


def test_tampered_signature_wrong_device_and_unknown_device_are_refused():
    msg = signing_message(*FIELDS)
    sig = HmacSigner(KEY0).sign(msg)
    verifier = HmacVerifier({"dev-0": KEY0, "dev-1": KEY1})
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    assert verifier.verify("dev-0", msg, sig)
    assert not verifier.verify("dev-0", msg, flipped)
    assert not verifier.verify("dev-0", msg, sig[:-1])
    assert not verifier.verify("dev-0", msg, sig + b"\x00")
    assert not verifier.verify("dev-0", msg, b"")
    assert not verifier.verify("dev-1", msg, sig)  # dev-0's signature presented as dev-1's
    assert not verifier.verify("dev-9", msg, sig)  # no key: unknown device
    # dev-1 signing a message that names dev-0: a valid MAC under the wrong key
    assert not verifier.verify("dev-0", msg, HmacSigner(KEY1).sign(msg))
    for bad in (None, "sig", 42, [1, 2]):
        assert not verifier.verify("dev-0", msg, bad)  # type: ignore[arg-type]
        assert not verifier.verify(bad, msg, sig)  # type: ignore[arg-type]
        assert not verifier.verify("dev-0", bad, sig)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(sig=st.binary(max_size=80), device=st.text(max_size=10))
def test_verify_never_raises_on_garbage(sig, device):
    msg = signing_message(*FIELDS)
    assert HmacVerifier({"dev-0": KEY0}).verify(device, msg, sig) is False  # 2**-256 to hit the MAC


_name = st.text(alphabet="ab-", min_size=1, max_size=4)
_fields = st.tuples(_name, _name, st.integers(0, 3), _name, st.binary(min_size=1, max_size=3), st.integers(0, 3))


@settings(max_examples=200, deadline=None)
@given(a=_fields, b=_fields)
def test_signing_message_is_injective(a, b):
    assert (signing_message(*a) == signing_message(*b)) == (a == b)


def test_field_boundaries_cannot_be_shifted():
    # The classic ambiguity of plain concatenation: "ab"+"c" == "a"+"bc".
    assert signing_message("ab", "c", 1, "u", DIGEST, 1) != signing_message("a", "bc", 1, "u", DIGEST, 1)
    assert signing_message("f", "d", 1, "u", b"\x01\x02", 1) != signing_message("f", "d", 1, "u", b"\x01", 0x02 << 56 | 1)


@pytest.mark.parametrize("field, value", [
    ("federation", "a/b"), ("device", "dev+0"), ("update_id", ""), ("round_id", -1), ("round_id", True),
    ("num_samples", 2**64), ("num_samples", 1.5), ("update_digest", b""), ("update_digest", "00" * 16),
])
def test_signing_message_refuses_input_no_valid_update_has(field, value):
    kwargs = dict(zip(("federation", "device", "round_id", "update_id", "update_digest", "num_samples"), FIELDS))
    kwargs[field] = value
    with pytest.raises(ValueError):
        signing_message(**kwargs)


def test_hmac_keys_shorter_than_16_bytes_are_refused():
    with pytest.raises(ValueError):
        HmacSigner(b"short")
    with pytest.raises(ValueError):
        HmacVerifier({"dev-0": b"x" * 15})
    assert len(generate_hmac_key()) == 32 and generate_hmac_key() != generate_hmac_key()


# -- Ed25519 -----------------------------------------------------------------------------

def test_ed25519_matches_rfc8032_test_1():
    secret = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    public = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    expected = bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    signer = Ed25519Signer(secret)
    assert signer.public_key_bytes() == public
    assert signer.sign(b"") == expected
    assert Ed25519Verifier({"dev-0": public}).verify("dev-0", b"", expected)


def test_ed25519_tampering_is_refused_and_the_coordinator_holds_public_keys_only():
    priv0, pub0 = generate_ed25519_keypair()
    priv1, pub1 = generate_ed25519_keypair()
    verifier = Ed25519Verifier({"dev-0": pub0, "dev-1": pub1})
    msg = signing_message(*FIELDS)
    sig = Ed25519Signer(priv0).sign(msg)
    assert len(sig) == 64 and verifier.verify("dev-0", msg, sig)
    assert not verifier.verify("dev-1", msg, sig)
    assert not verifier.verify("dev-0", msg, Ed25519Signer(priv1).sign(msg))
    assert not verifier.verify("dev-0", msg[:-1] + bytes([msg[-1] ^ 1]), sig)
    assert not verifier.verify("dev-0", msg, bytes([sig[0] ^ 1]) + sig[1:])
    assert not verifier.verify("dev-0", msg, sig[:63])
    assert not verifier.verify("dev-0", msg, None)  # type: ignore[arg-type]
    assert not verifier.verify("nobody", msg, sig)
    with pytest.raises(ValueError):
        Ed25519Verifier({"dev-0": pub0[:31]})
    with pytest.raises(ValueError):
        Ed25519Signer(priv0 + b"\x00")


def test_importing_signing_does_not_import_cryptography():
    # The device install has no cryptography; HMAC devices must still import the module.
    code = "import sys, fedsync.signing; print('cryptography' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False"


# -- key files -------------------------------------------------------------------------

def test_key_file_round_trip_and_format(tmp_path):
    path = tmp_path / "keys"
    write_device_keys(path, {"dev-0": KEY0, "dev-1": KEY1}, comment="test keys")
    text = path.read_text()
    assert text.splitlines()[0] == "# test keys"
    assert text.splitlines()[1] == "dev-0 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_device_keys(path) == {"dev-0": KEY0, "dev-1": KEY1}


@pytest.mark.parametrize("content, error", [
    ("dev-0\n", "expected"),
    ("dev-0 AAAA extra\n", "expected"),
    ("dev-0 not*base64\n", "base64"),
    ("dev/0 AAAA\n", "must match"),
    ("dev-0 AAAA\ndev-0 BBBB\n", "twice"),
])
def test_malformed_key_files_name_the_line(tmp_path, content, error):
    path = tmp_path / "keys"
    path.write_text("# header\n\n" + content)
    path.chmod(0o600)
    with pytest.raises(ValueError, match=error):
        load_device_keys(path)


def test_a_secret_key_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "keys"
    write_device_keys(path, {"dev-0": KEY0})
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_device_keys(path)
    assert load_device_keys(path, secret=False) == {"dev-0": KEY0}  # e.g. Ed25519 public keys


@pytest.mark.parametrize("scheme", ["hmac-sha256", "ed25519"])
def test_generated_keys_sign_and_verify_for_every_device_and_only_for_it(tmp_path, scheme):
    devices = ["dev-0", "dev-1", "dev-2"]
    paths = generate_device_keys(tmp_path, devices, scheme)
    assert [p.name for p in paths] == ["coordinator.keys", "dev-0.key", "dev-1.key", "dev-2.key"]
    public = scheme == "ed25519"
    coordinator = load_device_keys(tmp_path / "coordinator.keys", secret=not public)
    assert sorted(coordinator) == devices
    assert oct((tmp_path / "coordinator.keys").stat().st_mode & 0o777) == ("0o644" if public else "0o600")
    verifier = Ed25519Verifier(coordinator) if public else HmacVerifier(coordinator)
    for device in devices:
        own = load_device_keys(tmp_path / "devices" / f"{device}.key")
        assert list(own) == [device]
        signer = Ed25519Signer(own[device]) if public else HmacSigner(own[device])
        msg = signing_message("demo", device, 1, "u1", DIGEST, 10)
        sig = signer.sign(msg)
        assert [verifier.verify(d, msg, sig) for d in devices] == [d == device for d in devices]
    with pytest.raises(ValueError):
        generate_device_keys(tmp_path, devices, "rsa")


def test_regenerating_keys_keeps_listed_devices_adds_new_ones_and_drops_removed_ones(tmp_path):
    generate_device_keys(tmp_path, ["dev-0", "dev-1"], "ed25519")
    first = load_device_keys(tmp_path / "coordinator.keys", secret=False)
    paths = generate_device_keys(tmp_path, ["dev-0", "dev-2"], "ed25519")
    assert [p.name for p in paths] == ["coordinator.keys", "dev-2.key"]  # dev-0 kept, dev-2 new
    second = load_device_keys(tmp_path / "coordinator.keys", secret=False)
    assert sorted(second) == ["dev-0", "dev-2"] and second["dev-0"] == first["dev-0"]
    assert sorted(p.name for p in (tmp_path / "devices").iterdir()) == ["dev-0.key", "dev-2.key"]
    with pytest.raises(ValueError, match="holds ed25519"):
        generate_device_keys(tmp_path, ["dev-0"], "hmac-sha256")
    generate_device_keys(tmp_path, ["dev-0"], "hmac-sha256", rotate=True)
    assert (tmp_path / "scheme").read_text() == "hmac-sha256\n"
    assert load_device_keys(tmp_path / "coordinator.keys")["dev-0"] != first["dev-0"]
