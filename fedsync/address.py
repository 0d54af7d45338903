"""Where a broker is and how to log in to it: plain values shared by the config loader and the link."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        """``mqtt://host:port`` or ``mqtts://host:port``.

        >>> BrokerAddress.parse("mqtt://127.0.0.1:1884")
        BrokerAddress(host='127.0.0.1', port=1884, tls=False)

        A bare ``host`` or ``host:port`` means ``mqtt://``; every other mistake is a ValueError
        that names the URL and what is wrong with it.

        >>> BrokerAddress.parse("10.0.0.5")
        BrokerAddress(host='10.0.0.5', port=1883, tls=False)
        >>> BrokerAddress.parse("mqtt://h:99999")
        Traceback (most recent call last):
        ValueError: broker: 'mqtt://h:99999': the port must be a number in 1..65535
        """
        u = urlparse(url if "://" in url else f"mqtt://{url}")
        if u.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker: unsupported scheme {u.scheme!r} in {url!r} (use mqtt:// or mqtts://)")
        try:
            port = u.port
        except ValueError:
            port = 0
        if port == 0 or (port is None and u.netloc.endswith(":")):
            raise ValueError(f"broker: {url!r}: the port must be a number in 1..65535")
        if not u.hostname:
            raise ValueError(f"broker: {url!r} names no host (e.g. mqtt://127.0.0.1:1883)")
        if u.username is not None or u.password is not None:
            raise ValueError(f"broker: {url!r}: no user or password in the URL; use --password-file "
                             f"(and [broker] username)")
        if u.path not in ("", "/") or u.query or u.fragment:
            raise ValueError(f"broker: {url!r}: a broker URL is mqtt[s]://host[:port], with no path or query")
        tls = u.scheme == "mqtts"
        return cls(u.hostname, port or (8883 if tls else 1883), tls)


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
