"""Who may publish and subscribe where: the fedsync access table, for mosquitto and amqtt.

Theory of operation
-------------------
:data:`GRANTS` is the whole policy, as data: for each role, the topics it may read
(subscribe to and receive) and write (publish to). It is derived from the topic tree,
:data:`fedsync.topics.TOPIC_TABLE`, so a topic cannot be added without its grants. ``{fed}`` is the federation and
``{user}`` the MQTT user name, which for a device is also its client id and its device
id (docs/brokers.md: the device id in a topic is the MQTT client id and user). Two
renderers turn the table into broker configuration:

* :func:`mosquitto_acl` writes a mosquitto ``acl_file``;
* :func:`amqtt_acl` builds the ``publish-acl`` / ``subscribe-acl`` / ``receive-acl``
  maps of amqtt's ``TopicAccessControlListPlugin``.

Roles
~~~~~
``coordinator`` (user ``coordinator``) reads every device's updates and presence and
writes the manifest, model shards, receipts and its own status, in any federation; it
also reads back its retained manifest and model (to repair a broker's stale copy) and
may write under ``up/`` (only to delete an update a device published retained).
A device reads the round manifest, the model, its *own* receipts and the coordinator's
status, and writes only its own updates and its own status (its last will included:
mosquitto checks a will's topic against the ACL at CONNECT). ``monitor`` is a
read-only operator account for ``fedsync status``: presence and manifest, never
updates (an update is a function of the device's private data).

Why per-user ``topic`` lines and not ``pattern`` lines with ``%u`` for devices:
mosquitto applies ``pattern`` lines to *every* authenticated user, so
``pattern write fedsync/demo/status/%u`` would also let the ``monitor`` (or
``coordinator``) account publish ``status/monitor`` "online" and be selected for a
round as a device named ``monitor``. Listing each device by name means exactly the
devices in ``devices.txt`` hold device rights; the ACL file doubles as the registry.
The coordinator's rules are wildcards (``fedsync/+/...``), as one coordinator
account may serve several federations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedsync.topics import TOPIC_TABLE, check_name

COORDINATOR = "coordinator"
MONITOR = "monitor"
RESERVED_USERS = (COORDINATOR, MONITOR)


@dataclass(frozen=True, slots=True)
class Grant:
    access: str  # "read" | "write"
    topic: str  # may contain {fed}, {user} and MQTT wildcards


def _grants_of(role: str) -> tuple[Grant, ...]:
    """What ``role`` may do, derived from :data:`fedsync.topics.TOPIC_TABLE`.

    A device's rules name its own id (``{user}``); the coordinator's and the monitor's
    cover every device (``+``), and a ``+/#`` tail collapses to ``#`` because that is
    the filter they subscribe with (mosquitto checks a SUBSCRIBE filter against the
    ACL level by level, so ``up/#`` is not covered by ``up/+/#``). The coordinator's
    federation level is ``+`` as well: one account may serve several federations."""
    fed = "+" if role == COORDINATOR else "{fed}"
    device = "{user}" if role == "device" else "+"
    out = []
    for rule in TOPIC_TABLE:
        topic = f"fedsync/{fed}/" + rule.filter.replace("{device}", device).replace("+/#", "#")
        if rule.writer == role or role in rule.clearers:
            out.append(Grant("write", topic))
        if role in rule.readers:
            out.append(Grant("read", topic))
    return tuple(out)


GRANTS: dict[str, tuple[Grant, ...]] = {role: _grants_of(role) for role in ("coordinator", "device", "monitor")}


def check_devices(devices: Iterable[str]) -> list[str]:
    """Validate device ids (topic-safe, unique, not a reserved user); keep their order.

    >>> check_devices(["dev-0", "dev-1"])
    ['dev-0', 'dev-1']
    """
    out: list[str] = []
    for d in devices:
        check_name("device", d)
        if d in RESERVED_USERS:
            raise ValueError(f"device id {d!r} is reserved for the {d} account")
        if d in out:
            raise ValueError(f"device id {d!r} is listed twice")
        out.append(d)
    return out


def users_and_roles(devices: Sequence[str]) -> list[tuple[str, str]]:
    """``(user, role)`` for every account of a federation: coordinator, monitor, devices."""
    return [(COORDINATOR, "coordinator"), (MONITOR, "monitor"), *((d, "device") for d in check_devices(devices))]


def rules(role: str, federation: str, user: str) -> list[Grant]:
    """The grants of one account, with ``{fed}`` and ``{user}`` filled in.

    >>> [g.topic for g in rules("device", "demo", "dev-3") if g.access == "write"]
    ['fedsync/demo/up/dev-3/#', 'fedsync/demo/status/dev-3']
    """
    check_name("federation", federation)
    check_name("user", user)
    return [Grant(g.access, g.topic.format(fed=federation, user=user)) for g in GRANTS[role]]


def mosquitto_acl(federation: str, devices: Sequence[str]) -> str:
    """The text of a mosquitto 2.0 ``acl_file`` for ``federation`` and ``devices``."""
    lines = [
        "# fedsync broker ACL (mosquitto 2.0 acl_file), rendered by `fedsync broker-config`.",
        f"# Federation {federation!r}: coordinator, monitor and {len(devices)} device(s).",
        "# Anything not granted here is denied. mosquitto answers a denied PUBLISH with a",
        "# PUBACK all the same (MQTT 3.1.1 has no negative ack) and drops it; a denied",
        "# subscription is granted but delivers nothing.",
        "# Devices are listed by name (no `pattern ... %u` lines): mosquitto applies",
        "# pattern lines to every user, which would give device rights to the coordinator",
        "# and monitor accounts under their own names.",
        "",
        "# No rules before the first `user` line: anonymous clients get nothing",
        "# (allow_anonymous is false anyway).",
    ]
    for user, role in users_and_roles(devices):
        lines += ["", f"user {user}"]
        lines += [f"topic {g.access} {g.topic}" for g in rules(role, federation, user)]
    return "\n".join(lines) + "\n"


def amqtt_acl(federation: str, devices: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """The ``publish-acl``, ``subscribe-acl`` and ``receive-acl`` maps for amqtt 0.12.1.

    amqtt matches a requested topic (or subscription filter) against each allowed
    filter level by level, ``+`` and ``#`` in the allowed filter acting as wildcards,
    and has no ``%u`` substitution, so every account is listed by name.

    >>> acl = amqtt_acl("demo", ["dev-0"])
    >>> acl["publish-acl"]["dev-0"]
    ['fedsync/demo/up/dev-0/#', 'fedsync/demo/status/dev-0']
    """
    out: dict[str, dict[str, list[str]]] = {"publish-acl": {}, "subscribe-acl": {}, "receive-acl": {}}
    for user, role in users_and_roles(devices):
        grants = rules(role, federation, user)
        write = [g.topic for g in grants if g.access == "write"]
        read = [g.topic for g in grants if g.access == "read"]
        out["publish-acl"][user] = write
        out["subscribe-acl"][user] = read
        out["receive-acl"][user] = read
    return out


def covers(grant: str, wanted: str) -> bool:
    """Whether an ACL topic ``grant`` allows ``wanted`` (a topic, or a subscription filter),
    level by level as mosquitto checks it: ``+`` in the grant takes any one level (a
    ``+`` in ``wanted`` included), ``#`` the rest; a wildcard in ``wanted`` needs one in
    the grant.

    >>> covers("fedsync/+/up/#", "fedsync/demo/up/#"), covers("fedsync/d/model/#", "fedsync/d/modeldelta/1/2/+")
    (True, False)
    """
    g, w = grant.split("/"), wanted.split("/")
    for i, level in enumerate(g):
        if level == "#":
            return True
        if i >= len(w) or w[i] == "#" or (level != "+" and level != w[i]):
            return False
    return len(g) == len(w)


def allowed(role: str, federation: str, user: str, access: str, wanted: str) -> bool:
    """Whether account ``user`` (of ``role``) may ``access`` ("read"/"write") ``wanted``."""
    return any(g.access == access and covers(g.topic, wanted) for g in rules(role, federation, user))
