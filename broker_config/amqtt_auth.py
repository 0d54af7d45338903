"""Per-device access control for the embedded amqtt 0.12.1 broker, as far as amqtt allows.

Theory of operation
-------------------
amqtt has no ``acl_file`` and no ``use_username_as_clientid``. What it does have is a
plugin chain: every auth plugin must answer True for a CONNECT to succeed, and every
topic plugin must answer True for a PUBLISH to be forwarded, a SUBSCRIBE to be granted
and a live message to be delivered. This module adds two plugins:

* :class:`ClientIdIsUser` refuses a CONNECT whose client id differs from its user name,
  so a device cannot log in under another device's client id and inherit its
  persistent session (mosquitto renames instead: ``use_username_as_clientid``).
* :class:`TopicACL` is amqtt's ``TopicAccessControlListPlugin`` with a configuration
  class that also accepts ``subscribe_acl`` and ``receive_acl`` (0.12.1's own
  ``Config`` dataclass only declares ``publish_acl`` and the deprecated ``acl``, and
  amqtt loads plugin configs strictly). The rules come from :mod:`fedsync.broker_config.acl`,
  the same table the mosquitto ACL is rendered from.

What this cannot fix (amqtt 0.12.1 internals, measured; docs/security.md has the list):

* On every CONNECT amqtt sends the new client the retained messages matching *every*
  subscription any client holds, without asking a topic plugin, so retained receipts
  (``ack/{other device}``) and presence reach devices that may not subscribe to them.
* The session of a client id is looked up, and a connected client with the same id is
  disconnected (session take-over), *before* the authentication result is acted on: a
  CONNECT with a wrong password still kicks the device whose client id it names.
* A denied PUBLISH is dropped silently (as in mosquitto, MQTT 3.1.1 has no negative ack).

Run it as ``python -m fedsync.broker_config.amqtt_auth --host 127.0.0.1 --port 1883
--password-file amqtt.passwd --acl-file amqtt-acl.json``; the ACL file is the JSON of
:func:`fedsync.broker_config.acl.amqtt_acl`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.plugins.topic_checking import TopicAccessControlListPlugin
from amqtt.session import Session

log = logging.getLogger("fedsync.broker")

_MODULE = "fedsync.broker_config.amqtt_auth"  # not __name__: that is "__main__" under python -m


# Read-only observers (`fedsync status` connects with a fresh client id each time); every other
# user, coordinator and devices, must connect with its own name as client id.
ANY_CLIENT_ID = frozenset({"monitor"})


class ClientIdIsUser(BaseAuthPlugin):
    """Refuse a CONNECT unless its client id equals its user name (``monitor`` excepted)."""

    async def authenticate(self, *, session: Session) -> bool:
        ok = session.username is not None and (
            session.username in ANY_CLIENT_ID or session.client_id == session.username)
        if not ok:
            log.warning("connect_refused reason=client_id_not_user client_id=%s user=%s",
                        session.client_id, session.username)
        return ok


class TopicACL(TopicAccessControlListPlugin):
    """amqtt's ACL plugin, configurable for publish, subscribe and receive."""

    @dataclass
    class Config:
        publish_acl: dict[str, list[str]] = field(default_factory=dict)
        subscribe_acl: dict[str, list[str]] = field(default_factory=dict)
        receive_acl: dict[str, list[str]] = field(default_factory=dict)
        acl: dict[str, list[str]] = field(default_factory=dict)  # the parent reads it; always empty here


def secured_config(host: str, port: int, password_file: str,
                   acl: Mapping[str, Mapping[str, Sequence[str]]]) -> dict:
    """The amqtt broker configuration: password file, client id = user, topic ACL.

    ``acl`` is :func:`fedsync.broker_config.acl.amqtt_acl`'s result.
    """
    from fedsync.broker_config.embedded import broker_config

    config = broker_config(host, port, password_file)
    config["plugins"][f"{_MODULE}.ClientIdIsUser"] = {}
    config["plugins"][f"{_MODULE}.TopicACL"] = {
        "publish_acl": {u: list(t) for u, t in acl["publish-acl"].items()},
        "subscribe_acl": {u: list(t) for u, t in acl["subscribe-acl"].items()},
        "receive_acl": {u: list(t) for u, t in acl["receive-acl"].items()},
    }
    return config


def main(argv: Sequence[str] | None = None) -> int:
    from fedsync.broker_config.embedded import run_embedded

    parser = argparse.ArgumentParser(
        prog=f"python -m {_MODULE}",
        description="Embedded amqtt broker with passwords, client id = user, and the fedsync topic ACL.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--password-file", required=True, help="amqtt password file (username:argon2id-hash)")
    parser.add_argument("--acl-file", required=True, help="JSON of fedsync.broker_config.acl.amqtt_acl(...)")
    args = parser.parse_args(argv)
    for path in (args.password_file, args.acl_file):
        if not os.path.isfile(path):
            parser.error(f"{path!r} does not exist")
    with open(args.acl_file, encoding="utf-8") as f:
        acl = json.load(f)
    run_embedded(args.host, args.port, args.password_file, acl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
