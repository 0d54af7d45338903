"""What the sans-IO cores ask their adapters to do.

The coordinator and agent cores return lists of these; the MQTT services carry
them out. Keeping them as plain frozen data makes every scenario checkable
without a broker: a test inspects the list.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Subscribe:
    topic_filter: str
    qos: int = 1


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topic_filter: str
