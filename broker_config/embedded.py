"""The embedded, pure-Python MQTT broker (amqtt 0.12.1) for demos and labs.

Theory of operation
-------------------
``run_embedded`` starts one amqtt broker with a single TCP listener on ``host``
(loopback by default: amqtt's own default listener is ``0.0.0.0:1883``, which would
expose an unauthenticated broker to the network) and blocks until SIGINT or SIGTERM,
then shuts the broker down and returns.

With a password file, only the ``FileAuthPlugin`` is loaded, so anonymous login is
off. That matters beyond security: amqtt drops the session of an anonymous client when
it disconnects, so QoS 1 messages for an offline persistent session are queued only
when anonymous login is off (docs/brokers.md).

One amqtt 0.12.1 bug is worked around here (:class:`SnapshotSubscriptions`: a client that
connected while another subscribed lost every publish). Known limits of amqtt 0.12.1
(measured, docs/brokers.md): a retained message can reach a
client that never subscribed to its topic, a last will never fires for a frozen peer
(socket open, no pings), QoS 2 loses a few messages across forced reconnects, and
nothing survives a restart. Use mosquitto in the field; every client filters and
validates what it receives.

Password file format (amqtt.plugins.authentication.FileAuthPlugin, 0.12.1): one
``username:hash`` per line, ``#`` comments and blank lines ignored, split on the first
``:``. The hash must be Argon2 (``$argon2id$...``, verified by pwdlib) or the deprecated
sha512-crypt (``$6$...``, needs the ``crypt`` module, gone in Python 3.13). Despite the
plugin's docstring, plain sha-512 and bcrypt are *not* accepted. ``write_password_file``
writes Argon2id.

Run it as ``python -m fedsync.broker_config.embedded --host 127.0.0.1 --port 1883
[--password-file FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

log = logging.getLogger("fedsync.broker")

# Argon2id at the OWASP minimum (19 MiB, 2 passes, 1 lane). amqtt verifies the hash
# synchronously inside its event loop on every CONNECT, so the argon2-cffi default
# (64 MiB, 3 passes, 4 lanes: ~200 ms here) would stall the whole broker for 200 ms
# per connecting device; these parameters take ~50 ms.
ARGON2_TIME_COST = 2
ARGON2_MEMORY_COST_KIB = 19 * 1024
ARGON2_PARALLELISM = 1


def hash_password(password: str) -> str:
    """Return an Argon2id hash string that amqtt's FileAuthPlugin accepts.

    >>> hash_password("s3cret").startswith("$argon2id$")
    True
    """
    # Lazy import: argon2-cffi comes with the `broker` extra, not the device install.
    from argon2 import PasswordHasher

    hasher = PasswordHasher(
        time_cost=ARGON2_TIME_COST,
        memory_cost=ARGON2_MEMORY_COST_KIB,
        parallelism=ARGON2_PARALLELISM,
    )
    return hasher.hash(password)


def format_password_file(users: Mapping[str, str]) -> str:
    """Return the text of an amqtt password file for ``users`` (name -> password).

    Raises ValueError for a user name amqtt's line format cannot carry.
    """
    lines = ["# amqtt FileAuthPlugin password file: username:argon2id-hash"]
    for username, password in users.items():
        # The plugin splits each line on the first ":" and strips whitespace, so a name
        # with ":" or surrounding blanks would silently become a different user.
        if not username or ":" in username or username != username.strip() or "\n" in username:
            raise ValueError(f"user name {username!r} cannot be stored in an amqtt password file")
        lines.append(f"{username}:{hash_password(password)}")
    return "\n".join(lines) + "\n"


def write_password_file(path: str | os.PathLike[str], users: Mapping[str, str]) -> None:
    """Write an amqtt password file (mode 0600) granting ``users`` (name -> password).

    >>> write_password_file("/tmp/amqtt.passwd", {"coordinator": "pw"})  # doctest: +SKIP
    """
    from fedsync.atomic import write_atomic

    write_atomic(path, format_password_file(users), mode=0o600)


def broker_config(host: str, port: int, password_file: str | None) -> dict:
    """Return the amqtt 0.12.1 broker configuration (a dict for ``Broker(config)``)."""
    if password_file is None:
        auth = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    else:
        # FileAuthPlugin alone: a CONNECT without a user name gets no boolean answer
        # from any plugin, which amqtt treats as a refusal.
        auth = {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": password_file}}
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # No $SYS plugin and no event/packet loggers: nothing here needs them.
        "plugins": auth,
    }


def read_users_file(path: str) -> dict[str, str]:
    """``name:password`` lines (``#`` comments and blank lines skipped) -> {name: password}.

    The one parser of the plain users file that ``fedsync broker --users`` takes; a bad
    line raises :class:`ConfigError` naming the file and the line.
    """
    from fedsync.config import ConfigError

    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as exc:
        raise ConfigError(f"users: cannot read {path}: {exc.strerror} (command line)") from None
    users = {}
    for n, line in enumerate(lines, 1):
        if line.strip() and not line.startswith("#"):
            name, sep, pw = line.partition(":")
            if not sep:
                raise ConfigError(f"{path}:{n}: expected 'name:password'")
            users[name.strip()] = pw.strip()
    return users


class SnapshotSubscriptions(dict):
    """amqtt 0.12.1's subscription table (``Broker._subscriptions``), iterated over a copy.

    amqtt awaits inside its loops over this table: when a client connects it publishes
    retained messages filter by filter (``_handle_client_session``), and every broadcast
    checks each subscriber (``_run_broadcast``). A client that subscribes to a new filter
    meanwhile (an agent fetching model shards does, on exact topics) makes the loop raise
    ``RuntimeError: dictionary changed size during iteration``. In the connect loop that
    ends the new client's session handling after its CONNACK, while amqtt's protocol handler
    goes on acknowledging its QoS 1 publishes: every one of them is then lost, neither
    forwarded nor retained (measured: 8-9 of 20 retained uploads lost in 3 of 8 federation runs
    on a loaded machine; tests/test_brokers.py fails 3 of 3 without this class). Iterating a copy is what those loops need: a filter
    added meanwhile was subscribed after the loop began.

    >>> t = SnapshotSubscriptions(a=[1])
    >>> for k in t: t[k + "x"] = []
    >>> sorted(t), [k for k, _ in t.items()]
    (['a', 'ax'], ['a', 'ax'])
    """

    def __iter__(self):
        return iter(list(dict.keys(self)))

    def keys(self):
        return list(dict.keys(self))

    def items(self):
        return list(dict.items(self))

    def values(self):
        return list(dict.values(self))


def make_broker(config: dict):
    """An amqtt ``Broker(config)`` whose subscription table is a :class:`SnapshotSubscriptions`."""
    from amqtt.broker import Broker

    broker = Broker(config)
    table = getattr(broker, "_subscriptions", None)
    if type(table) is not dict:  # amqtt is pinned (pyproject.toml); a new version needs a new look
        raise RuntimeError(f"amqtt Broker._subscriptions is {type(table).__name__}, not the dict of 0.12.1")
    broker._subscriptions = SnapshotSubscriptions(table)
    return broker


async def serve(config: dict, host: str, port: int, *, note: str) -> None:
    """Start an amqtt broker (:func:`make_broker`), log ``broker_ready``, stop on SIGINT/SIGTERM.

    The one start/stop sequence of the embedded broker, with or without the ACL plugins.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    broker = make_broker(config)
    await broker.start()
    log.info("broker_ready host=%s port=%d %s", host, port, note)
    try:
        await stop.wait()
    finally:
        await broker.shutdown()
        log.info("broker_stopped host=%s port=%d", host, port)


def run_embedded(host: str = "127.0.0.1", port: int = 1883, password_file: str | None = None,
                 acl: Mapping[str, Mapping[str, Sequence[str]]] | None = None) -> None:
    """Run an amqtt broker on ``host:port`` until SIGINT/SIGTERM, then shut it down.

    ``acl`` (:func:`fedsync.broker_config.acl.amqtt_acl`'s result, needs a password file)
    adds client id = user and the federation's topic ACL. Blocking; must run in the main
    thread (it installs signal handlers).

    >>> run_embedded("127.0.0.1", 18830, password_file="amqtt.passwd")  # doctest: +SKIP
    """
    if password_file is not None and not os.path.isfile(password_file):
        raise FileNotFoundError(f"password file {password_file!r} does not exist")
    configure_logging()
    if acl is None:
        config = broker_config(host, port, password_file)
        note = "auth=password_file" if password_file else "auth=anonymous"
    else:
        from fedsync.broker_config.amqtt_auth import secured_config

        assert password_file is not None, "an ACL needs a password file"
        config, note = secured_config(host, port, password_file, acl), "auth=password_file acl=on"
    asyncio.run(serve(config, host, port, note=note))


def configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # amqtt logs every connection at INFO; an operator needs its warnings only.
    for name in ("amqtt", "transitions", "websockets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Our lifecycle events (broker_ready, broker_stopped) are INFO: the handler on the
    # root logger has no level of its own, so they pass while amqtt's INFO does not.
    log.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedsync.broker_config.embedded",
        description="Embedded amqtt MQTT broker for demos and labs (use mosquitto in the field).",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; amqtt's own default is 0.0.0.0)")
    parser.add_argument("--port", type=int, default=1883, help="TCP port (default 1883)")
    parser.add_argument("--password-file", default=None,
                        help="amqtt password file (username:argon2id-hash); turns anonymous login off")
    args = parser.parse_args(argv)
    run_embedded(args.host, args.port, args.password_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
