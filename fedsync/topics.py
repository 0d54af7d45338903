"""The topic tree, in one place.

``fedsync/{federation}/`` is the root. See docs/protocol.md for QoS and retain
flags. Device ids and federation names are restricted to a safe alphabet so a
topic can always be split unambiguously and never carries MQTT wildcards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedsync.errors import ProtocolError

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True, slots=True)
class TopicRule:
    """One row of the topic tree: who writes it, who reads it, how it is published.

    ``filter`` is relative to ``fedsync/{federation}/`` and is the widest filter any
    reader subscribes with; ``{device}`` stands for one device id. ``clearers`` may also
    publish there, only ever an empty retained payload (deleting a retained message a
    writer should not have left); the broker ACL cannot tell payloads apart, so the
    grant is a plain write."""

    filter: str
    writer: str  # "coordinator" | "device"
    readers: tuple[str, ...]  # roles: "coordinator", "device", "monitor"
    delivery: str  # QoS and retain, as the README's topic tree shows it
    clearers: tuple[str, ...] = ()


# The whole topic tree. The broker ACLs (broker_config/acl.py) are rendered from this table
# and tests check every topic the cores publish or subscribe to against it, so a topic added
# to ``Topics`` without a row here fails the suite instead of being dropped by the broker.
# The coordinator reads back its own retained manifest and model after every connection, to
# repair what a broker restarted from a stale persistence file holds (coordinator/retained_audit.py),
# and deletes updates a device published retained (coordinator/broker_watch.py).
TOPIC_TABLE: tuple[TopicRule, ...] = (
    TopicRule("manifest", "coordinator", ("coordinator", "device", "monitor"), "retained, QoS 1"),
    TopicRule("model/#", "coordinator", ("coordinator", "device"), "retained, QoS 1"),
    TopicRule("modeldelta/#", "coordinator", ("coordinator", "device"), "retained, QoS 1"),
    TopicRule("up/{device}/#", "device", ("coordinator",), "QoS 1 or 2, never retained", ("coordinator",)),
    TopicRule("ack/{device}", "coordinator", ("device",), "retained, QoS 1"),
    TopicRule("status/{device}", "device", ("coordinator", "device", "monitor"),
              "retained, QoS 1; last will; a device reads its own (duplicate-id check)"),
    TopicRule("coordinator/status", "coordinator", ("coordinator", "device", "monitor"),
              "retained, QoS 1; last will"),
    TopicRule("coordinator/probe", "coordinator", ("coordinator",), "QoS 1, to itself"),
)


def is_name(value: object) -> bool:
    """True for a device id / federation name: ``[A-Za-z0-9_.-]{1,64}``.

    >>> is_name("pi-kitchen"), is_name("a b=c"), is_name("x\\n")
    (True, False, False)
    """
    return isinstance(value, str) and _NAME.fullmatch(value) is not None  # fullmatch: `$` alone lets a final \n through


def check_name(field: str, value: str) -> str:
    """Return ``value`` if it is a valid device id / federation name."""
    if not is_name(value):
        raise ProtocolError(field, "format", f"{value!r} must match [A-Za-z0-9_.-]{{1,64}}")
    return value


@dataclass(frozen=True, slots=True)
class UpTopic:
    device: str
    round_id: int
    update_id: str
    shard: int


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names for one federation.

    >>> t = Topics("demo")
    >>> t.up("dev-1", 3, "u7", 0)
    'fedsync/demo/up/dev-1/3/u7/0'
    """

    federation: str

    def __post_init__(self) -> None:
        check_name("federation", self.federation)

    @property
    def root(self) -> str:
        return f"fedsync/{self.federation}"

    @property
    def manifest(self) -> str:
        return f"{self.root}/manifest"

    def model(self, version: int, shard: int) -> str:
        return f"{self.root}/model/{version}/{shard}"

    def model_filter(self, version: int) -> str:
        return f"{self.root}/model/{version}/+"

    def model_delta(self, base: int, version: int, shard: int) -> str:
        return f"{self.root}/modeldelta/{base}/{version}/{shard}"

    def model_delta_filter(self, base: int, version: int) -> str:
        return f"{self.root}/modeldelta/{base}/{version}/+"

    def up(self, device: str, round_id: int, update_id: str, shard: int) -> str:
        return f"{self.root}/up/{device}/{round_id}/{update_id}/{shard}"

    @property
    def up_filter(self) -> str:
        return f"{self.root}/up/#"

    def ack(self, device: str) -> str:
        return f"{self.root}/ack/{device}"

    def status(self, device: str) -> str:
        return f"{self.root}/status/{device}"

    @property
    def status_filter(self) -> str:
        return f"{self.root}/status/+"

    @property
    def coordinator_status(self) -> str:
        return f"{self.root}/coordinator/status"

    @property
    def coordinator_probe(self) -> str:
        """A coordinator's message to itself: when it comes back, the retained status the
        broker had for ``coordinator_status`` (if any) has been delivered before it."""
        return f"{self.root}/coordinator/probe"

    # -- parsing: every client filters what it receives by topic (docs/brokers.md:
    # amqtt delivers retained messages to clients that never subscribed).

    def parse_up(self, topic: str) -> UpTopic:
        parts = topic.split("/")
        if len(parts) != 7 or parts[0] != "fedsync" or parts[1] != self.federation or parts[2] != "up":
            raise ProtocolError("topic", "format", f"not an update topic: {topic!r}")
        device = check_name("topic.device", parts[3])
        update_id = check_name("topic.update_id", parts[5])
        return UpTopic(device, _int("topic.round", parts[4]), update_id, _int("topic.shard", parts[6]))

    def parse_status(self, topic: str) -> str:
        prefix = f"{self.root}/status/"
        if not topic.startswith(prefix):
            raise ProtocolError("topic", "format", f"not a status topic: {topic!r}")
        return check_name("topic.device", topic[len(prefix):])

    def parse_model(self, topic: str) -> tuple[int, int, int]:
        """``(version, shard, base)`` of a model topic; ``base`` is -1 for a full model shard."""
        parts = topic.split("/")
        if len(parts) == 5 and parts[:3] == ["fedsync", self.federation, "model"]:
            return _int("topic.version", parts[3]), _int("topic.shard", parts[4]), -1
        if len(parts) == 6 and parts[:3] == ["fedsync", self.federation, "modeldelta"]:
            return _int("topic.version", parts[4]), _int("topic.shard", parts[5]), _int("topic.base", parts[3])
        raise ProtocolError("topic", "format", f"not a model topic: {topic!r}")


def _int(field: str, text: str) -> int:
    if not text.isdigit() or len(text) > 18:
        raise ProtocolError(field, "format", f"{text!r} is not a non-negative integer")
    return int(text)
