"""Update signatures: a device proves an update is its own, end to end through the broker.

Theory of operation
-------------------
The broker ACL stops a device from *publishing* under another device's topic, but it
is only as good as the broker and its configuration (amqtt cannot enforce all of it, a
misconfigured or compromised broker enforces none). A signature lets the coordinator
check the author itself: the device signs :func:`signing_message` - federation, device,
round, update id, the update's digest (which covers every shard's digest, hence every
byte of the update) and its FedAvg weight - and the coordinator verifies it with the
device's key before counting the update.

Two schemes, same interface (``Signer.sign(msg) -> bytes``,
``Verifier.verify(device, msg, sig) -> bool``):

* ``hmac-sha256`` (:class:`HmacSigner`, :class:`HmacVerifier`): a 32-byte secret per
  device, shared with the coordinator. Standard library only, so the device install
  stays small. Anyone holding the coordinator's key file can forge any device.
* ``ed25519`` (:class:`Ed25519Signer`, :class:`Ed25519Verifier`): a key pair per device;
  the coordinator holds public keys only. Needs ``cryptography`` (imported lazily).

The message is a fixed sequence of length-prefixed fields after a domain-separation
tag, so no two different field tuples encode to the same bytes, and a signature made
for anything else (another protocol, another message kind) never verifies here.
Verification never raises for bad input: unknown device, wrong type or length,
tampered message -> ``False``.

Key files (:func:`load_device_keys`, :func:`write_device_keys`): UTF-8 text, one
``<device-id> <base64 key>`` per line, ``#`` comments and blank lines ignored. The
scheme is the caller's: an HMAC file holds 32-byte secrets, an Ed25519 file 32-byte raw
private keys (a device's own) or raw public keys (the coordinator's). Secret files
must not be readable by group or others (checked, like ssh does).

>>> key = bytes(range(32))
>>> msg = signing_message("demo", "dev-0", 7, "u1", bytes(16), 120)
>>> sig = HmacSigner(key).sign(msg)
>>> HmacVerifier({"dev-0": key}).verify("dev-0", msg, sig)
True
>>> HmacVerifier({"dev-0": key}).verify("dev-1", msg, sig)
False
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

from fedsync.atomic import write_atomic
from fedsync.topics import check_name

DOMAIN = b"fedsync/update-signature/v1\x00"
HMAC_KEY_SIZE = 32
HMAC_MIN_KEY_SIZE = 16
HMAC_SIG_SIZE = 32
ED25519_KEY_SIZE = 32
ED25519_SIG_SIZE = 64
SCHEMES = ("hmac-sha256", "ed25519")
_U64_MAX = 2**64 - 1


def signing_message(federation: str, device: str, round_id: int, update_id: str,
                    update_digest: bytes, num_samples: int) -> bytes:
    """The canonical bytes a device signs for one update.

    ``DOMAIN``, then federation, device and update id as (u16 length, UTF-8), round id
    and num_samples as u64 big-endian, update_digest as (u8 length, bytes), in the
    order of the signature. Raises ``ValueError`` (a :class:`~fedsync.errors.ProtocolError`
    for a bad name) for input that could not have come from a valid update.

    >>> signing_message("f", "d", 1, "u", b"\\x00" * 16, 2).hex()[:16]
    '66656473796e632f'
    """
    check_name("federation", federation)
    check_name("device", device)
    check_name("update_id", update_id)
    for name, value in (("round_id", round_id), ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MAX:
            raise ValueError(f"{name} must be an integer in [0, 2**64), got {value!r}")
    if not isinstance(update_digest, (bytes, bytearray)) or not 1 <= len(update_digest) <= 64:
        raise ValueError("update_digest must be 1..64 bytes")
    out = bytearray(DOMAIN)
    for text in (federation, device):
        _text(out, text)
    out += struct.pack(">Q", round_id)
    _text(out, update_id)
    out += struct.pack(">B", len(update_digest)) + bytes(update_digest)
    out += struct.pack(">Q", num_samples)
    return bytes(out)


def _text(out: bytearray, text: str) -> None:
    raw = text.encode("utf-8")
    out += struct.pack(">H", len(raw)) + raw


# -- HMAC-SHA256 (standard library) ---------------------------------------------------

class HmacSigner:
    """Signs with HMAC-SHA256 under the device's secret key (32-byte signatures)."""

    scheme = "hmac-sha256"
    signature_size = HMAC_SIG_SIZE

    def __init__(self, key: bytes) -> None:
        self._key = _hmac_key("key", key)

    def sign(self, msg: bytes) -> bytes:
        return hmac.new(self._key, msg, hashlib.sha256).digest()


class HmacVerifier:
    """Checks HMAC-SHA256 signatures against each device's secret key."""

    scheme = "hmac-sha256"

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        self._keys = {device: _hmac_key(f"keys[{device!r}]", key) for device, key in keys.items()}

    def verify(self, device: str, msg: bytes, sig: bytes) -> bool:
        """True only if ``sig`` is ``device``'s signature of ``msg``; never raises."""
        key = self._keys.get(device) if isinstance(device, str) else None
        if key is None or not isinstance(msg, (bytes, bytearray)) or not isinstance(sig, (bytes, bytearray)):
            return False
        expected = hmac.new(key, msg, hashlib.sha256).digest()
        return hmac.compare_digest(expected, bytes(sig))  # constant time in the signature's content


def _hmac_key(name: str, key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) < HMAC_MIN_KEY_SIZE:
        raise ValueError(f"{name}: an HMAC key must be at least {HMAC_MIN_KEY_SIZE} bytes")
    return bytes(key)


# -- Ed25519 (cryptography, imported lazily) --------------------------------------------

