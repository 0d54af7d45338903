"""Certificates for the broker's TLS listener: a private CA, server and client certificates.

Theory of operation
-------------------
``fedsync broker-config`` needs a server certificate the devices can verify. Without a
real CA it makes its own: :func:`make_ca` creates a self-signed CA, :func:`issue_server`
signs a certificate for the broker's host names (plus ``localhost`` and ``127.0.0.1``,
always, so the coordinator beside the broker and the tests can connect by address), and
:func:`issue_client` signs a device certificate whose common name is the device id (for
``require_certificate true`` + ``use_identity_as_username true``). Devices then trust
exactly ``ca.pem``; nothing is added to the system trust store.

Keys are ECDSA P-256: small, fast on a Raspberry Pi, and accepted by every OpenSSL a
device or mosquitto 2.0 links against. Certificates carry the extensions a strict
verifier (Python 3.13's ``VERIFY_X509_STRICT``) asks for: basic constraints, key usage,
extended key usage, subject and authority key identifiers.

With a real CA (``--ca-cert``/``--ca-key``), :func:`load_ca` reads it and the same
issuing functions are used; see docs/security.md for running a CA properly.

This module needs ``cryptography`` (broker host only, never the device install).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsync.atomic import write_atomic

CA_DAYS = 3650
# 825 days is the longest validity Apple platforms accept for a TLS server certificate;
# a shorter one is fine, a longer one breaks iOS clients.
LEAF_DAYS = 825
ALWAYS_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        # Unencrypted PKCS#8: mosquitto reads the key at start without a prompt; the file
        # mode (0600) is what protects it.
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> None:
        """Write the certificate (mode 0644) and the key (mode 0600)."""
        write_atomic(cert_path, self.cert_pem(), mode=0o644)
        write_atomic(key_path, self.key_pem(), mode=0o600)


def make_ca(common_name: str = "fedsync private CA", days: int = CA_DAYS,
            now: datetime.datetime | None = None) -> KeyPair:
    """A self-signed CA that may sign leaf certificates only (path length 0).

    >>> ca = make_ca("test CA")
    >>> ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    True
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = _start(now)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    return KeyPair(cert, key)


def load_ca(cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> KeyPair:
    """Read an existing CA (PEM certificate and unencrypted PEM EC or RSA key)."""
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"{key_path}: need an EC or RSA CA key, got {type(key).__name__}")
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise ValueError(f"{key_path} is not the key of {cert_path}")
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise ValueError(f"{cert_path} is not a CA certificate (basicConstraints CA:FALSE)")
    except x509.ExtensionNotFound:
        raise ValueError(f"{cert_path} has no basicConstraints extension; not a CA certificate") from None
    return KeyPair(cert, key)  # type: ignore[arg-type]


def issue_server(ca: KeyPair, hosts: Iterable[str], days: int = LEAF_DAYS,
                 now: datetime.datetime | None = None) -> KeyPair:
    """A server certificate for ``hosts`` (DNS names or IP addresses) plus localhost/127.0.0.1.

    >>> ca = make_ca()
    >>> sans(issue_server(ca, ["broker.lan", "10.0.0.5"]))
    ['broker.lan', 'localhost', '10.0.0.5', '127.0.0.1']
    """
    names = _unique([*hosts, *ALWAYS_HOSTS])
    dns = [x509.DNSName(h) for h in names if not _is_ip(h)]
    ips = [x509.IPAddress(ipaddress.ip_address(h)) for h in names if _is_ip(h)]
    return _issue(ca, names[0], x509.SubjectAlternativeName([*dns, *ips]),
                  ExtendedKeyUsageOID.SERVER_AUTH, days, now)


def issue_client(ca: KeyPair, name: str, days: int = LEAF_DAYS,
                 now: datetime.datetime | None = None) -> KeyPair:
    """A client certificate whose common name is ``name`` (the device id / MQTT user).

    >>> ca = make_ca()
    >>> issue_client(ca, "dev-0").cert.subject.rfc4514_string()
    'CN=dev-0'
    """
    return _issue(ca, name, None, ExtendedKeyUsageOID.CLIENT_AUTH, days, now)


def sans(pair: KeyPair) -> list[str]:
    """The subject alternative names of a certificate, DNS names first."""
    ext = pair.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*ext.get_values_for_type(x509.DNSName), *map(str, ext.get_values_for_type(x509.IPAddress))]


def _issue(ca: KeyPair, common_name: str, san: x509.SubjectAlternativeName | None,
           usage: x509.ObjectIdentifier, days: int, now: datetime.datetime | None) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    start = _start(now)
    # A leaf must not outlive its CA: verifiers reject the chain once the CA expires anyway.
    end = min(start + datetime.timedelta(days=days), ca.cert.not_valid_after_utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca.cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                            key_agreement=True, content_commitment=False,
                                            data_encipherment=False, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                              critical=False))
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return KeyPair(builder.sign(ca.key, hashes.SHA256()), key)


def _start(now: datetime.datetime | None) -> datetime.datetime:
    # Backdated an hour: a device whose clock runs a little behind must not see a
    # certificate that is "not yet valid".
    return (now or datetime.datetime.now(datetime.timezone.utc)) - datetime.timedelta(hours=1)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        item = item.strip()
        if not item:
            continue
        if not _is_ip(item) and (any(c.isspace() for c in item) or "/" in item):
            raise ValueError(f"not a host name or IP address: {item!r}")
        seen.setdefault(item, None)
    return list(seen)