class Ed25519Signer:
    """Signs with the device's Ed25519 private key (32 raw bytes; 64-byte signatures)."""

    scheme = "ed25519"
    signature_size = ED25519_SIG_SIZE

    def __init__(self, private_key_bytes: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if not isinstance(private_key_bytes, (bytes, bytearray)) or len(private_key_bytes) != ED25519_KEY_SIZE:
            raise ValueError(f"an Ed25519 private key is {ED25519_KEY_SIZE} raw bytes")
        self._key = Ed25519PrivateKey.from_private_bytes(bytes(private_key_bytes))

    def sign(self, msg: bytes) -> bytes:
        return self._key.sign(msg)

    def public_key_bytes(self) -> bytes:
        return self._key.public_key().public_bytes_raw()


class Ed25519Verifier:
    """Checks Ed25519 signatures against each device's public key (32 raw bytes)."""

    scheme = "ed25519"

    def __init__(self, public_keys: Mapping[str, bytes]) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        self._keys = {}
        for device, raw in public_keys.items():
            if not isinstance(raw, (bytes, bytearray)) or len(raw) != ED25519_KEY_SIZE:
                raise ValueError(f"public_keys[{device!r}]: an Ed25519 public key is {ED25519_KEY_SIZE} raw bytes")
            self._keys[device] = Ed25519PublicKey.from_public_bytes(bytes(raw))

    def verify(self, device: str, msg: bytes, sig: bytes) -> bool:
        """True only if ``sig`` is ``device``'s signature of ``msg``; never raises."""
        from cryptography.exceptions import InvalidSignature

        key = self._keys.get(device) if isinstance(device, str) else None
        if key is None or not isinstance(msg, (bytes, bytearray)) or not isinstance(sig, (bytes, bytearray)):
            return False
        if len(sig) != ED25519_SIG_SIZE:
            return False
        try:
            key.verify(bytes(sig), bytes(msg))
        except InvalidSignature:
            return False
        return True


# -- keys --------------------------------------------------------------------------------

def generate_hmac_key() -> bytes:
    """A fresh 32-byte HMAC secret from the OS's CSPRNG."""
    return secrets.token_bytes(HMAC_KEY_SIZE)


def generate_ed25519_keypair() -> tuple[bytes, bytes]:
    """A fresh ``(private, public)`` Ed25519 key pair, 32 raw bytes each."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def load_device_keys(path: str | os.PathLike[str], *, secret: bool = True) -> dict[str, bytes]:
    """Read a key file (``<device-id> <base64 key>`` per line) into ``{device: key}``.

    ``secret=True`` (HMAC keys, private keys) refuses a file that group or others may
    read. Raises ``ValueError`` naming the line for anything malformed or duplicated.
    """
    path = Path(path)
    if secret and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path}: secret key file is accessible by group/others; chmod 600 it")
    keys: dict[str, bytes] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected '<device-id> <base64 key>'")
        device, encoded = parts
        check_name(f"{path}:{lineno}: device", device)
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{path}:{lineno}: key is not valid base64") from None
        if device in keys:
            raise ValueError(f"{path}:{lineno}: {device!r} listed twice")
        keys[device] = key
    return keys


def write_device_keys(path: str | os.PathLike[str], keys: Mapping[str, bytes], *, secret: bool = True,
                      comment: str = "") -> None:
    """Write ``keys`` in the :func:`load_device_keys` format (mode 0600 if ``secret``, else 0644)."""
    lines = [f"# {line}" for line in comment.splitlines()] if comment else []
    lines += [f"{check_name('device', d)} {base64.b64encode(k).decode('ascii')}" for d, k in keys.items()]
    write_atomic(path, "\n".join(lines) + "\n", mode=0o600 if secret else 0o644)


def generate_device_keys(out_dir: str | os.PathLike[str], devices: Iterable[str],
                         scheme: str = "hmac-sha256", *, rotate: bool = False) -> list[Path]:
    """Keep one key per device in ``out_dir``; return the paths written.

    Layout: ``out_dir/scheme`` (the scheme's name), ``out_dir/coordinator.keys`` (HMAC:
    every device's secret, 0600; Ed25519: public keys only, 0644) and
    ``out_dir/devices/{id}.key`` (the device's own secret or private key, 0600).
    Re-running keeps the keys of devices still listed (``rotate=True`` replaces them),
    adds keys for new devices and deletes the files of devices no longer listed.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    out = Path(out_dir)
    (out / "devices").mkdir(parents=True, exist_ok=True, mode=0o700)
    public = scheme == "ed25519"
    recorded = (out / "scheme").read_text(encoding="utf-8").strip() if (out / "scheme").exists() else None
    if recorded is not None and recorded != scheme and not rotate:
        raise ValueError(f"{out} holds {recorded} keys; pass rotate to replace them with {scheme} keys")
    keep = recorded == scheme and not rotate
    coordinator: dict[str, bytes] = {}
    written: list[Path] = []
    devices = [check_name("device", d) for d in devices]
    for device in devices:
        path = out / "devices" / f"{device}.key"
        if keep and path.exists():
            own = load_device_keys(path)[device]
            coordinator[device] = Ed25519Signer(own).public_key_bytes() if public else own
            continue
        if public:
            own, coordinator[device] = generate_ed25519_keypair()
        else:
            own = coordinator[device] = generate_hmac_key()
        write_device_keys(path, {device: own}, comment=f"{scheme} key of {device}: install on that device only")
        written.append(path)
    for stale in (out / "devices").glob("*.key"):
        if stale.stem not in coordinator:
            stale.unlink()
    write_atomic(out / "scheme", scheme + "\n")
    path = out / "coordinator.keys"
    write_device_keys(path, coordinator, secret=not public,
                      comment=f"{scheme} {'public ' if public else ''}keys of every device, for the coordinator")
    return [path, *written]
